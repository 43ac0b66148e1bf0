"""Reliability figures of the library store -> benchmarks/results/reliability.json (docs/RELIABILITY.md).

    python benchmarks/reliability.py                          # every section at full size (~1 h on 2 cores)
    python benchmarks/reliability.py sections=checksum,crash  # some sections; the others stay as they were
    python benchmarks/reliability.py sections=stress writers=4 readers=4 seconds=600
    python benchmarks/reliability.py sections=fuzz fuzz_scale=1.0    # >= 100,000 cases at scale 1

Sections:
    crash     reliability/crashtest.py: SIGKILL at every step of every write operation
    stress    reliability/stresstest.py: W writers x R readers, writers SIGKILLed every 2-6 s
    fuzz      reliability/fuzz.py: hypothesis over the safetensors reader, the PEFT loader, hostile libraries
    checksum  cost of the content check on read, against the load it guards (side by side, same process)
    overhead  cost of a fault point with no hook set; cost of the composer's router-output check
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"


def crash(args: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="am-crash-") as work:
        child = subprocess.run([sys.executable, "-P", "-m", "adaptermix.reliability.crashtest", work, "1"],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if child.returncode:
        raise RuntimeError(child.stderr[-3000:])
    results = json.loads(child.stdout.strip().splitlines()[-1])
    return {"operations": results, "kills": sum(r["kills"] for r in results.values()),
            "steps": sum(r["steps"] for r in results.values()),
            "failures": sum(len(r["failures"]) for r in results.values())}


def stress(args: dict) -> dict:
    from adaptermix.reliability.stresstest import run_stress

    with tempfile.TemporaryDirectory(prefix="am-stress-") as work:
        return run_stress(Path(work), writers=int(args.get("writers", 4)), readers=int(args.get("readers", 4)),
                          seconds=float(args.get("seconds", 600)), kill_every=(2.0, 6.0))


def fuzz(args: dict) -> dict:
    from adaptermix.reliability.fuzz import run_fuzz

    scale = float(args.get("fuzz_scale", 1.0))
    examples = {"safetensors": 90_000, "peft_config": 4_000, "peft_weights": 4_000, "library": 2_000}
    examples = {k: max(10, int(v * scale)) for k, v in examples.items()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="am-fuzz-") as work:
        counts = run_fuzz(Path(work), examples)
    return {"cases": counts, "total": sum(v for k, v in counts.items() if k != "outside_touched"),
            "crashes": 0, "seconds": round(time.perf_counter() - started, 1)}


def checksum(args: dict) -> dict:
    """get()'s read with and without the content check, alternated, on an adapter of the example library's
    size (150 modules, rank 8, float32: 1.4 MB)."""
    import hashlib
    import timeit

    import torch

    from adaptermix.library.files import adapter_file_bytes, read_adapter_file
    from adaptermix.library.tensor_file import content_check
    from adaptermix.reliability.crashtest import random_adapter

    class Spec:
        name = "bench"
        modules = {f"model.layers.{i}.{m}": (576, 576) for i in range(30) for m in ("q_proj", "k_proj", "v_proj",
                                                                                   "o_proj", "down_proj")}

    adapter = random_adapter("bench", Spec, 0, modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
                             rank=8)
    data = adapter_file_bytes(adapter)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "a.safetensors"
        path.write_bytes(data)
        check, sha = content_check(data), hashlib.sha256(data).hexdigest()
        timings = {"unchecked": [], "checked": [], "sha256": []}
        for _ in range(int(args.get("repeats", 200))):
            for label, kwargs in (("unchecked", {}), ("checked", {"expected_check": check}),
                                  ("sha256", {"expected_sha256": sha})):
                started = time.perf_counter()
                read_adapter_file(path, name="bench", **kwargs)
                timings[label].append(time.perf_counter() - started)
    median = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in timings.items()}
    alone = min(timeit.repeat(lambda: content_check(data), number=20, repeat=5)) / 20 * 1e3
    median["content_check_alone"] = alone
    return {"file_bytes": len(data), "median_ms": {k: round(v, 4) for k, v in median.items()},
            "check_cost_fraction": round(median["checked"] / median["unchecked"] - 1, 4),
            "check_alone_fraction_of_load": round(alone / median["unchecked"], 4),
            "sha256_cost_fraction": round(median["sha256"] / median["unchecked"] - 1, 4), "torch": torch.__version__}


def overhead(args: dict) -> dict:
    import timeit

    import torch

    from adaptermix.composer.layer import check_routing
    from adaptermix.library import faults
    from adaptermix.routers.routing import Routing

    point = min(timeit.repeat(lambda: faults.point("write"), number=100_000, repeat=5)) / 100_000
    routing = Routing(torch.randint(0, 8, (8, 2)), torch.rand(8, 2))
    check = min(timeit.repeat(lambda: check_routing(routing, 8, "m", None), number=2000, repeat=5)) / 2000
    x, weight = torch.randn(8, 576), torch.randn(576, 576)
    linear = min(timeit.repeat(lambda: torch.nn.functional.linear(x, weight), number=2000, repeat=5)) / 2000
    return {"fault_point_off_ns": round(point * 1e9, 1), "route_check_us_T8": round(check * 1e6, 2),
            "base_linear_us_T8_576": round(linear * 1e6, 2)}


SECTIONS = {"checksum": checksum, "overhead": overhead, "crash": crash, "fuzz": fuzz, "stress": stress}


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared, noisy)"
    for name in args.get("sections", ",".join(SECTIONS)).split(","):
        started = time.perf_counter()
        results[name] = SECTIONS[name](args)
        results[name]["wall_seconds"] = round(time.perf_counter() - started, 1)
        results[name]["args"] = {k: v for k, v in args.items() if k != "sections"}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(results[name])[:400], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
