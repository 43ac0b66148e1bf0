"""`lora_mixture`: a linear layer's output plus a per-token mixture of LoRA adapters.

    T = tokens, N = adapters in the stack, r = rank (per adapter, <= r_max), k = adapters per token
    y = base
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            if e >= 0:                                   # -1: empty slot
                y[t] += weights[t, j] * scales[e] * (x[t] @ A[e, :ranks[e]].T) @ B[e, :, :ranks[e]].T

Backends: `reference` (the definition, autograd through plain torch), `torch` (dense GEMMs over the used
adapters, a pass over runs of tokens routed alike, the routing as a sparse CSR matrix (sampled product, then
sparse-dense product), or segmented matmuls: kernels/torch_backend.py), `triton` (kernels/triton_backend.py:
fused token-major kernels for small stacks, else per-entry or grouped-GEMM kernels) and `cpu` (one fused
native pass over the tokens, kernels/cpu_backend.py; 'auto' on a CPU when it builds). The triton backend's
grouped GEMM (and the torch backend's sorted pass) group the routed (token, slot) entries by adapter and run
two primitives over the groups: `shrink` (h = coef * x @ A[e].T, float32 accumulate, ranks masked) and
`expand` (out[token] += h @ B[e].T). The backward pass (adapters frozen) reuses them: dx is the same mixture
with A and B swapped (transposed views), d(weights) comes from two shrinks.
Entries past an adapter's rank are ignored; they must be finite.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from .reference import lora_mixture_reference

__all__ = ["lora_mixture", "BACKENDS", "resolve_backend"]

BACKENDS = ("reference", "torch", "triton", "cpu")
_PRIMITIVES = {"torch": "adaptermix.kernels.torch_backend", "triton": "adaptermix.kernels.triton_backend",
               "cpu": "adaptermix.kernels.cpu_backend"}


@functools.cache
def _primitives(backend: str):
    """The backend's module, imported on first use (cached: importlib's lookup cost ~1 us a call)."""
    return importlib.import_module(_PRIMITIVES[backend])


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None   # a constant: torch.compile traces this


def triton_usable(device: torch.device) -> bool:
    from .configs import interpreting

    if device.type == "cuda":
        return _TRITON_INSTALLED
    return device.type == "cpu" and interpreting()


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64)


def cpu_usable() -> bool:
    """The native CPU kernels are built (building them on first use; never while torch.compile traces)."""
    from . import cpu_backend

    return cpu_backend.ready() if torch.compiler.is_compiling() else cpu_backend.available()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'auto' -> 'triton' on a CUDA GPU with Triton (fp32 / fp16 / bf16), 'cpu' on a CPU for fp32 / fp64
    when its kernels build, else 'torch'. Explicit names are checked."""
    if backend == "auto":
        if device.type == "cuda" and dtype in TRITON_DTYPES and triton_usable(device):
            return "triton"
        if device.type == "cpu" and dtype in CPU_DTYPES and cpu_usable():
            return "cpu"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the cpu backend runs on the CPU; x is on {device}")
        if dtype not in CPU_DTYPES:
            raise TypeError(f"the cpu backend takes x in {CPU_DTYPES}, got {dtype}")
        if not cpu_usable():
            from . import cpu_backend

            if cpu_backend.build_error() is None:   # tracing: the build never runs inside torch.compile
                raise RuntimeError("the cpu backend's kernels are not built yet: call "
                                   "adaptermix.kernels.cpu_backend.available() once before torch.compile")
            raise RuntimeError(f"the cpu backend's native kernels could not be built: {cpu_backend.build_error()}")
    if backend == "triton" and not triton_usable(device):
        raise ValueError(f"the triton backend needs a CUDA device (or TRITON_INTERPRET=1 on CPU); got {device}")
    if backend == "triton" and dtype not in TRITON_DTYPES:
        raise TypeError(f"the triton backend takes x in {TRITON_DTYPES}, got {dtype}")
    return backend


# -- dispatch to the backend modules ------------------------------------------------------------------

def mixture_forward_(out, x, A, B, scales, idx, weights, ranks, backend: str) -> None:
    """out += mixture, in place."""
    _primitives(backend).forward_(out, x, A, B, scales, idx, weights, ranks)


def mixture_backward(grad, x, A, B, scales, idx, weights, ranks, backend: str, need_x: bool, need_weights: bool):
    """(dx (T, d_in) or None, dweights (T, k) or None) for frozen adapters."""
    return _primitives(backend).backward(grad, x, A, B, scales, idx, weights, ranks, need_x, need_weights)


# -- registered ops (torch.compile / CUDA graphs see them through their fake implementations) ---------

@torch.library.custom_op("adaptermix::lora_mixture", mutates_args=())
def _mixture_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, ranks: torch.Tensor, base: torch.Tensor, backend: str) -> torch.Tensor:
    out = base.clone()
    mixture_forward_(out, x, A, B, scales, idx, weights, ranks, backend)
    return out


@_mixture_op.register_fake
def _(x, A, B, scales, idx, weights, ranks, base, backend):
    return torch.empty_like(base)


def _setup_context(ctx, inputs, output):
    x, A, B, scales, idx, weights, ranks, base, backend = inputs
    ctx.save_for_backward(x, A, B, scales, idx, weights, ranks)
    ctx.backend = backend


