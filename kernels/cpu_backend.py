"""CPU backend: the mixture as one fused native pass over the tokens (kernels/cpu_mixture.cpp).

On a CPU the mixture's flops are a few percent of the base GEMM's; what costs is the number of operations
(each PyTorch op has a fixed cost of microseconds) and the gathers. The torch backend needs a dozen ops plus
one small matmul per used adapter; this backend is one call: each thread takes a range of tokens, sorts its
(token, slot) pairs by adapter, and runs each adapter's pairs in tiles of four tokens: the rank dot products
with x[t] (shrink) and rank axpys into the output row (expand), the factors staying in cache, in
register-blocked micro-kernels (two tokens by four rank rows).

Built on first use with torch.utils.cpp_extension (the host's C++ compiler, -O3 -march=native, OpenMP),
cached under ~/.cache/torch_extensions/adaptermix by source and CPU (each build in a private folder renamed
into place, its sha256 checked before every load); the OpenMP runtime is the one torch already loaded,
so threads follow torch.set_num_threads. Without a compiler `available()` is False and 'auto' takes the
torch backend. float32 / float64 only. B is read by rows (N, r_max, d_out): the transposed view of such a
tensor (as the composer stores it) is read in place; any other layout (PEFT's: a contiguous (N, d_out, r_max)
B) is copied into rows once per tensor and version and the copy kept while B lives (kernels/tensor_cache.py;
memory: one more copy of such a B), so no call after the first pays the transpose.

Backward (adapters frozen): one more pass in the forward's order: per pair, B[e]'s rank dots with dy serve
both d(weights) (with A[e]'s dots with x) and dx (axpys of A[e]'s rows); either gradient alone skips the
other's work.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

from .plan import cast
from .tensor_cache import VersionedCache

__all__ = ["DTYPES", "available", "ready", "build_error", "forward_", "backward"]

SOURCE = Path(__file__).with_name("cpu_mixture.cpp")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_ERRORS = {1: "idx holds an adapter id outside [-1, N)", 2: "ranks hold a value outside [0, r_max]",
           3: "r_max above 1024 is not supported by the CPU kernel"}

MANIFEST = "manifest.json"                 # the built library's file name and sha256
BUILD_PURPOSE = "cpu kernel build"         # the ownership marker of the build folders (library/owned.py)
_lock = threading.Lock()
_state: dict = {"lib": None, "error": None}


def _cpu_signature() -> str:
    """What -march=native depends on: a build made on another CPU is never loaded here."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a virtual environment's own (the `ninja` package) may not be."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / "adaptermix"


def _cached_library(folder: Path) -> Path | None:
    """The built library in `folder` if its manifest's sha256 matches its bytes (a damaged or swapped file
    is never loaded), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        path = folder / manifest["file"]
        if "/" in manifest["file"] or path.is_symlink() or not path.is_file():
            return None
        return path if hashlib.sha256(path.read_bytes()).hexdigest() == manifest["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _compile(folder: Path, name: str) -> None:
    """Compile into `folder`, a private build folder of this process: torch's lock file lives there, so a
    build killed midway can never leave a lock that makes a later process wait forever."""
    from torch.utils import cpp_extension

    built = Path(cpp_extension.load(name, [str(SOURCE)], is_python_module=False, build_directory=str(folder),
                                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"]))
    manifest = {"file": built.name, "sha256": hashlib.sha256(built.read_bytes()).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _build() -> ctypes.CDLL:
    from ..library.owned import publish_folder, remove_owned

    _ninja_on_path()
    tag = hashlib.sha256((SOURCE.read_text() + _cpu_signature()).encode()).hexdigest()[:16]
    folder = _build_root() / f"cpu_{tag}"
    path = _cached_library(folder)
    if path is None:
        remove_owned(folder, BUILD_PURPOSE)      # a damaged build of ours; never a folder we did not make
        publish_folder(folder, lambda staging: _compile(staging, f"adaptermix_cpu_{tag}"), BUILD_PURPOSE)
        path = _cached_library(folder)
        if path is None:
            raise RuntimeError(f"the cpu kernels built in {folder} fail their integrity check")
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in DTYPES.values():
        mixture = getattr(lib, f"am_mixture_{suffix}")
        mixture.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr,
                            i64, i64, i64, ctypes.c_int, i64, i64]
        fused = getattr(lib, f"am_backward_{suffix}")
        fused.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr,
                          i64, i64, i64, ctypes.c_int, i64, i64]
        mixture.restype = fused.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call, ~1 s)."""
    if _state["lib"] is None and _state["error"] is None:
        with _lock:
            if _state["lib"] is None and _state["error"] is None:
                try:
                    _state["lib"] = _build()
                except Exception as exc:  # no compiler, no OpenMP: 'auto' falls back to the torch backend
                    _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["lib"] is not None


