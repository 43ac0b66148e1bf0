"""Argument checks of `lora_mixture`: every message names the argument at fault."""

from __future__ import annotations

import torch

__all__ = ["check_inputs"]


def _expect(condition: bool, error, message) -> None:
    """message: a str, or a function making it (f-strings formatting shapes cost microseconds per call)."""
    if not condition:
        raise error(message() if callable(message) else message)


def check_inputs(x, A, B, scales, idx, weights, ranks, base, validate: bool) -> torch.Tensor:
    """Validate and return ranks as an int32 (N,) tensor on x's device."""
    tensors = dict(x=x, A=A, B=B, scales=scales, idx=idx, weights=weights)
    for name, value in tensors.items():
        _expect(isinstance(value, torch.Tensor), TypeError,
                lambda: f"{name} must be a torch.Tensor, got {type(value).__name__}")
    _expect(x.dim() == 2, ValueError, lambda: f"x must be (T, d_in), got shape {tuple(x.shape)}")
    _expect(A.dim() == 3, ValueError, lambda: f"A must be (N, r_max, d_in), got shape {tuple(A.shape)}")
    _expect(B.dim() == 3, ValueError, lambda: f"B must be (N, d_out, r_max), got shape {tuple(B.shape)}")
    T, d_in = x.shape
    N, r_max, _ = A.shape
    d_out = B.shape[1]
    _expect(A.shape[2] == d_in, ValueError, lambda: f"A's last dim {A.shape[2]} != x's d_in {d_in}")
    _expect(B.shape[0] == N and B.shape[2] == r_max, ValueError,
            lambda: f"B must be (N={N}, d_out, r_max={r_max}), got {tuple(B.shape)}")
    _expect(N >= 1 and r_max >= 1, ValueError,
            lambda: f"A must hold at least one adapter of rank >= 1, got {tuple(A.shape)}")
    _expect(scales.shape == (N,), ValueError, lambda: f"scales must be (N={N},), got {tuple(scales.shape)}")
    _expect(idx.dim() == 2 and idx.shape[0] == T, ValueError, lambda: f"idx must be (T={T}, k), got {tuple(idx.shape)}")
    _expect(weights.shape == idx.shape, ValueError,
            lambda: f"weights must match idx {tuple(idx.shape)}, got {tuple(weights.shape)}")
    _expect(x.dtype.is_floating_point, TypeError, lambda: f"x must be floating point, got {x.dtype}")
    for name in ("A", "B"):
        _expect(tensors[name].dtype == x.dtype, TypeError,
                lambda: f"{name} has dtype {tensors[name].dtype}, x has {x.dtype}")
    _expect(scales.dtype.is_floating_point, TypeError, lambda: f"scales must be floating point, got {scales.dtype}")
    _expect(weights.dtype.is_floating_point, TypeError, lambda: f"weights must be floating point, got {weights.dtype}")
    _expect(not idx.dtype.is_floating_point and idx.dtype != torch.bool, TypeError,
            lambda: f"idx must be an integer tensor, got {idx.dtype}")
    for name, value in tensors.items():
        _expect(value.device == x.device, ValueError, lambda: f"{name} is on {value.device}, x is on {x.device}")
    if base is not None:
        _expect(isinstance(base, torch.Tensor) and base.shape == (T, d_out), ValueError,
                lambda: f"base/out must be (T={T}, d_out={d_out}), got {tuple(getattr(base, 'shape', ()))}")
        _expect(base.device == x.device, ValueError, lambda: f"base/out is on {base.device}, x is on {x.device}")
        _expect(base.dtype.is_floating_point, TypeError, lambda: f"base/out must be floating point, got {base.dtype}")
    if ranks is None:
        ranks = torch.full((N,), r_max, dtype=torch.int32, device=x.device)
    else:
        ranks = torch.as_tensor(ranks, device=x.device)
        _expect(ranks.shape == (N,) and not ranks.dtype.is_floating_point, ValueError,
                lambda: f"ranks must be (N={N},) integers, got {tuple(ranks.shape)} {ranks.dtype}")
        ranks = ranks.to(torch.int32)
    if validate and idx.numel():
        low, high = int(idx.min()), int(idx.max())
        _expect(low >= -1 and high < N, ValueError,
                lambda: f"idx must lie in [-1, N={N}), found values in [{low}, {high}]")
    if validate:
        _expect(bool(torch.isfinite(weights).all()), ValueError, "weights contain NaN or Inf")
        _expect(bool(torch.isfinite(scales).all()), ValueError, "scales contain NaN or Inf")
        if N:
            low, high = int(ranks.min()), int(ranks.max())
            _expect(low >= 1 and high <= r_max, ValueError,
                    lambda: f"ranks must lie in [1, r_max={r_max}], found [{low}, {high}]")
    return ranks
