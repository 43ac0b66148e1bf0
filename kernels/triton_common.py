"""Device helpers shared by the Triton kernels (inlined by Triton at compile time)."""

import triton
import triton.language as tl

__all__ = ["block_rows"]


@triton.jit
def block_rows(block, block_start_ptr, block_end_ptr, tokens_ptr, BM: tl.constexpr):
    """This program's BM sorted rows (all of one adapter): (rows, row_ok, token ids) from the block table."""
    start = tl.load(block_start_ptr + block)
    end = tl.load(block_end_ptr + block)
    rows = start + tl.arange(0, BM)
    row_ok = rows < end
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    return rows, row_ok, tokens
