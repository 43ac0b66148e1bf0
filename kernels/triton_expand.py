"""Triton expand kernel: out[token] += h[row] @ B[e].T for the entries of one slot, accumulated in place.

Grid: (blocks of the slot's region) x (d_out tiles of BN). Within one slot a token appears at most once, so
each output element is read-modified-written by exactly one program: no atomics, deterministic, and no
(T, k, d_out) scratch. Slots run as consecutive launches on the stream. h is float32 (from `shrink`), cast
to B's dtype for tl.dot; the sum is formed in float32 and rounded once into out's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, expand_config
from .triton_common import find_block
from .triton_plan import GroupPlan

__all__ = ["expand"]


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, out_ptr, sorted_ptr, starts_ptr, counts_ptr,
    N, k, cap, first_block, d_out, r_max, stride_ht, stride_bn, stride_bo, stride_br, stride_ot, stride_od,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, SEARCH_STEPS: tl.constexpr, PRECISION: tl.constexpr,
):
    adapter, slot, rows, row_ok, live = find_block(first_block + tl.program_id(0), starts_ptr, counts_ptr, N,
                                                   cap, BM, SEARCH_STEPS)
    if live:
        tokens = tl.load(sorted_ptr + rows, mask=row_ok, other=0) // k
        r = tl.arange(0, BR)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < d_out
        h = tl.load(h_ptr + rows[:, None] * stride_ht + r[None, :], mask=row_ok[:, None], other=0.0)  # (BM, BR)
        b = tl.load(b_ptr + adapter.to(tl.int64) * stride_bn + n[None, :] * stride_bo + r[:, None] * stride_br,
                    mask=(r[:, None] < r_max) & n_ok[None, :], other=0.0)                      # (BR, BN)
        update = tl.dot(h.to(b.dtype), b, input_precision=PRECISION)                           # (BM, BN) fp32
        out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_ot + n[None, :] * stride_od
        mask = row_ok[:, None] & n_ok[None, :]
        current = tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, (current.to(tl.float32) + update).to(current.dtype), mask=mask)


def expand(h: torch.Tensor, B: torch.Tensor, plan: GroupPlan, out: torch.Tensor) -> None:
    """h (k·cap, BR) float32 from `shrink`, B (N, d_out, r_max) any strides, out (T, d_out) updated in
    place, one launch per slot."""
    N, d_out, r_max = B.shape
    cfg = expand_config(r_max, d_out, out.dtype)
    grid = (plan.blocks_per_slot, triton.cdiv(d_out, cfg.BN))
    for slot in range(plan.k):
        _expand_kernel[grid](
            h, B, out, plan.sorted, plan.starts, plan.counts,
            N, plan.k, plan.cap, slot * plan.blocks_per_slot, d_out, r_max, h.stride(0),
            B.stride(0), B.stride(1), B.stride(2), out.stride(0), out.stride(1),
            BM=plan.block_m, BN=cfg.BN, BR=h.shape[1], SEARCH_STEPS=plan.search_steps,
            PRECISION=dot_precision(out.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
