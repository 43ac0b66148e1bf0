"""The definition of the LoRA mixture, in plain PyTorch: the oracle every backend is tested against.

    T = tokens, N = adapters in the stack, r = rank (r_max padded), k = adapters per token
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            if e >= 0:
                y[t] += w[t, j] * s[e] * (x[t] @ A[e, :r_e].T) @ B[e, :, :r_e].T
"""

from __future__ import annotations

import torch

__all__ = ["lora_mixture_reference"]


def lora_mixture_reference(x, A, B, scales, idx, weights, *, ranks=None, base=None, upcast: bool = False):
    """Args:
        x: (T, d_in); A: (N, r_max, d_in); B: (N, d_out, r_max); scales: (N,); idx: (T, k) int, -1 = empty
        slot; weights: (T, k); ranks: (N,) or None (= r_max); base: (T, d_out) or None.
        upcast: compute in float64 and return in x's dtype.
    Returns (T, d_out). Differentiable through plain autograd (it gathers (T, k, r, d): tests only).
    """
    dtype = x.dtype
    if upcast:
        x, A, B, scales, weights = (t.double() for t in (x, A, B, scales, weights))
        base = None if base is None else base.double()
    N, r_max = A.shape[0], A.shape[1]
    ranks = torch.full((N,), r_max, device=x.device) if ranks is None else ranks
    keep = torch.arange(r_max, device=x.device)[None, :] < ranks[:, None]          # (N, r_max)
    A = torch.where(keep[:, :, None], A, torch.zeros((), dtype=A.dtype, device=A.device))
    B = torch.where(keep[:, None, :], B, torch.zeros((), dtype=B.dtype, device=B.device))
    y = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device) if base is None else base.to(x.dtype)
    for j in range(idx.shape[1]):
        valid = idx[:, j] >= 0                                                    # (T,)
        e = idx[:, j].clamp_min(0)
        h = torch.einsum("td,trd->tr", x, A[e])                                   # (T, r_max)
        update = torch.einsum("tr,tor->to", h, B[e])                              # (T, d_out)
        coef = torch.where(valid, weights[:, j] * scales[e], torch.zeros((), dtype=x.dtype, device=x.device))
        y = y + coef[:, None] * update
    return y.to(dtype) if upcast else y
