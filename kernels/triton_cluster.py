"""Triton clustered kernel for mid-size stacks: the fused kernel's single pass over each block's own adapters.

The fused kernel (triton_fused.py) reads x once and writes out once, but multiplies every token by all N·r
rank rows, so it stops at small stacks. Here the tokens are first ordered so that tokens routed to the
same adapters sit side by side (`token_order`: one row sort and one argsort, no host sync); then each
program takes BM consecutive tokens of that order and works only on the adapters they use:

    used   = the adapters some token of the block routes to (compared against 0..N in registers)
    pass p = the used adapters ranked p·G .. p·G + G - 1; column c = g·RP + i is rank row i of the g-th
    h      = x[block] @ A_cols.T over d_in (float32), gated by the routing as in the fused kernel
    out[block] += h @ B_cols                                   one read-modify-write of out per pass

Two launches: the first runs every block's first pass in straight-line code (the registers of one pass:
with the pass loop in the same kernel the sm_90a build needed 172 instead of 114), the second the later
passes of the blocks that use more than G adapters (the others return at once); the second starts after
the first, so no two programs write one row of out at once.

With U adapters in a block it runs ceil(U / G) passes (G = C / RP adapters each). When tokens that share
adapters cluster (per-sequence batches; top-k routing over a few dozen adapters, sorted), U is small and
one pass does it: the fused kernel's traffic (x read once, out read and written once) at C·(1/d_in + 1/d_out)
of the base GEMM's flops, for stacks too wide for the fused kernel. With many adapters and scattered
routing U grows, and each extra pass costs one more read-modify-write of the block's rows of out: the
grouped GEMM (triton_plan / shrink / expand) is then the better choice. `auto` does not pick this kernel
until it has been timed on a GPU (configs.CLUSTER_AUTO_MAX_ADAPTERS); pin it with
configs.pin_triton_strategy("cluster"). The backward pass runs on the grouped GEMM.

Design limits: N <= configs.CLUSTER_MAX_ADAPTERS (the used-adapter vector lives in registers), RP =
next power of two >= r_max, at most C; any strides; fp32 / fp16 / bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cluster_config, dot_precision
from .triton_common import project
from .triton_fused import _gate_expand

__all__ = ["cluster_forward_", "token_order"]


@triton.jit
def _pass_columns(used, rank, p, ranks_ptr, r_max, N_PAD: tl.constexpr, G: tl.constexpr, RP: tl.constexpr):
    """Adapter, rank row and liveness of each of the C = G·RP columns of pass p: slot g holds the used
    adapter of rank p·G + g (none past the last)."""
    slots = tl.arange(0, G)
    pick = (used[None, :] > 0) & (rank[None, :] == (p * G + slots)[:, None])                 # (G, N_PAD)
    chosen = tl.sum(tl.where(pick, tl.arange(0, N_PAD)[None, :], 0), axis=1)                 # (G,)
    exists = tl.sum(pick.to(tl.int32), axis=1)                                                 # (G,) 0 / 1
    column_slot = tl.arange(0, G * RP) // RP
    same = column_slot[:, None] == slots[None, :]                                              # (C, G)
    adapter = tl.sum(tl.where(same, chosen[None, :], 0), axis=1)                               # (C,)
    present = tl.sum(tl.where(same, exists[None, :], 0), axis=1) > 0
    rank_row = tl.arange(0, G * RP) % RP
    rank_ok = tl.load(ranks_ptr + adapter, mask=present, other=0)
    live = present & (rank_row < r_max) & (rank_row < rank_ok)
    return tl.where(present, adapter, -2), rank_row, live


@triton.jit
def _cluster_pass(x_ptr, a_ptr, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, ranks_ptr, rows, row_ok, used, rank, p,
                  k, r_max, d_in, n_start, n_end, stride_xt, stride_xd, stride_an, stride_ar, stride_ad, stride_bn,
                  stride_bo, stride_br, stride_ot, stride_od, stride_it, stride_ik, stride_wt, stride_wk,
                  BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, RP: tl.constexpr,
                  N_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """out[rows, n_start:n_end] += the mixture through the block's used adapters of rank p·G .. p·G + G - 1."""
    adapter, rank_row, live = _pass_columns(used, rank, p, ranks_ptr, r_max, N_PAD, G, RP)
    h = project(x_ptr, a_ptr, rows, row_ok, adapter, rank_row, live, d_in, stride_xt, stride_xd,
                stride_an, stride_ar, stride_ad, BM, BK, G * RP, False, PRECISION)          # (BM, C)
    _gate_expand(h, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, rows, row_ok, adapter, rank_row, live, k, n_start,
                 n_end, stride_bn, stride_bo, stride_br, stride_ot, stride_od, stride_it, stride_ik, stride_wt,
                 stride_wk, BM, BN, G * RP, False, PRECISION)


