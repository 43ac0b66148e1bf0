"""Triton expand kernel: out[token_p, n] += h[p] @ B[e_p, n, :].T, accumulated in place.

Grid: (blocks of BM sorted rows of one adapter) x (d_out tiles of BN). Within one slot a token appears at
most once, so each output row is read-modified-written by exactly one program per tile: no atomics and
no (T, k, d_out) scratch. Design limits: as the shrink kernel; h is float32, cast to B's dtype for tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, expand_config
from .plan import SlotPlan
from .triton_common import block_rows

__all__ = ["expand"]


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, out_ptr, tokens_ptr, block_adapter_ptr, block_start_ptr, block_end_ptr,
    d_out, r_max, stride_ht, stride_bn, stride_bo, stride_br, stride_ot, stride_od,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    tile = tl.program_id(1)
    adapter = tl.load(block_adapter_ptr + block)
    if adapter < 0:
        return
    rows, row_ok, tokens = block_rows(block, block_start_ptr, block_end_ptr, tokens_ptr, BM)
    r = tl.arange(0, BR)
    n = tile * BN + tl.arange(0, BN)
    n_ok = n < d_out
    h = tl.load(h_ptr + rows[:, None] * stride_ht + r[None, :], mask=row_ok[:, None], other=0.0)   # (BM, BR)
    b = tl.load(b_ptr + adapter.to(tl.int64) * stride_bn + n[None, :] * stride_bo + r[:, None] * stride_br,
                mask=(r[:, None] < r_max) & n_ok[None, :], other=0.0)                               # (BR, BN)
    update = tl.dot(h.to(b.dtype), b, input_precision=PRECISION)                                                               # (BM, BN) fp32
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + n[None, :] * stride_od
    mask = row_ok[:, None] & n_ok[None, :]
    current = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (current.to(tl.float32) + update).to(current.dtype), mask=mask)


def expand(h: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor, plan: SlotPlan, out: torch.Tensor) -> None:
    """h (T, BR) float32 from `shrink`, B (N, d_out, r_max) any strides, out (T, d_out) updated in place."""
    N, d_out, r_max = B.shape
    cfg = expand_config(r_max, d_out, out.dtype)
    block_adapter, block_start, block_end = plan.blocks(cfg.BM, N)
    grid = (block_adapter.shape[0], triton.cdiv(d_out, cfg.BN))
    _expand_kernel[grid](
        h, B, out, plan.tokens, block_adapter, block_start, block_end,
        d_out, r_max, h.stride(0), B.stride(0), B.stride(1), B.stride(2), out.stride(0), out.stride(1),
        BM=cfg.BM, BN=cfg.BN, BR=h.shape[1], PRECISION=dot_precision(out.dtype), num_warps=cfg.num_warps,
    )