@torch.library.custom_op("adaptermix::lora_mixture_backward", mutates_args=())
def _mixture_backward_op(grad: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         scales: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, ranks: torch.Tensor,
                         backend: str, need_x: bool, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweights); one not needed comes back empty (0 elements)."""
    dx, dweights = mixture_backward(grad, x, A, B, scales, idx, weights, ranks, backend, need_x, need_weights)
    return (dx if need_x else x.new_empty(0)), (dweights if need_weights else weights.new_empty(0))


@_mixture_backward_op.register_fake
def _(grad, x, A, B, scales, idx, weights, ranks, backend, need_x, need_weights):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), \
           (torch.empty_like(weights) if need_weights else weights.new_empty(0))


def _backward(ctx, grad):
    x, A, B, scales, idx, weights, ranks = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dweights = _mixture_backward_op(grad.contiguous(), x, A, B, scales, idx, weights, ranks, ctx.backend,
                                        needs[0], needs[5])
    return (dx if needs[0] else None, None, None, None, None, dweights if needs[5] else None, None,
            grad if needs[7] else None, None)


_mixture_op.register_autograd(_backward, setup_context=_setup_context)


class _MixtureFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scales, idx, weights, ranks, base, backend):
        out = base.clone()
        mixture_forward_(out, x, A, B, scales, idx, weights, ranks, backend)
        ctx.save_for_backward(x, A, B, scales, idx, weights, ranks)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, B, scales, idx, weights, ranks = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dweights = mixture_backward(grad.contiguous(), x, A, B, scales, idx, weights, ranks, ctx.backend,
                                        needs[0], needs[5])
        return dx, None, None, None, None, dweights, None, (grad if needs[7] else None), None


@torch.library.custom_op("adaptermix::lora_mixture_", mutates_args=("out",))
def _mixture_inplace_op(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        scales: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, ranks: torch.Tensor,
                        backend: str) -> None:
    mixture_forward_(out, x, A, B, scales, idx, weights, ranks, backend)


@_mixture_inplace_op.register_fake
def _(out, x, A, B, scales, idx, weights, ranks, backend):
    return None


# -- the public op ---------------------------------------------------------------------------------

def lora_mixture(x, A, B, scales, idx, weights, *, ranks=None, base=None, out=None, backend: str = "auto",
                 validate: bool = True) -> torch.Tensor:
    """base (or out) + the per-token mixture of LoRA adapters; see the module docstring for the semantics.

    Args:
        x: (T, d_in) layer input.
        A: (N, r_max, d_in), B: (N, d_out, r_max): the stacked factors, x's dtype and device.
        scales: (N,) per-adapter scale (alpha / r).
        idx: (T, k) integer adapter ids, -1 for an empty slot; an adapter may repeat within a token.
        weights: (T, k) finite gate weights.
        ranks: (N,) integer ranks in [1, r_max]; None means every adapter has rank r_max.
        base: (T, d_out) added to the mixture (the base layer's output); None means zeros.
        out: (T, d_out) accumulated into in place and returned (inference: not differentiable).
        backend: 'auto', 'reference', 'torch', 'triton' or 'cpu'.
        validate: check shapes, dtypes, devices, idx range and finiteness (the last two sync the device).
            validate=False trusts idx: ids outside [-1, N) are then refused by the cpu backend and count
            as empty slots on the torch and Triton backends (which cannot raise without a device sync);
            no backend reads outside the stacks.
    Returns:
        (T, d_out). Without `out`, a new tensor, differentiable with respect to x, weights and base.
    """
    from .validation import check_inputs

    if out is not None and base is not None:
        raise ValueError("pass either base= (returns a new tensor) or out= (accumulates in place), not both")
    ranks = check_inputs(x, A, B, scales, idx, weights, ranks, base if out is None else out, validate)
    idx = idx.long()
    backend = resolve_backend(backend, x.device, x.dtype)
    if backend == "reference":
        y = lora_mixture_reference(x, A, B, scales, idx, weights, ranks=ranks, base=base if out is None else out)
        return out.copy_(y) if out is not None else y
    if out is not None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, out)):
            raise ValueError("out= accumulates in place and is not differentiable; use base= for training")
        if torch.compiler.is_compiling():
            _mixture_inplace_op(out, x, A, B, scales, idx, weights, ranks, backend)
        else:  # eager: skip the dispatcher's Python overhead (~0.1-0.4 ms a call on CPU)
            mixture_forward_(out, x, A, B, scales, idx, weights, ranks, backend)
        return out
    if base is None:
        base = x.new_zeros(x.shape[0], B.shape[1])
    if not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad or base.requires_grad)):
        out = base.clone()                       # nothing to differentiate: no autograd.Function (~5 us)
        mixture_forward_(out, x, A, B, scales, idx, weights, ranks, backend)
        return out
    if torch.compiler.is_compiling():
        return _mixture_op(x, A, B, scales, idx, weights, ranks, base, backend)
    # Eager: the same forward / backward through a plain autograd.Function (less per-call overhead than
    # the custom-op dispatcher); the registered op serves torch.compile / CUDA graphs.
    return _MixtureFunction.apply(x, A, B, scales, idx, weights, ranks, base, backend)
