"""Names the machine a benchmark ran on (results are only comparable on the same one)."""

from __future__ import annotations

import datetime
import os
import platform

import torch


# CPU features that change what a benchmark measures (vector width; native bf16 / fp16 / AMX GEMMs)
FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def cpu_info() -> dict:
    """Model name, family / model numbers and FEATURES from /proc/cpuinfo: a cloud CPU's name alone ("AMD
    EPYC") hides its generation, and with it whether bf16 GEMMs are native (several times faster than fp32)
    or emulated (several times slower)."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as handle:
            fields = dict(line.split(":", 1) for line in handle.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return info
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(cpu=fields.get("model name", info["cpu"]), cpu_family=fields.get("cpu family"),
                cpu_model=fields.get("model"), cpu_features=[f for f in FEATURES if f in flags])
    return info


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**cpu_info(), "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}
