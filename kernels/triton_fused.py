"""Triton fused kernels for small adapter stacks: one launch, token-major, no routing plan.

    C = N·r_max columns: column c = e·r_max + i is rank row i of adapter e (A_cat = A viewed as (C, d_in))
    gate[t, c] = scales[e] · sum_j [idx[t, j] == e] · weights[t, j]           (0 for i >= ranks[e])
    out[t] += (gate ⊙ (x @ A_cat.T))[t] @ B_cat                              B_cat[c, :] = B[e, :, i]

One program owns BM tokens and one chunk of d_out columns. It forms the block's (BM, C) rank activations
in float32 over d_in, gates them with the routing (zero outside each token's k adapters, summed over
duplicate slots, -1 never matches) and expands them through every adapter at once, adding to `out` with a
single read-modify-write. Traffic is the floor of a separate pass, x read once and out read and written
once, at the price of 2·T·C·(d_in + d_out) flops: against the base GEMM's 2·T·d_in·d_out that is
C·(1/d_out + 1/d_in), 3% at C = 64 and d = 4096. So it serves small stacks only (configs.triton_strategy).
Programs of one token block that take other d_out chunks recompute the shrink (x then comes from L2).

The backward pass (adapters frozen) is the same kernel on transposed views for dx, and one more kernel for
d(weights): dweights[t, j] = scales[e] · sum_i (x @ A[e].T)[t, i] · (grad @ B[e])[t, i] with e = idx[t, j].

Design limits: C padded to a power of two <= configs.FUSED_MAX_COLUMNS (the (BM, C) float32 block lives in
registers); any strides; fp32 / fp16 / bf16; out may have another dtype (a float32 dx).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, fused_config
from .triton_common import column_offsets, project

__all__ = ["fused_forward_", "fused_backward"]


@triton.jit
def _columns(ranks_ptr, N, r_max, C: tl.constexpr):
    """Adapter and rank row of each of the C columns, and whether the column is live (inside its rank)."""
    c = tl.arange(0, C)
    adapter = c // r_max
    rank_row = c % r_max
    live = (adapter < N) & (rank_row < tl.load(ranks_ptr + adapter, mask=adapter < N, other=0))
    return adapter, rank_row, live


@triton.jit
def _gate_expand(h, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, rows, row_ok, adapter, rank_row, live, k, n_start,
                 n_end, stride_bn, stride_bo, stride_br, stride_ot, stride_od, stride_it, stride_ik, stride_wt,
                 stride_wk, BM: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, PACKED: tl.constexpr,
                 PRECISION: tl.constexpr):
    """out[rows, n_start:n_end] += (gate ⊙ h) @ B_cols: h (BM, C) float32 rank activations of the columns'
    adapters, gated by the routing (zero outside each token's k adapters, summed over duplicate slots, -1
    never matching), expanded with one read-modify-write of out."""
    gate = tl.zeros((BM, C), dtype=tl.float32)
    for j in range(0, k):
        e = tl.load(idx_ptr + rows * stride_it + j * stride_ik, mask=row_ok, other=-1)
        w = tl.load(w_ptr + rows * stride_wt + j * stride_wk, mask=row_ok, other=0.0).to(tl.float32)
        gate += tl.where(e[:, None] == adapter[None, :], w[:, None], 0.0)
    scale = tl.load(scales_ptr + adapter, mask=live, other=0.0).to(tl.float32)
    g = (h * gate * scale[None, :]).to(b_ptr.dtype.element_ty)                                 # (BM, C)
    b_rows = b_ptr + column_offsets(adapter, rank_row, stride_bn, stride_br, C, PACKED)[:, None]
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_ot
    for n0 in range(n_start, n_end, BN):
        n = n0 + tl.arange(0, BN)
        n_ok = n < n_end
        b = tl.load(b_rows + n[None, :] * stride_bo, mask=live[:, None] & n_ok[None, :], other=0.0)   # (C, BN)
        update = tl.dot(g, b, input_precision=PRECISION)                                      # (BM, BN)
        mask = row_ok[:, None] & n_ok[None, :]
        current = tl.load(out_rows + n[None, :] * stride_od, mask=mask, other=0.0)
        tl.store(out_rows + n[None, :] * stride_od, (current.to(tl.float32) + update).to(current.dtype), mask=mask)


@triton.jit
def _fused_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, ranks_ptr,
    T, N, k, r_max, d_in, d_out, split, chunk,
    stride_xt, stride_xd, stride_an, stride_ar, stride_ad, stride_bn, stride_bo, stride_br,
    stride_ot, stride_od, stride_it, stride_ik, stride_wt, stride_wk,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, A_PACKED: tl.constexpr,
    B_PACKED: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0) // split          # the d_out chunks of one token block run side by side (L2)
    part = tl.program_id(0) % split
    rows = block * BM + tl.arange(0, BM)
    row_ok = rows < T
    adapter, rank_row, live = _columns(ranks_ptr, N, r_max, C)
    h = project(x_ptr, a_ptr, rows, row_ok, adapter, rank_row, live, d_in, stride_xt, stride_xd,
                stride_an, stride_ar, stride_ad, BM, BK, C, A_PACKED, PRECISION)              # (BM, C)
    _gate_expand(h, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, rows, row_ok, adapter, rank_row, live, k,
                 part * chunk, tl.minimum(part * chunk + chunk, d_out), stride_bn, stride_bo, stride_br, stride_ot,
                 stride_od, stride_it, stride_ik, stride_wt, stride_wk, BM, BN, C, B_PACKED, PRECISION)


@triton.jit
def _fused_dweights_kernel(
    x_ptr, a_ptr, grad_ptr, b_ptr, dw_ptr, idx_ptr, scales_ptr, ranks_ptr,
    T, N, k, r_max, d_in, d_out,
    stride_xt, stride_xd, stride_an, stride_ar, stride_ad, stride_gt, stride_gd, stride_bn, stride_bo,
    stride_br, stride_it, stride_ik,
    BM: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, A_PACKED: tl.constexpr, B_PACKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < T
    adapter, rank_row, live = _columns(ranks_ptr, N, r_max, C)
    h = project(x_ptr, a_ptr, rows, row_ok, adapter, rank_row, live, d_in, stride_xt, stride_xd,
                stride_an, stride_ar, stride_ad, BM, BK, C, A_PACKED, PRECISION)              # x @ A_cat.T
    g = project(grad_ptr, b_ptr, rows, row_ok, adapter, rank_row, live, d_out, stride_gt, stride_gd,
                stride_bn, stride_br, stride_bo, BM, BK, C, B_PACKED, PRECISION)              # grad @ B_cat.T
    scale = tl.load(scales_ptr + adapter, mask=live, other=0.0).to(tl.float32)
    product = h * g * scale[None, :]                                                            # (BM, C)
    for j in range(0, k):
        e = tl.load(idx_ptr + rows * stride_it + j * stride_ik, mask=row_ok, other=-1)
        value = tl.sum(tl.where(e[:, None] == adapter[None, :], product, 0.0), axis=1)           # (BM,)
        tl.store(dw_ptr + rows * k + j, value, mask=row_ok)


def packed(factors: torch.Tensor, rank_dim: int) -> bool:
    """Adapter e's rank row i sits at (e·r_max + i)·stride_r: one adapter, or adapters back to back."""
    return factors.shape[0] == 1 or factors.stride(0) == factors.shape[rank_dim] * factors.stride(rank_dim)


