"""Triton kernels for small batches (decode): one program per (token, slot) entry or per (token, d_out
tile), BGMV-style. No routing plan, no sort: two launches in all.

    shrink:  h[t·k + j] = w[t, j] · s_e · x[t] @ A[e, :r_e].T          grid (T·k,)
    expand:  out[t, tile] += sum_j h[t·k + j] @ B[e_tj, tile].T         grid (T, d_out / BN)

Each expand program owns one token's output tile and adds every slot's contribution to it in float32
before one read-modify-write: deterministic, no atomics. Adapter factors are read once per entry
(from L2 when the library is small); at large T the grouped GEMM of triton_shrink / triton_expand reads
each adapter once per block of tokens instead, so it takes over above configs.BGMV_MAX_TOKENS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import bgmv_config

__all__ = ["bgmv_forward_"]


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, idx_ptr, w_ptr, scales_ptr, ranks_ptr, k, N, d_in,
    stride_xt, stride_xd, stride_an, stride_ar, stride_ad, stride_wt, stride_wk,
    BR: tl.constexpr, BK: tl.constexpr,
):
    entry = tl.program_id(0)
    t = entry // k
    j = entry % k
    e = tl.load(idx_ptr + entry)
    routed = (e >= 0) & (e < N)                                       # ids past the stack (unvalidated): empty
    adapter = tl.where(routed, e, 0)
    r = tl.arange(0, BR)
    r_ok = r < tl.where(routed, tl.load(ranks_ptr + adapter), 0)      # an empty slot: no columns, h = 0
    acc = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < d_in
        x = tl.load(x_ptr + t * stride_xt + kk * stride_xd, mask=k_ok, other=0.0).to(tl.float32)        # (BK,)
        a = tl.load(a_ptr + adapter.to(tl.int64) * stride_an + r[None, :] * stride_ar + kk[:, None] * stride_ad,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)                        # (BK, BR)
        acc += tl.sum(x[:, None] * a, axis=0)
    coef = tl.load(w_ptr + t * stride_wt + j * stride_wk).to(tl.float32) * tl.load(scales_ptr + adapter).to(tl.float32)
    tl.store(h_ptr + entry * BR + r, tl.where(r_ok, acc * coef, 0.0))


@triton.jit
def _bgmv_expand_kernel(
    h_ptr, b_ptr, out_ptr, idx_ptr, k, N, d_out, r_max, stride_bn, stride_bo, stride_br, stride_ot, stride_od,
    BN: tl.constexpr, BR: tl.constexpr,
):
    t = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < d_out
    r = tl.arange(0, BR)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in range(0, k):
        entry = t * k + j
        e = tl.load(idx_ptr + entry)
        adapter = tl.where((e >= 0) & (e < N), e, 0)               # an empty slot has h = 0
        h = tl.load(h_ptr + entry * BR + r)                        # (BR,) float32
        b = tl.load(b_ptr + adapter.to(tl.int64) * stride_bn + n[:, None] * stride_bo + r[None, :] * stride_br,
                    mask=n_ok[:, None] & (r[None, :] < r_max), other=0.0).to(tl.float32)              # (BN, BR)
        acc += tl.sum(b * h[None, :], axis=1)
    out_ptrs = out_ptr + t * stride_ot + n * stride_od
    current = tl.load(out_ptrs, mask=n_ok, other=0.0)
    tl.store(out_ptrs, (current.to(tl.float32) + acc).to(current.dtype), mask=n_ok)


def bgmv_forward_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture, in place, with the per-entry kernels."""
    T, k = idx.shape
    N, r_max, d_in = A.shape
    d_out = B.shape[1]
    cfg = bgmv_config(r_max, d_in, d_out)
    flat = idx.contiguous().view(-1)
    h = torch.empty(T * k, cfg.BR, dtype=torch.float32, device=x.device)
    _bgmv_shrink_kernel[(T * k,)](
        x, A, h, flat, weights, scales, ranks, k, N, d_in, x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        A.stride(2), weights.stride(0), weights.stride(1), BR=cfg.BR, BK=cfg.BK, num_warps=cfg.num_warps)
    _bgmv_expand_kernel[(T, triton.cdiv(d_out, cfg.BN))](
        h, B, out, flat, k, N, d_out, r_max, B.stride(0), B.stride(1), B.stride(2), out.stride(0), out.stride(1),
        BN=cfg.BN, BR=cfg.BR, num_warps=cfg.num_warps)
