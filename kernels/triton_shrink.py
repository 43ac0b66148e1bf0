"""Triton shrink kernel: h[p] = coef[p] * x[token_p] @ A[e_p, :r_e].T, float32 accumulate.

One program per block of BM sorted rows that all belong to one adapter (kernels/plan.py); it loops over
d_in in BK steps. Design limits: r_max <= 128 (BR = next power of two >= 16, the tl.dot minimum);
A may have any strides (a transposed view serves the backward pass); fp32 / fp16 / bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, shrink_config
from .plan import SlotPlan
from .triton_common import block_rows

__all__ = ["shrink"]


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, coef_ptr, ranks_ptr, tokens_ptr, block_adapter_ptr, block_start_ptr, block_end_ptr,
    d_in, stride_xt, stride_xd, stride_an, stride_ar, stride_ad, stride_ht,
    HAS_COEF: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    adapter = tl.load(block_adapter_ptr + block)
    if adapter < 0:
        return
    rows, row_ok, tokens = block_rows(block, block_start_ptr, block_end_ptr, tokens_ptr, BM)
    rank = tl.load(ranks_ptr + adapter)
    r = tl.arange(0, BR)
    r_ok = r < rank
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < d_in
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)                       # (BM, BK)
        a = tl.load(a_ptr + adapter.to(tl.int64) * stride_an + r[None, :] * stride_ar + k[:, None] * stride_ad,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0)                          # (BK, BR)
        acc += tl.dot(x, a.to(x.dtype), input_precision=PRECISION)
    if HAS_COEF:
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * coef[:, None]
    tl.store(h_ptr + rows[:, None] * stride_ht + r[None, :], acc, mask=row_ok[:, None] & (r[None, :] < BR))


def shrink(x: torch.Tensor, A: torch.Tensor, ranks: torch.Tensor, plan: SlotPlan,
           coef: torch.Tensor | None) -> torch.Tensor:
    """x (T, d_in), A (N, r_max, d_in), ranks (N,) int32, coef (T,) fp32 per sorted row or None
    -> h (T, BR) float32; rows past P and columns past each rank are zero."""
    N, r_max, d_in = A.shape
    cfg = shrink_config(r_max, d_in, x.dtype)
    block_adapter, block_start, block_end = plan.blocks(cfg.BM, N)
    h = torch.zeros(plan.rows, cfg.BR, dtype=torch.float32, device=x.device)
    grid = (block_adapter.shape[0],)
    _shrink_kernel[grid](
        x, A, h, coef if coef is not None else h, ranks, plan.tokens, block_adapter, block_start, block_end,
        d_in, x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), h.stride(0),
        HAS_COEF=coef is not None, BM=cfg.BM, BR=cfg.BR, BK=cfg.BK, PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps,
    )
    return h
