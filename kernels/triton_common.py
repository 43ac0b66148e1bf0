"""Device helpers shared by the Triton kernels (inlined by Triton at compile time)."""

import triton
import triton.language as tl

__all__ = ["find_block"]


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
