"""Reading safetensors bytes defensively, and the cheap content check of a library file.

    buffer = read_checked(path, expected_check)    # whole file; size checked before allocating
    metadata, tensors = parse_safetensors(buffer)  # zero-copy views; every offset, dtype and shape checked

The content check is `"<size>:<sum of the little-endian 64-bit words mod 2^64, tail zero-padded>"`. Any
single flipped bit changes the sum by ±2^k (never 0 mod 2^64), so it catches a flipped bit, a truncation
and an extension at a fraction of the cost of sha256 (benchmarks/reliability.py measures it against the
load it guards); `verify()` still re-hashes every file with sha256.

On read the sum runs block by block right after each block is read (`_BLOCK` bytes: a large file is
summed while its block is still in cache, not in a second pass over memory), with torch's int64 sum:
two's-complement addition wraps to the same 64 bits as unsigned addition mod 2^64, and it is ~1.5x
faster than numpy's uint64 sum here. Smaller blocks cost more than they save (a fixed cost per block;
measured 256 KiB - 8 MiB, docs/RELIABILITY.md), so an adapter of a few MB is summed in one pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import AdapterFormatError, CorruptAdapterError

__all__ = ["content_check", "read_checked", "parse_safetensors", "serialize", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_BLOCK = 8 << 20               # read-and-sum block: stays in L3 between the read and the sum
_MOD = 1 << 64
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes, deterministic: names sorted, header keys sorted, so one content makes one file
    in every process (safetensors' own writer orders metadata by a hash map, which differs per process)."""
    header, chunks, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)        # data starts 8-byte aligned, as safetensors writes it
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def content_check(buffer) -> str:
    """Size and 64-bit word sum of `buffer` (bytes, bytearray or memoryview)."""
    size = len(buffer)
    words = size // 8
    tail = int.from_bytes(bytes(memoryview(buffer)[words * 8:]), "little")
    return f"{size}:{(_word_sum(buffer, 0, words * 8) + tail) % _MOD:016x}"


def _word_sum(buffer, start: int, stop: int) -> int:
    """Sum mod 2^64 of the little-endian 64-bit words of buffer[start:stop] (start, stop multiples of 8)."""
    count = (stop - start) // 8
    if count == 0:
        return 0
    if memoryview(buffer).readonly or sys.byteorder != "little":  # torch.frombuffer wants a writable buffer
        return int(np.frombuffer(buffer, "<u8", count=count, offset=start).sum(dtype=np.uint64))
    return int(torch.frombuffer(buffer, dtype=torch.int64, count=count, offset=start).sum()) % _MOD


def read_checked(path: Path, expected_check: str | None = None, expected_sha256: str | None = None) -> bytearray:
    """The whole file, checked against the catalog's record of it (the cheap check, else sha256).
    A size that differs from the record is refused before the buffer is allocated."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        if expected_check is not None and str(size) != expected_check.split(":", 1)[0]:
            raise CorruptAdapterError(f"{path} is {size} bytes but the catalog recorded "
                                      f"{expected_check.split(':', 1)[0]}: the file is damaged; run verify(), "
                                      "then restore it or add the adapter again")
        buffer = bytearray(size)
        total = _read_summing(handle, buffer) if expected_check is not None else _read_all(handle, buffer)
        if handle.read(1):
            raise CorruptAdapterError(f"{path} changed size while being read")
    if expected_check is not None and f"{size}:{total:016x}" != expected_check:
        raise CorruptAdapterError(f"{path} does not match the checksum the catalog recorded: the file is damaged "
                                  "(e.g. a flipped bit); run verify(), then restore it or add the adapter again")
    if expected_check is None and expected_sha256 is not None and hashlib.sha256(buffer).hexdigest() != expected_sha256:
        raise CorruptAdapterError(f"{path} does not match the sha256 the catalog recorded: the file is damaged; "
                                  "run verify(), then restore it or add the adapter again")
    return buffer


def _read_all(handle, target) -> int:
    """Fill `target` (a writable buffer) from `handle`; a file that ends early changed size under us."""
    view, done = memoryview(target), 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise CorruptAdapterError(f"{handle.name} changed size while being read")
        done += got
    return done


def _read_summing(handle, buffer: bytearray) -> int:
    """Fill `buffer` from `handle` block by block, summing each block while it is hot; the content sum."""
    view, size, total = memoryview(buffer), len(buffer), 0
    for start in range(0, size, _BLOCK):
        stop = min(start + _BLOCK, size)
        _read_all(handle, view[start:stop])
        whole = start + (stop - start) // 8 * 8
        total += _word_sum(buffer, start, whole)
    words_end = size // 8 * 8
    return (total + int.from_bytes(bytes(view[words_end:]), "little")) % _MOD


def parse_safetensors(buffer: bytearray, source: str = "file") -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, name -> tensor) from safetensors bytes. Tensors are views of `buffer` (no copy) when
    aligned. Raises AdapterFormatError naming the problem for any malformed header."""
    if len(buffer) < 8:
        raise AdapterFormatError(f"{source}: {len(buffer)} bytes is too short for a safetensors file")
    length = int.from_bytes(buffer[:8], "little")
    if length > min(MAX_HEADER_BYTES, len(buffer) - 8):
        raise AdapterFormatError(f"{source}: header length {length} exceeds the file ({len(buffer)} bytes)")
    try:
        header = json.loads(bytes(buffer[8:8 + length]), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFormatError(f"{source}: the safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{source}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{source}: safetensors metadata must map names to strings")
    base, data_bytes = 8 + length, len(buffer) - 8 - length
    return metadata, {name: _tensor(buffer, base, data_bytes, name, entry, source) for name, entry in header.items()}


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    return dict(pairs)


def _tensor(buffer, base: int, data_bytes: int, name: str, entry, source: str) -> torch.Tensor:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _DTYPES:
        raise AdapterFormatError(f"{source}: tensor {name!r} has no supported dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise AdapterFormatError(f"{source}: tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise AdapterFormatError(f"{source}: tensor {name!r} has data offsets {offsets!r} outside the file")
    dtype = _DTYPES[entry["dtype"]]
    numel = math.prod(shape)
    if numel * dtype.itemsize != offsets[1] - offsets[0]:
        raise AdapterFormatError(f"{source}: tensor {name!r} of shape {shape} ({entry['dtype']}) needs "
                                 f"{numel * dtype.itemsize} bytes, its offsets span {offsets[1] - offsets[0]}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    start = base + offsets[0]
    if start % dtype.itemsize:  # unaligned (not written by safetensors): copy out
        return torch.frombuffer(bytearray(buffer[start:base + offsets[1]]), dtype=dtype).view(shape)
    return torch.frombuffer(buffer, dtype=dtype, offset=start, count=numel).view(shape)
