"""Triton shrink kernel: h[row] = coef * x[token] @ A[e, :r_e].T for every routed (token, slot) entry,
float32 accumulate, all slots in one launch.

One program per BM-row block of the plan (kernels/triton_plan.py); every row of a block belongs to one
(slot, adapter), so the block is one small GEMM over d_in in BK steps. coef = weights[t, j] · scales[e] is
applied in-kernel. Design limits: r_max <= 128 (BR = next power of two >= 16, the tl.dot minimum); A may
have any strides (a transposed view serves the backward pass); fp32 / fp16 / bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, shrink_config
from .triton_common import find_block, project
from .triton_plan import GroupPlan

__all__ = ["shrink"]


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, w_ptr, scales_ptr, ranks_ptr, sorted_ptr, starts_ptr, counts_ptr,
    N, k, cap, d_in, stride_xt, stride_xd, stride_an, stride_ar, stride_ad, stride_wt, stride_wk, stride_ht,
    HAS_COEF: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, PRECISION: tl.constexpr,
):
    adapter, slot, rows, row_ok, live = find_block(tl.program_id(0), starts_ptr, counts_ptr, N, cap, BM,
                                                   SEARCH_STEPS)
    if live:
        tokens = tl.load(sorted_ptr + rows, mask=row_ok, other=0) // k
        r = tl.arange(0, BR)
        r_ok = r < tl.load(ranks_ptr + adapter)
        acc = project(x_ptr, a_ptr, tokens, row_ok, adapter, r, r_ok, d_in, stride_xt, stride_xd, stride_an,
                      stride_ar, stride_ad, BM, BK, BR, False, PRECISION)                        # (BM, BR)
        if HAS_COEF:
            w = tl.load(w_ptr + tokens * stride_wt + slot * stride_wk, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * (w * tl.load(scales_ptr + adapter).to(tl.float32))[:, None]
        tl.store(h_ptr + rows[:, None] * stride_ht + r[None, :], acc, mask=row_ok[:, None])


def shrink(x: torch.Tensor, A: torch.Tensor, ranks: torch.Tensor, plan: GroupPlan,
           weights: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, d_in), A (N, r_max, d_in) any strides -> h (k·cap, BR) float32 per plan row (rows outside the
    routed entries are left unwritten; columns past each rank are zero). With weights (T, k) and scales
    (N,), each row is multiplied by weights[t, j] · scales[e]."""
    N, r_max, d_in = A.shape
    cfg = shrink_config(r_max, d_in, x.dtype)
    h = torch.empty(plan.k * plan.cap, cfg.BR, dtype=torch.float32, device=x.device)
    has_coef = weights is not None
    w = weights if has_coef else h
    _shrink_kernel[(plan.k * plan.blocks_per_slot,)](
        x, A, h, w, scales if has_coef else h, ranks, plan.sorted, plan.starts, plan.counts,
        N, plan.k, plan.cap, d_in, x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
        w.stride(0), w.stride(1), h.stride(0),
        HAS_COEF=has_coef, BM=plan.block_m, BR=cfg.BR, BK=cfg.BK, SEARCH_STEPS=plan.search_steps,
        PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h