def fused_forward_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture, in place, in one launch: A (N, r_max, d_in) and B (N, d_out, r_max) of any strides,
    N·r_max <= configs.FUSED_MAX_COLUMNS."""
    T = x.shape[0]
    N, r_max, d_in = A.shape
    d_out = B.shape[1]
    cfg = fused_config(N * r_max, T, d_out, x.device)
    blocks = triton.cdiv(T, cfg.BM)
    chunk, split = cfg.d_out_chunks(d_out)
    _fused_kernel[(blocks * split,)](
        x, A, B, out, idx, weights, scales, ranks, T, N, idx.shape[1], r_max, d_in, d_out, split, chunk,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), B.stride(0), B.stride(1), B.stride(2),
        out.stride(0), out.stride(1), idx.stride(0), idx.stride(1), weights.stride(0), weights.stride(1),
        BM=cfg.BM, BK=cfg.BK, BN=cfg.BN, C=cfg.C, A_PACKED=packed(A, 1), B_PACKED=packed(B, 2),
        PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def fused_backward(grad, x, A, B, scales, idx, weights, ranks, need_x: bool, need_weights: bool):
    """(dx or None, dweights or None) for frozen adapters: dx is the mixture of grad through the transposed
    factors (accumulated in float32), dweights one more launch."""
    dx = dweights = None
    if need_x:
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        fused_forward_(dx, grad, B.transpose(1, 2), A.transpose(1, 2), scales, idx, weights, ranks)
        dx = dx.to(x.dtype)
    if need_weights:
        T, k = idx.shape
        N, r_max, d_in = A.shape
        cfg = fused_config(N * r_max, T, B.shape[1], x.device)
        dw = torch.empty(T, k, dtype=torch.float32, device=x.device)
        _fused_dweights_kernel[(triton.cdiv(T, cfg.BM),)](
            x, A, grad, B, dw, idx, scales, ranks, T, N, k, r_max, d_in, B.shape[1],
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), grad.stride(0), grad.stride(1),
            B.stride(0), B.stride(1), B.stride(2), idx.stride(0), idx.stride(1),
            BM=cfg.BM, BK=cfg.BK, C=cfg.C, A_PACKED=packed(A, 1), B_PACKED=packed(B, 2),
            PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        dweights = dw.to(weights.dtype)
    return dx, dweights
