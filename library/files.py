"""Durable file writes and the library's own adapter file (safetensors + a JSON header).

Atomic write: write a temp file in the same folder, fsync it, rename it over the target, fsync the folder.
A reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import faults
from .adapter import LoraAdapter, LoraModule
from .errors import AdapterFormatError
from .paths import LAYOUT, check_layout, library_file
from .tensor_file import parse_safetensors, read_checked, serialize

__all__ = ["write_atomic", "fsync_dir", "adapter_file_bytes", "read_adapter_file", "library_file", "check_layout",
           "FILE_FORMAT", "LAYOUT"]

FILE_FORMAT = "adaptermix.lora/1"


def fsync_dir(path: Path) -> None:
    faults.point("fsync dir")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(folder: Path, data: bytes, suffix: str = ".tmp") -> Path:
    """Write bytes to a fresh fsynced temp file in `folder` and return its path (not yet renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            faults.point("write")
            handle.write(data)
            handle.flush()
            faults.point("fsync")
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    path = Path(path)
    tmp = write_temp(path.parent, data)
    faults.point("rename")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def adapter_file_bytes(adapter: LoraAdapter) -> bytes:
    """Serialise factors (in their own dtype) and per-module alpha / rsLoRA flags."""
    tensors = {}
    for module_name, module in adapter.modules.items():
        tensors[f"{module_name}::A"] = module.A.detach().contiguous().cpu()
        tensors[f"{module_name}::B"] = module.B.detach().contiguous().cpu()
    header = {
        "format": FILE_FORMAT,
        "base_model": adapter.base_model,
        "alphas": json.dumps({k: m.alpha for k, m in adapter.modules.items()}),
        "rslora": json.dumps(sorted(k for k, m in adapter.modules.items() if m.use_rslora)),
        "conv1d": json.dumps(sorted(adapter.conv1d)),
    }
    return serialize(tensors, header)


def read_adapter_file(path: Path, modules: list[str] | None = None, *, expected_check: str | None = None,
                      expected_sha256: str | None = None, **metadata) -> LoraAdapter:
    """Load an adapter file, checked against the catalog's record of its content (size + checksum, else
    sha256) before any tensor is made: CorruptAdapterError if it differs. With `modules`, only those."""
    try:
        buffer = read_checked(path, expected_check, expected_sha256)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AdapterFormatError(f"cannot read adapter file {path}: {exc}") from exc
    header, tensors = parse_safetensors(buffer, str(path))
    if header.get("format") != FILE_FORMAT:
        raise AdapterFormatError(f"{path} is not an {FILE_FORMAT} file")
    try:
        alphas = json.loads(header["alphas"])
        rslora = set(json.loads(header["rslora"]))
        conv1d = frozenset(json.loads(header["conv1d"]))
        wanted = list(alphas) if modules is None else modules
        missing = [m for m in wanted if m not in alphas]
        if missing:
            raise AdapterFormatError(f"{path} has no module(s) {missing[:5]}")
        loaded = {m: LoraModule(tensors[f"{m}::A"], tensors[f"{m}::B"], float(alphas[m]), m in rslora)
                  for m in wanted}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, AdapterFormatError):
            raise
        raise AdapterFormatError(f"cannot read adapter file {path}: {exc!r}") from exc
    return LoraAdapter(modules=loaded, base_model=header.get("base_model", ""), conv1d=conv1d, **metadata)
