"""Torch backend: segmented matmuls over the adapters actually used, or, when those are few, two dense
GEMMs over just them (chosen per shape by a cost model, kernels/configs.py).

Forward: `forward_sorted_` sorts all (token, slot) pairs by adapter once and runs chunks of rows, each with
one grouped matmul per factor; `forward_dense_` multiplies by the used adapters' stacked factors.
Backward (and the Triton-shaped per-slot algorithm in kernels/mixture.py): `shrink` / `expand`.

In the segmented paths rows are sorted by adapter; each adapter's segment is multiplied by its own factor
with one `torch._grouped_mm` call (a C++ loop over groups on CPU, a grouped GEMM on CUDA). Where that op is
missing or refuses the dtype / layout (float64, unaligned CUDA shapes), a Python loop over the *used*
adapters does the same. Scratch per call: the gathered rows (P, d) and their result (P, d'): at most
input- and output-sized, never (T, k, d) nor (T, k, r, d).
"""

from __future__ import annotations

import torch

from .configs import TORCH_COST
from .plan import SlotPlan, accumulator_dtype, plan_slot, sort_by_adapter

__all__ = ["forward_", "backward", "shrink", "expand", "grouped_matmul", "prefer_dense", "forward_dense_",
           "forward_sorted_", "known_ids"]