def ready() -> bool:
    """Built already (never builds: safe while torch.compile traces)."""
    return _state["lib"] is not None


def build_error() -> str | None:
    return _state["error"]


def _library() -> ctypes.CDLL:
    if not available():
        raise RuntimeError(f"the cpu backend's native kernels could not be built: {_state['error']}")
    return _state["lib"]


@functools.cache
def _function(name: str, dtype: torch.dtype):
    """The kernel `name` for dtype from the built library (cached: one lookup per process)."""
    return getattr(_library(), f"{name}_{DTYPES[dtype]}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a unit stride along its last dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


_B_ROWS = VersionedCache()


def _rows_of_B(B: torch.Tensor) -> torch.Tensor:
    """B's rows (N, r_max, d_out) with unit stride: a view for the composer's layout, else a cached copy."""
    rows = B.transpose(1, 2)
    if rows.stride(-1) == 1:
        return rows
    return _B_ROWS.get(B, lambda B: B.detach().transpose(1, 2).contiguous())


def _check(status: int) -> None:
    if status:
        raise ValueError(" and ".join(message for bit, message in _ERRORS.items() if status & bit))


def _mixture_call(y, x, P, Q, scales, idx, coef, ranks) -> None:
    """y += sum_j coef[t, j] scales[e] (P[e] @ x[t]) @ Q[e]; y, x, P, Q of one dtype with unit-stride rows."""
    T, k = idx.shape
    N, r_max, d_p = P.shape
    fn = _function("am_mixture", x.dtype)
    _check(fn(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), P.data_ptr(), P.stride(0), P.stride(1),
              Q.data_ptr(), Q.stride(0), Q.stride(1), scales.data_ptr(), idx.data_ptr(), coef.data_ptr(),
              ranks.data_ptr(), T, k, N, r_max, d_p, Q.shape[2]))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype (`plan.cast`: no call where it already is), contiguous."""
    t = cast(t, dtype)
    return t if t.is_contiguous() else t.contiguous()


def _small(scales, idx, weights, ranks, dtype):
    """The per-entry arrays in the kernel's types, contiguous."""
    return _as(scales, dtype), _as(idx, torch.int64), _as(weights, dtype), _as(ranks, torch.int32)


def forward_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture, in place. x, A, B float32 or float64 on the CPU."""
    if idx.numel() == 0:
        return
    x, A, B_rows = _rows(x), _rows(A), _rows_of_B(B)                         # B_rows (N, r_max, d_out)
    scales, idx, coef, ranks = _small(scales, idx, weights, ranks, x.dtype)
    direct = out.dtype == x.dtype and out.stride(-1) == 1
    y = out if direct else torch.zeros(out.shape, dtype=x.dtype)
    _mixture_call(y, x, A, B_rows, scales, idx, coef, ranks)
    if not direct:
        out.add_(y)


def backward(grad, x, A, B, scales, idx, weights, ranks, need_x: bool, need_weights: bool):
    """(dx or None, dweights or None) for frozen adapters: one fused pass (kernels/cpu_mixture.cpp, backward)."""
    grad, x, A, B_rows = _rows(grad.to(x.dtype)), _rows(x), _rows(A), _rows_of_B(B)
    scales, idx, coef, ranks = _small(scales, idx, weights, ranks, x.dtype)
    dx = torch.zeros_like(x) if need_x else None
    dweights = torch.empty(idx.shape, dtype=x.dtype) if need_weights else None
    if idx.numel() and (need_x or need_weights):
        T, k = idx.shape
        N, r_max, d_in = A.shape
        fn = _function("am_backward", x.dtype)
        _check(fn(None if dx is None else dx.data_ptr(), 0 if dx is None else dx.stride(0),
                  None if dweights is None else dweights.data_ptr(), x.data_ptr(), x.stride(0), grad.data_ptr(),
                  grad.stride(0), A.data_ptr(), A.stride(0), A.stride(1), B_rows.data_ptr(), B_rows.stride(0),
                  B_rows.stride(1), scales.data_ptr(), idx.data_ptr(), coef.data_ptr(), ranks.data_ptr(), T, k, N,
                  r_max, d_in, B_rows.shape[2]))
    elif need_weights:
        dweights.zero_()
    return dx, (None if dweights is None else dweights.to(weights.dtype))