@triton.jit
def _cluster_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, ranks_ptr, order_ptr,
    T, N, k, r_max, d_in, d_out, split, chunk,
    stride_xt, stride_xd, stride_an, stride_ar, stride_ad, stride_bn, stride_bo, stride_br,
    stride_ot, stride_od, stride_it, stride_ik, stride_wt, stride_wk,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, RP: tl.constexpr,
    N_PAD: tl.constexpr, PRECISION: tl.constexpr, LATER_PASSES: tl.constexpr,
):
    """The first pass of every token block (LATER_PASSES False: straight-line code, the register count of
    one pass), or the passes after it of the blocks that need them (True: a second launch, after the first,
    so no two programs write one row of out at once; blocks of one pass return at once)."""
    block = tl.program_id(0) // split
    part = tl.program_id(0) % split
    position = block * BM + tl.arange(0, BM)
    row_ok = position < T
    rows = tl.load(order_ptr + position, mask=row_ok, other=0)                                 # token ids
    # the adapters this block's tokens use, and each one's rank among them
    adapters = tl.arange(0, N_PAD)
    used = tl.zeros((N_PAD,), dtype=tl.int32)
    for j in range(0, k):
        e = tl.load(idx_ptr + rows * stride_it + j * stride_ik, mask=row_ok, other=-1)
        hit = (e[:, None] == adapters[None, :]) & (adapters < N)[None, :]   # ids >= N (unvalidated) read nothing
        used = tl.maximum(used, tl.max(hit.to(tl.int32), axis=0))
    rank = tl.cumsum(used, axis=0) - used
    passes = (tl.sum(used, axis=0) + G - 1) // G
    n_start = part * chunk
    n_end = tl.minimum(n_start + chunk, d_out)
    if LATER_PASSES:
        for p in range(1, passes):
            _cluster_pass(x_ptr, a_ptr, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, ranks_ptr, rows, row_ok, used,
                          rank, p, k, r_max, d_in, n_start, n_end, stride_xt, stride_xd, stride_an, stride_ar,
                          stride_ad, stride_bn, stride_bo, stride_br, stride_ot, stride_od, stride_it, stride_ik,
                          stride_wt, stride_wk, BM, BK, BN, G, RP, N_PAD, PRECISION)
    elif passes > 0:
        _cluster_pass(x_ptr, a_ptr, b_ptr, out_ptr, idx_ptr, w_ptr, scales_ptr, ranks_ptr, rows, row_ok, used,
                      rank, 0, k, r_max, d_in, n_start, n_end, stride_xt, stride_xd, stride_an, stride_ar,
                      stride_ad, stride_bn, stride_bo, stride_br, stride_ot, stride_od, stride_it, stride_ik,
                      stride_wt, stride_wk, BM, BK, BN, G, RP, N_PAD, PRECISION)


def token_order(idx: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """(T,) int32 token ids ordered so that tokens routed to the same adapters are adjacent: by their
    sorted adapter ids, compared from the smallest (empty slots, -1, count as smallest). Keys use as many
    of a token's largest ids as fit in 62 bits (all of them for k = 2 and N up to 2^31)."""
    T, k = idx.shape
    base = num_adapters + 1
    digits = 1
    while digits < k and base ** (digits + 1) < 2 ** 62:
        digits += 1
    ids = torch.sort(idx, dim=1).values[:, k - digits:] + 1                                    # (T, digits)
    key = ids[:, 0]
    for i in range(1, digits):       # device ops only (no host tensor): CUDA graphs capture it
        key = key * base + ids[:, i]
    return torch.argsort(key).to(torch.int32)


def cluster_forward_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture, in place: token_order, then two launches (every block's first pass; the later passes
    of the blocks that need them); A (N, r_max, d_in) and B (N, d_out, r_max) of any strides."""
    T = x.shape[0]
    N, r_max, d_in = A.shape
    d_out = B.shape[1]
    cfg = cluster_config(N, r_max, T, d_out, x.device)
    order = token_order(idx, N)
    blocks = triton.cdiv(T, cfg.BM)
    chunk, split = cfg.d_out_chunks(d_out)
    for later in (False, True):
        _cluster_kernel[(blocks * split,)](
            x, A, B, out, idx, weights, scales, ranks, order, T, N, idx.shape[1], r_max, d_in, d_out, split, chunk,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), B.stride(0), B.stride(1), B.stride(2),
            out.stride(0), out.stride(1), idx.stride(0), idx.stride(1), weights.stride(0), weights.stride(1),
            BM=cfg.BM, BK=cfg.BK, BN=cfg.BN, G=cfg.G, RP=cfg.RP, N_PAD=cfg.N_PAD, PRECISION=dot_precision(x.dtype),
            LATER_PASSES=later, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
