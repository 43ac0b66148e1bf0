"""The Triton backend's routing plan: every (token, slot) entry grouped by (slot, adapter), in three small
kernels and no host sync (CUDA graphs capture it; a new routing needs no re-capture).

    entry i = t·k + j routes token t to adapter e = idx[t, j] in slot j (skipped when e = -1)
    key(i) = j·N + e; segment key holds its entries at rows [starts[key], starts[key] + counts[key])

Segments are padded to a multiple of BM rows, so every BM-row block belongs to one (slot, adapter): the
grouped-GEMM kernels find it by binary search over `starts` (triton_common.find_block). Slot j's
segments lie in its own region of `cap` rows, cap = T + min(N, T)·(BM - 1) rounded up to BM: enough for
any routing, known on the host, so grids are fixed. Order within a segment comes from atomic counters and
may vary between runs; each row's result does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["GroupPlan", "group_by_adapter"]

BLOCK = 1024   # entries per program of the count / scatter kernels
CHUNK = 1024   # adapters per step of the prefix sum


@dataclass(frozen=True)
class GroupPlan:
    sorted: torch.Tensor   # (k·cap,) int32 entry id per row, -1 in padding
    starts: torch.Tensor   # (k·N,) int32 first row of each (slot, adapter) segment
    counts: torch.Tensor   # (k·N,) int32 routed entries of each segment
    cap: int               # rows per slot region (a multiple of block_m)
    block_m: int
    k: int
    N: int

    @property
    def blocks_per_slot(self) -> int:
        return self.cap // self.block_m

    @property
    def search_steps(self) -> int:
        return max(1, (self.N - 1).bit_length()) + 1


@triton.jit
def _count_kernel(idx_ptr, counts_ptr, pos_ptr, E, k, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(idx_ptr + i, mask=i < E, other=-1)
    valid = (e >= 0) & (e < N)                   # ids past the stack (unvalidated) count as empty slots
    pos = tl.atomic_add(counts_ptr + (i % k) * N + e, 1, mask=valid)
    tl.store(pos_ptr + i, pos, mask=valid)


@triton.jit
def _align_kernel(counts_ptr, starts_ptr, N, cap, BM: tl.constexpr, CHUNK: tl.constexpr):
    slot = tl.program_id(0)
    carry = slot * cap
    for c0 in range(0, N, CHUNK):
        e = c0 + tl.arange(0, CHUNK)
        ok = e < N
        padded = (tl.load(counts_ptr + slot * N + e, mask=ok, other=0) + BM - 1) // BM * BM
        tl.store(starts_ptr + slot * N + e, carry + tl.cumsum(padded, axis=0) - padded, mask=ok)
        carry += tl.sum(padded, axis=0)


@triton.jit
def _scatter_kernel(idx_ptr, starts_ptr, pos_ptr, sorted_ptr, E, k, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(idx_ptr + i, mask=i < E, other=-1)
    valid = (e >= 0) & (e < N)
    key = (i % k) * N + e
    row = tl.load(starts_ptr + key, mask=valid, other=0) + tl.load(pos_ptr + i, mask=valid, other=0)
    tl.store(sorted_ptr + row, i.to(tl.int32), mask=valid)


def group_by_adapter(idx: torch.Tensor, num_adapters: int, block_m: int) -> GroupPlan:
    """The plan of idx (T, k) with entries -1 (empty) or in [0, N)."""
    T, k = idx.shape
    N = num_adapters
    cap = triton.cdiv(T + min(N, T) * (block_m - 1), block_m) * block_m
    flat = idx.contiguous().view(-1)
    E = flat.numel()
    counts = torch.zeros(k * N, dtype=torch.int32, device=idx.device)
    starts = torch.empty(k * N, dtype=torch.int32, device=idx.device)
    pos = torch.empty(E, dtype=torch.int32, device=idx.device)
    sorted_rows = torch.full((k * cap,), -1, dtype=torch.int32, device=idx.device)
    grid = (triton.cdiv(E, BLOCK),)
    _count_kernel[grid](flat, counts, pos, E, k, N, BLOCK=BLOCK)
    _align_kernel[(k,)](counts, starts, N, cap, BM=block_m, CHUNK=CHUNK)
    _scatter_kernel[grid](flat, starts, pos, sorted_rows, E, k, N, BLOCK=BLOCK)
    return GroupPlan(sorted_rows, starts, counts, cap, block_m, k, N)
