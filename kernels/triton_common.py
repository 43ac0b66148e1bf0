"""Device helpers shared by the Triton kernels (inlined by Triton at compile time)."""

import triton
import triton.language as tl

__all__ = ["find_block", "column_offsets", "project"]


@triton.jit
def find_block(block, starts_ptr, counts_ptr, N, cap, BM: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Which (slot, adapter) segment a BM-row block of the padded layout (kernels/triton_plan.py) lies in.

    Returns (adapter, slot, rows, row_ok, live): rows are the block's BM row numbers, row_ok those inside
    the segment's routed rows; live is False for a block in padding (the program can return at once).
    The segment is found by binary search over the slot's segment starts (non-decreasing): the largest
    adapter whose start is <= the block's first row. Adapters with no rows share their successor's start,
    so the search lands on the one that owns the rows.
    """
    row0 = block * BM
    slot = row0 // cap
    base = slot * N
    lo = row0 * 0
    hi = lo + N
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go = tl.load(starts_ptr + base + mid) <= row0
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    end = tl.load(starts_ptr + base + lo) + tl.load(counts_ptr + base + lo)
    rows = row0 + tl.arange(0, BM)
    return lo, slot, rows, rows < end, row0 < end


@triton.jit
def column_offsets(adapter, rank_row, stride_n, stride_r, C: tl.constexpr, PACKED: tl.constexpr):
    """Element offset of each column's rank row in a factor stack. PACKED (stride_n == r_max·stride_r, the
    composer's layout and its transposed views) makes it affine in the column, so the compiler needs no
    per-column pointers (fewer registers: benchmarks/kernel_compile.py)."""
    if PACKED:
        return tl.arange(0, C).to(tl.int64) * stride_r
    return adapter.to(tl.int64) * stride_n + rank_row * stride_r


@triton.jit
def project(src_ptr, fac_ptr, rows, row_ok, adapter, rank_row, live, d, stride_st, stride_sd,
             stride_fn, stride_fr, stride_fd, BM: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
             PACKED: tl.constexpr, PRECISION: tl.constexpr):
    """(BM, C) float32: src[rows] @ F_cols.T over d in BK steps, F (N, r_max, d) with any strides; column c is
    rank row rank_row[c] of adapter adapter[c] (a scalar adapter: one adapter's rows), loaded where live."""
    src_rows = src_ptr + rows.to(tl.int64)[:, None] * stride_st
    fac_cols = fac_ptr + column_offsets(adapter, rank_row, stride_fn, stride_fr, C, PACKED)[None, :]
    acc = tl.zeros((BM, C), dtype=tl.float32)
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < d
        s = tl.load(src_rows + kk[None, :] * stride_sd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        f = tl.load(fac_cols + kk[:, None] * stride_fd, mask=live[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(s, f.to(s.dtype), input_precision=PRECISION)                             # (BM, C)
    return acc