def _loop_grouped(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = rows.new_zeros(rows.shape[0], weights.shape[2])
    ends = offsets.tolist()
    start = 0
    for adapter, end in enumerate(ends):
        if end > start:
            out[start:end] = rows[start:end] @ weights[adapter]
        start = end
    return out


def _grouped_mm_usable(rows: torch.Tensor, weights: torch.Tensor) -> bool:
    """torch._grouped_mm takes fp32 / fp16 / bf16 with 16-byte aligned strides (bf16 only on CUDA)."""
    if not hasattr(torch, "_grouped_mm") or rows.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if rows.is_cuda and rows.dtype != torch.bfloat16:
        return False
    per_16_bytes = 16 // rows.element_size()
    return all(d % per_16_bytes == 0 for d in (rows.shape[1], weights.shape[1], weights.shape[2]))


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows (P, K) sorted by group, weights (N, K, M), offsets (N,) int32 group ends -> (P, M)."""
    rows = rows.contiguous()
    if rows.shape[0] == 0:
        return rows.new_zeros(0, weights.shape[2])
    if _grouped_mm_usable(rows, weights):
        return torch._grouped_mm(rows, weights.to(rows.dtype), offs=offsets)
    return _loop_grouped(rows, weights.to(rows.dtype), offsets)


def _rank_mask(plan: SlotPlan, ranks: torch.Tensor | None, rows: int, r_max: int, device) -> torch.Tensor | None:
    if ranks is None:
        return None
    return torch.arange(r_max, device=device)[None, :] < ranks[plan.adapters[:rows]][:, None]   # (P, r_max)


def shrink(x: torch.Tensor, A: torch.Tensor, ranks, plan: SlotPlan, coef: torch.Tensor | None) -> torch.Tensor:
    """h[p] = coef[p] * x[token_p] @ A[e_p, :r].T in float32 (float64 for float64 x): (T, r_max), rows
    past P are zero.

    x: (T, d_in); A: (N, r_max, d_in) (any strides); coef: (T,) per sorted row or None (= 1).
    """
    P = plan.routed()
    r_max = A.shape[1]
    acc = accumulator_dtype(x.dtype)
    h = torch.zeros(plan.rows, r_max, dtype=acc, device=x.device)
    if P == 0:
        return h
    rows = torch.index_select(x, 0, plan.tokens[:P])           # index_select: ~4x faster than x[...] on CPU
    part = grouped_matmul(rows, A.transpose(1, 2), plan.offsets).to(acc)                  # (P, r_max)
    if ranks is not None and bool((ranks < r_max).any()):
        part = torch.where(_rank_mask(plan, ranks, P, r_max, x.device), part, 0.0)
    if coef is not None:
        part = part * coef[:P, None].to(acc)
    h[:P] = part
    return h


def expand(h: torch.Tensor, B: torch.Tensor, ranks, plan: SlotPlan, out: torch.Tensor) -> None:
    """out[token_p] += h[p] @ B[e_p].T for the routed rows; in place. B: (N, d_out, r_max).

    h comes from `shrink`, so its columns past each adapter's rank are zero and B's padding is ignored.
    """
    P = plan.routed()
    if P == 0:
        return
    update = grouped_matmul(h[:P].to(out.dtype), B.transpose(1, 2), plan.offsets)         # (P, d_out)
    out.index_add_(0, plan.tokens[:P], update)


# -- dense over the used adapters (forward only; the backward pass uses the segmented primitives) ----

def prefer_dense(T: int, d_in: int, d_out: int, used_rank: int, k: int, device_type: str) -> bool:
    """Two dense GEMMs over the used adapters' n·r columns, or one sorted pass? (configs.TORCH_COST)

    Dense is allowed only while n·r <= min(d_in, d_out): its (T, n·r) scratch is then no larger than x.
    """
    cost = TORCH_COST[device_type]
    if used_rank > min(d_in, d_out):
        return False
    dense = 2 * T * used_rank * (d_in + d_out)
    sorted_pass = cost["sorted_fixed"] + cost["sorted_per_pair_feature"] * k * T * (d_in + d_out)
    return dense <= sorted_pass


def used_adapters(idx: torch.Tensor, num_adapters: int, r_max: int, d: int) -> torch.Tensor:
    """The adapters idx routes to; all of them (no sort) when the whole stack is narrower than d."""
    if num_adapters * r_max <= d:
        return torch.arange(num_adapters, device=idx.device)
    used = torch.unique(idx)
    return used[used >= 0]


def forward_dense_(out, x, A, B, scales, idx, weights, ranks, used: torch.Tensor) -> None:
    """out += mixture, computed as (x @ A_used.T) * gate @ B_used over the n used adapters."""
    N, r_max, d_in = A.shape
    T, k = idx.shape
    n = used.shape[0]
    if n == 0:
        return
    acc = accumulator_dtype(x.dtype)
    position = torch.full((N + 1,), n, dtype=torch.long, device=x.device)
    position[used] = torch.arange(n, device=x.device)
    slot_pos = position[torch.where(idx >= 0, idx, N)]                                     # (T, k), n = empty
    coef = weights.to(acc) * scales.to(acc)[idx.clamp_min(0)] * (idx >= 0)                 # (T, k)
    gate = torch.zeros(T, n + 1, dtype=acc, device=x.device).scatter_add_(1, slot_pos, coef)[:, :n]
    A_used, B_used = (A, B) if n == N else (A[used], B[used])
    hidden = (x @ A_used.reshape(n * r_max, d_in).T).to(acc).view(T, n, r_max)            # (T, n, r_max)
    hidden = hidden * gate[:, :, None]
    if bool((ranks < r_max).any()):  # where, not a product: padding may overflow to inf in half precision
        keep = torch.arange(r_max, device=x.device)[None, :] < ranks[used][:, None]        # (n, r_max)
        hidden = torch.where(keep[None], hidden, 0.0)
    B_used = B_used.permute(0, 2, 1).reshape(n * r_max, B.shape[1])                         # (n·r, d_out)
    out.addmm_(hidden.view(T, n * r_max).to(out.dtype), B_used.to(out.dtype))


# -- all slots at once, in chunks (forward only) ------------------------------------------------------

CHUNK_ROWS = 1024  # a chunk holds max(T, CHUNK_ROWS) pairs: scratch is output-sized or constant


def forward_sorted_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture: every (token, slot) pair sorted by adapter once, then processed in chunks of rows;
    each chunk runs one grouped matmul per factor over just the adapters it spans."""
    N, r_max, _ = A.shape
    T, k = idx.shape
    plan = sort_by_adapter(idx.reshape(-1), N)                     # entry ids are pair ids t·k + j
    P = plan.routed()
    if P == 0:
        return
    pairs, adapters = plan.tokens[:P], plan.adapters[:P]
    tokens = pairs // k
    acc = accumulator_dtype(x.dtype)
    coef = weights.reshape(-1)[pairs].to(acc) * scales.to(acc)[adapters]                   # (P,)
    ends = plan.offsets.long()
    masked = bool((ranks < r_max).any())
    chunk = max(T, CHUNK_ROWS)
    for start in range(0, P, chunk):
        stop = min(start + chunk, P)
        first, last = int(adapters[start]), int(adapters[stop - 1])
        offsets = (ends[first:last + 1].clamp(max=stop) - start).int()                     # (G,)
        rows = torch.index_select(x, 0, tokens[start:stop])
        hidden = grouped_matmul(rows, A[first:last + 1].transpose(1, 2), offsets).to(acc)  # (C, r_max)
        if masked:
            keep = torch.arange(r_max, device=x.device)[None, :] < ranks[adapters[start:stop]][:, None]
            hidden = torch.where(keep, hidden, 0.0)
        hidden = hidden * coef[start:stop, None]
        update = grouped_matmul(hidden.to(out.dtype), B[first:last + 1].transpose(1, 2), offsets)
        out.index_add_(0, tokens[start:stop], update)


# -- the backend's entry points (kernels/mixture.py) ---------------------------------------------------

def known_ids(idx: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """idx with ids outside [-1, N) (possible when the caller skipped validation) turned into empty slots:
    no index past the stacks, on the CPU or the GPU."""
    return torch.where((idx >= 0) & (idx < num_adapters), idx, -1)


def forward_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture: dense over the used adapters or one sorted pass, whichever the cost model prefers."""
    idx = known_ids(idx, A.shape[0])
    used = used_adapters(idx, A.shape[0], A.shape[1], min(x.shape[1], B.shape[1]))
    if prefer_dense(x.shape[0], x.shape[1], B.shape[1], used.numel() * A.shape[1], idx.shape[1], x.device.type):
        forward_dense_(out, x, A, B, scales, idx, weights, ranks, used)
    else:
        forward_sorted_(out, x, A, B, scales, idx, weights, ranks)


def _coef(weights, scales, plan: SlotPlan, slot: int) -> torch.Tensor:
    """weights[t, j] * scales[e] per sorted row in the accumulator dtype, (T,); rows past P get 0."""
    N = scales.shape[0]
    acc = accumulator_dtype(weights.dtype)
    routed = plan.adapters < N
    value = weights[plan.tokens, slot].to(acc) * scales[plan.adapters.clamp_max(N - 1)].to(acc)
    return torch.where(routed, value, torch.zeros((), device=value.device))


def backward(grad, x, A, B, scales, idx, weights, ranks, need_x: bool, need_weights: bool):
    """(dx or None, dweights or None), one slot at a time."""
    N = A.shape[0]
    idx = known_ids(idx, N)
    acc = accumulator_dtype(x.dtype)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    dweights = torch.zeros(weights.shape, dtype=acc, device=x.device) if need_weights else None
    for slot in range(idx.shape[1]):
        plan = plan_slot(idx, slot, N)
        g = shrink(grad, B.transpose(1, 2), ranks, plan, None)        # (T, R): dy @ B[e]
        if need_weights:
            h = shrink(x, A, ranks, plan, None)                         # (T, R): x @ A[e].T
            scale = scales[plan.adapters.clamp_max(N - 1)].to(acc)
            dweights[plan.tokens, slot] = (h * g).sum(1) * scale * (plan.adapters < N)
        if need_x:
            expand(g * _coef(weights, scales, plan, slot)[:, None], A.transpose(1, 2), ranks, plan, dx)
    return (None if dx is None else dx.to(x.dtype)), (None if dweights is None else dweights.to(weights.dtype))
