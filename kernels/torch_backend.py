"""Torch backend: four forward strategies, chosen per call (`forward_`; configs.TORCH_COST,
TORCH_RUN_TOKENS_PER_RANK and TORCH_SEGMENTED_PASS, or pinned with configs.pin_torch_strategy):

    dense   two GEMMs over the used adapters' stacked factors: (x @ A_used.T) * gate @ B_used; only while
            n·r <= min(d_in, d_out) and the cost model prefers it (small stacks, small batches)
    runs    tokens in G runs of identical routing rows (one adapter set per sequence): x's rows are the
            groups as they lie, each run multiplies by its own k adapters' factors, gathered once (G·k·r·d);
            no row gather, no scatter, no sort; while G·r_max·4 <= T. Sequences of one length make runs of
            whole chunks of L tokens: then two batched products on (T / L, L, ·) views, the expand in place
    sparse  the routing as a sparse (T, N·r_max) CSR matrix: a sampled product for the shrink, a sparse-dense
            product into out for the expand (kernels/torch_sparse.py); the segmented pass on a CPU (products
            of half types in float32)
    sorted  every (token, slot) pair sorted by adapter once, rows processed in chunks, each chunk one
            grouped matmul per factor over the adapters it spans; the segmented pass elsewhere (CUDA)

On a CPU, half types (fp16 / bf16) multiply natively in the dense and runs passes where oneDNN has native
GEMMs for them (`native_half_gemm`: bf16 with AVX512-BF16 ran ~4.5x faster than fp32 on the AMD EPYC of
2026-12-02), and in float32 elsewhere (`compute_dtype`), where half GEMMs run several times slower than
fp32 ones; the sparse pass computes its products in float32 either way (torch.sparse has no half kernels)
and adds its expand in out's dtype. With native half GEMMs the cost model prices dense flops lower
(configs.TORCH_COST "native_half_flop") and the runs pass sits out (it trailed dense and sparse there).

Backward (adapters frozen): the sparse pass's where the segmented pass is sparse, else per slot over
`shrink` / `expand` (the Triton-shaped algorithm of kernels/mixture.py's docstring).

Grouped matmuls run as one `torch._grouped_mm` call (a C++ loop over groups on CPU, a grouped GEMM on
CUDA). Where that op is missing or refuses the dtype / layout (float64, unaligned CUDA shapes), a Python loop
over the groups does the same. Scratch per call: at most input- and output-sized (the gathered rows (P, d),
their result (P, d'), the runs pass's (T, d_out) update off a CPU, the sparse pass's T·k·r_max values),
never (T, k, d) nor (T, k, r, d). On a CPU the passes avoid (T, d_out) temporaries where they can (the
sparse pass's CSR product and the runs pass's per-run addmm_ accumulate into out): glibc tends to hand
such blocks back to the OS between calls, and the page faults of re-mapping them cost more than the
product (see forward_runs_ and kernels/torch_sparse.py).
"""

from __future__ import annotations

import functools
import math

import torch

from . import configs, torch_sparse
from .configs import TORCH_COST, TORCH_RUN_TOKENS_PER_RANK, TORCH_SEGMENTED_PASS
from .plan import SlotPlan, accumulate_, accumulator_dtype, plan_slot, slot_keys, slot_scales, sort_by_adapter
from .validation import is_full_ranks, lowest_rank

__all__ = ["forward_", "backward", "shrink", "expand", "grouped_matmul", "prefer_dense", "segmented_pass",
           "forward_dense_", "forward_runs_", "forward_sorted_", "slot_keys", "adapter_census", "dense_may_win",
           "token_runs", "few_runs", "chunk_length", "grouped_addmm_"]


def grouped_addmm_(out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> None:
    """out[group g's rows] += rows[those rows] @ weights[g], one addmm_ per non-empty group, in place;
    offsets (G,) int group ends (synced once)."""
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end].addmm_(rows[start:end], weights[group])
        start = end


def _loop_grouped(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = rows.new_zeros(rows.shape[0], weights.shape[2])
    grouped_addmm_(out, rows, weights, offsets)
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


# -- routing keys and strategy --------------------------------------------------------------------

def adapter_census(keys: torch.Tensor, num_adapters: int, r_max: int, d: int) -> tuple[int, torch.Tensor | None]:
    """(n, counts): how many adapters the keys route to, and the (N,) pair count per adapter (three ops, one
    sync); (N, None) without looking when the stack is narrower than d and the batch has pairs enough to use
    nearly every adapter (T·k >= 4N: 1 - e^-4 = 98% under uniform routing)."""
    if num_adapters * r_max <= d and keys.numel() >= 4 * num_adapters:
        return num_adapters, None
    counts = torch.bincount(keys.reshape(-1), minlength=num_adapters + 1)[:num_adapters]
    return int(torch.count_nonzero(counts)), counts


def segmented_pass(device_type: str) -> str:
    """The pass that runs where dense does not (configs.TORCH_SEGMENTED_PASS; a pinned 'sparse' or 'sorted'
    wins, forward and backward). The sparse pass runs on a CPU only, any dtype (half types in float32): its
    routing matrix has unsorted and repeated columns, which torch's CPU kernels take entry by entry (tested on
    every shape) and cuSPARSE leaves undefined (its CSR format wants sorted, distinct columns; pytorch#60277),
    so elsewhere the table cannot choose it and a pin of it is refused."""
    pinned = configs.pinned_torch_strategy()
    if pinned == "sparse" and device_type != "cpu":
        raise ValueError(f"the torch backend's sparse pass runs on the CPU only (x is on {device_type}): its "
                         "routing matrix has unsorted, repeated columns, which cuSPARSE does not define")
    if pinned in ("sparse", "sorted"):
        return pinned
    segmented = TORCH_SEGMENTED_PASS.get(device_type, "sorted")
    return "sorted" if segmented == "sparse" and device_type != "cpu" else segmented


def prefer_dense(T: int, d_in: int, d_out: int, used_rank: int, k: int, r_max: int, device_type: str,
                 segmented: str, subset: bool, dtype: torch.dtype = torch.float32) -> bool:
    """Two dense GEMMs over the used adapters' n·r columns, or the segmented pass? (configs.TORCH_COST)
    subset: the used adapters are a subset, whose factors the dense path gathers first. dtype: x's; a half
    type with native GEMMs on a CPU (`native_half_gemm`) makes the dense flops cheaper ("native_half_flop").

    Dense is allowed only while n·r <= min(d_in, d_out): its (T, n·r) scratch is then no larger than x.
    """
    cost = TORCH_COST[device_type]
    if used_rank > min(d_in, d_out):
        return False
    half = native_half(device_type, dtype)
    flop = cost.get("native_half_flop", 1.0) if half else 1.0
    dense = 2 * T * used_rank * (d_in + d_out) * flop + (cost["dense_subset_fixed"] if subset else 0.0)
    if segmented == "sparse":
        other = cost["sparse_fixed"] + cost["sparse_per_entry_feature"] * k * r_max * T * (d_in + d_out)
    else:
        other = cost["sorted_fixed"] + cost["sorted_per_pair_feature"] * k * T * (d_in + d_out)
    return dense <= other


def dense_may_win(T: int, d_in: int, d_out: int, N: int, k: int, r_max: int, device_type: str,
                  segmented: str, dtype: torch.dtype = torch.float32) -> bool:
    """Could the dense path win for any count of used adapters? Its cheapest cases are one adapter used (a
    subset: the gather's fixed cost) and all N (no gather). Where neither wins, the census is skipped."""
    return (prefer_dense(T, d_in, d_out, r_max, k, r_max, device_type, segmented, N > 1, dtype)
            or prefer_dense(T, d_in, d_out, N * r_max, k, r_max, device_type, segmented, False, dtype))


def token_changes(keys: torch.Tensor) -> torch.Tensor:
    """(T - 1,) True where token t + 1's routing row differs from token t's."""
    return (keys[1:] != keys[:-1]).any(1)


def token_runs(keys: torch.Tensor, changes: torch.Tensor | None = None) -> torch.Tensor:
    """Start of each run of tokens with identical routing rows (the first is 0): (G,), one sync."""
    changes = token_changes(keys) if changes is None else changes
    return torch.cat([changes.new_zeros(1, dtype=torch.long), torch.nonzero(changes).flatten() + 1])


def runs_pay(G: int, T: int, r_max: int) -> bool:
    """The runs pass copies G·k·r_max·(d_in + d_out) factor entries where the sorted pass moves k·T rows of
    x and of the output: it runs while that is at most a quarter (configs.TORCH_RUN_TOKENS_PER_RANK)."""
    return G * r_max * TORCH_RUN_TOKENS_PER_RANK <= T


HEAD_ROWS = 64   # few_runs reads at least this many rows of the routing on the host


def few_runs(keys: torch.Tensor, r_max: int) -> torch.Tensor | None:
    """The starts of the runs of identical routing rows where they are few enough to pay (`runs_pay`), else
    None. A prefix of max(most + 2, HEAD_ROWS) rows (most: the runs that pay) is read on the host first:
    routing that changes often within it (top-k per token; short sequences) shows most or more changes and
    is refused without the full count's tensor ops and sync, and a batch no longer than the prefix is counted
    there. (Top-2, T = 64, N = 16 / 64, AMD EPYC family 25, both threads, 2026-12-02, 24 rounds in rotating
    order, two runs: the layer 0.12-0.14x of the base GEMM faster than with the count on the device.)"""
    T = keys.shape[0]
    most = T // (r_max * TORCH_RUN_TOKENS_PER_RANK)
    if most < 1:
        return None
    rows = min(T, max(most + 2, HEAD_ROWS))
    head = keys[:rows].tolist()
    boundaries = []
    for t in range(1, rows):
        if head[t] != head[t - 1]:
            boundaries.append(t)
            if len(boundaries) >= most:
                return None
    if rows == T:
        return torch.tensor([0] + boundaries, device=keys.device)
    changes = token_changes(keys)
    if not runs_pay(int(torch.count_nonzero(changes)) + 1, T, r_max):
        return None
    return token_runs(keys, changes)


@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU runs dtype's GEMMs natively through oneDNN (bf16: AVX512-BF16 / AMX, or AVX512 on
    which oneDNN converts cheaply; fp16: AVX512-FP16 / AMX-FP16). Where it does, a bf16 GEMM beats the fp32
    one (AMD EPYC family 26, avx512_bf16, 2026-12-02: T = 1024, d = 576 in 0.9 against 4.3 ms on both
    threads, 2.3 against 10 ms on one); where not, a half GEMM runs several times slower than fp32 (fp16
    there: 20 ms; a bf16 one timed at ~70 ms against ~8 ms in an earlier session, on a CPU whose features
    were not recorded)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


HALF_DTYPES = (torch.float16, torch.bfloat16)


def native_half(device_type: str, dtype: torch.dtype) -> bool:
    """A half type that a CPU multiplies natively (`native_half_gemm`)."""
    return device_type == "cpu" and dtype in HALF_DTYPES and native_half_gemm(dtype)


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the dense and runs passes multiply in: float32 for half types on a CPU without native GEMMs
    for them (`native_half_gemm`), so the cost model's float32 figures hold there too; else dtype."""
    if device_type == "cpu" and dtype in HALF_DTYPES and not native_half_gemm(dtype):
        return torch.float32
    return dtype


def _expand_dtype(compute: torch.dtype, x: torch.Tensor, out: torch.Tensor) -> torch.dtype:
    """The expand's product dtype in the dense and runs passes: `compute` where it differs from x's (a CPU's
    half types: float32), else out's."""
    return compute if compute != x.dtype else out.dtype


# -- dense over the used adapters (forward only; the backward pass uses the segmented primitives) ----

def forward_dense_(out, x, A, B, scales, keys, weights, ranks, used: torch.Tensor | None) -> None:
    """out += mixture, computed as (x @ A_used.T) * gate @ B_used over the n used adapters (None: all)."""
    N, r_max, d_in = A.shape
    T = keys.shape[0]
    acc = accumulator_dtype(x.dtype)
    compute = compute_dtype(x.device.type, x.dtype)
    B_rows = B.transpose(1, 2)                                                             # (N, r_max, d_out)
    if used is None:
        n, columns, A_used, B_used, scale = N, keys, A, B_rows, scales
    else:
        n = used.shape[0]
        if n == 0:
            return
        position = torch.full((N + 1,), n, dtype=torch.long, device=x.device)
        position[used] = torch.arange(n, device=x.device)
        columns = torch.take(position, keys)                                               # (T, k), n = empty
        # index_select, not A[used]: several times faster on the CPU
        A_used, B_used, scale = (t.index_select(0, used) for t in (A, B_rows, scales))
    # the gate of each used adapter per token; empty slots (column n) fall in a column that is dropped
    gate = torch.zeros(T, n + 1, dtype=acc, device=x.device).scatter_add_(1, columns, weights.to(acc))
    gate = gate[:, :n] * scale.to(acc)
    hidden = (x.to(compute) @ A_used.reshape(n * r_max, d_in).to(compute).T).to(acc).view(T, n, r_max)
    hidden = hidden.mul_(gate[:, :, None])
    rank = ranks if used is None else ranks.index_select(0, used)
    # where, not a product: padding may overflow to inf in half precision
    if not is_full_ranks(ranks, r_max) and int(rank.min()) < r_max:
        keep = torch.arange(r_max, device=x.device)[None, :] < rank[:, None]               # (n, r_max)
        hidden = torch.where(keep[None], hidden, 0.0)
    accumulate_(out, hidden.view(T, n * r_max).to(_expand_dtype(compute, x, out)),
                B_used.reshape(n * r_max, B.shape[1]))


# -- runs of identically routed tokens (forward only) -------------------------------------------------

def chunk_length(starts: torch.Tensor, T: int, r_max: int) -> int:
    """L, the largest token count dividing T and every run's start (each run is then a whole number of chunks
    of L tokens: sequences of one length, whatever adapters neighbours share), where its T / L chunks pay
    (`runs_pay`); else 0. Reads the G run starts on the host (they are synced already)."""
    length = math.gcd(T, *starts.tolist())
    return length if runs_pay(T // length, T, r_max) else 0


def forward_runs_(out, x, A, B, scales, keys, weights, ranks, starts: torch.Tensor) -> None:
    """out += mixture where tokens come in G runs of identical routing rows (one adapter set per sequence:
    multi-tenant serving). x's rows are the groups as they lie, each run multiplies by its k adapters'
    factors side by side (G, k·r_max, d), gathered once: no row gather, no scatter, no sort. Where every run
    is a whole number of chunks of L tokens (`chunk_length`), the groups are those chunks and each product
    is one batched call on (G, L, ·) views: torch.bmm for the shrink, an in-place baddbmm_ on out's view for
    the expand; else a grouped matmul and one addmm_ per run."""
    N, r_max, d_in = A.shape
    T, k = keys.shape
    length = chunk_length(starts, T, r_max)
    if length:
        starts = torch.arange(0, T, length, device=keys.device)
    G = starts.shape[0]
    acc = accumulator_dtype(x.dtype)
    compute = compute_dtype(x.device.type, x.dtype)
    run_keys = keys[starts].reshape(-1)                                                    # (G·k,)
    adapters = run_keys.clamp(max=N - 1)
    A_run = A.index_select(0, adapters).to(compute)                                        # (G·k, r_max, d_in)
    # columns past an adapter's rank, and every column of an empty slot, are zeroed in the copied factor
    rank = torch.where(run_keys < N, ranks[adapters], 0)
    if int(rank.min()) < r_max:
        past_rank = torch.arange(r_max, device=x.device)[None, :] >= rank[:, None]          # (G·k, r_max)
        A_run = A_run.masked_fill_(past_rank[:, :, None], 0)
    B_run = B.transpose(1, 2).index_select(0, adapters).to(compute)                        # (G·k, r_max, d_out)
    A_run, B_run = A_run.view(G, k * r_max, d_in), B_run.view(G, k * r_max, B.shape[1])
    coef = weights.to(acc) * slot_scales(keys, scales, acc)                                # (T, k)
    if length:
        hidden = torch.bmm(x.to(compute).view(G, length, d_in), A_run.transpose(1, 2))    # (G, L, k·r_max)
    else:
        ends = torch.cat([starts[1:], starts.new_full((1,), T)]).int()                     # (G,)
        hidden = grouped_matmul(x.to(compute), A_run.transpose(1, 2), ends)
    hidden = hidden.to(acc).view(T, k, r_max).mul_(coef[:, :, None])
    hidden = hidden.view(T, k * r_max).to(_expand_dtype(compute, x, out))
    if length and hidden.dtype == out.dtype:
        # one batched product into out's (G, L, d_out) view, in place: per sequence, T = 1024, 16 runs, AMD
        # EPYC family 25, both threads, 2026-12-02, 15 alternating rounds: 0.14 ms against 0.83 ms for the
        # 16 addmm_ calls below (and the shrink's bmm 0.15 ms, as the grouped matmul)
        out.view(G, length, -1).baddbmm_(hidden.view(G, length, k * r_max), B_run)
    elif length:
        out.add_(torch.bmm(hidden.view(G, length, k * r_max), B_run).view(T, -1))
    elif hidden.dtype == out.dtype and out.device.type == "cpu":
        # each run's rows of out in place, one addmm_ per run (G <= T / (4·r_max)), no (T, d_out) temporary
        # (on a GPU: one grouped matmul, and its caching allocator): glibc handed that back to the OS between
        # calls and re-faulted it (per sequence, T = 1024, N = 16 / 64, both threads, 2026-12-02, three
        # alternating runs each: 1.33-1.41x the base in place against 1.33-2.10x with the temporary, whose
        # runs took up to 200,000 page faults more)
        grouped_addmm_(out, hidden, B_run, ends)
    else:
        out.add_(grouped_matmul(hidden, B_run, ends))


# -- all slots at once, in chunks (forward only) ------------------------------------------------------

CHUNK_ROWS = 1024  # a chunk holds max(T, CHUNK_ROWS) pairs: scratch is output-sized or constant


def forward_sorted_(out, x, A, B, scales, keys, weights, ranks) -> None:
    """out += mixture: every (token, slot) pair sorted by adapter once, then processed in chunks of rows;
    each chunk runs one grouped matmul per factor over just the adapters it spans."""
    N, r_max, _ = A.shape
    T, k = keys.shape
    plan = sort_by_adapter(keys.reshape(-1), N)                    # entry ids are pair ids t·k + j
    P = plan.routed()
    if P == 0:
        return
    pairs, adapters = plan.tokens[:P], plan.adapters[:P]
    tokens = pairs // k
    acc = accumulator_dtype(x.dtype)
    coef = weights.reshape(-1)[pairs].to(acc) * scales.to(acc)[adapters]                   # (P,)
    ends = plan.offsets.long()
    masked = lowest_rank(ranks, r_max) < r_max
    chunk = max(T, CHUNK_ROWS)
    for start in range(0, P, chunk):
        # one call per chunk: its (C, d) buffers are freed before the next chunk's are made (a loop body
        # would hold one chunk's while making the next's: 3.1x the output's bytes at top-8, against 2.1x)
        _sorted_chunk_(out, x, A, B, ranks if masked else None, tokens, adapters, coef, ends, start,
                       min(start + chunk, P))


def _sorted_chunk_(out, x, A, B, ranks, tokens, adapters, coef, ends, start: int, stop: int) -> None:
    """out += the mixture of sorted pairs [start, stop): one grouped matmul per factor over the adapters they
    span. ranks: None when every rank is r_max."""
    r_max = A.shape[1]
    first, last = int(adapters[start]), int(adapters[stop - 1])
    offsets = (ends[first:last + 1].clamp(max=stop) - start).int()                         # (G,)
    rows = torch.index_select(x, 0, tokens[start:stop])
    hidden = grouped_matmul(rows, A[first:last + 1].transpose(1, 2), offsets).to(coef.dtype)   # (C, r_max)
    if ranks is not None:
        keep = torch.arange(r_max, device=x.device)[None, :] < ranks[adapters[start:stop]][:, None]
        hidden = torch.where(keep, hidden, 0.0)
    hidden = hidden * coef[start:stop, None]
    update = grouped_matmul(hidden.to(out.dtype), B[first:last + 1].transpose(1, 2), offsets)
    out.index_add_(0, tokens[start:stop], update)


# -- the backend's entry points (kernels/mixture.py) ---------------------------------------------------

def forward_(out, x, A, B, scales, idx, weights, ranks) -> None:
    """out += mixture: dense over the used adapters where the cost model prefers it, else the runs pass
    where tokens come in few runs routed alike, else the segmented pass: sparse on a CPU, sorted elsewhere
    (a strategy pinned with configs.pin_torch_strategy wins)."""
    N, r_max, _ = A.shape
    T, k = idx.shape
    if T == 0 or k == 0:
        return
    keys = slot_keys(idx, N)
    pinned = configs.pinned_torch_strategy()
    segmented = segmented_pass(x.device.type)
    d_in, d_out, device_type = x.shape[1], B.shape[1], x.device.type
    dtype = x.dtype
    if pinned == "dense" or pinned is None and dense_may_win(T, d_in, d_out, N, k, r_max, device_type, segmented,
                                                             dtype):
        n, counts = adapter_census(keys, N, r_max, min(d_in, d_out))
        if pinned == "dense" or prefer_dense(T, d_in, d_out, n * r_max, k, r_max, device_type, segmented, n < N,
                                             dtype):
            used = None if n == N else torch.nonzero(counts).flatten()
            return forward_dense_(out, x, A, B, scales, keys, weights, ranks, used)
    if pinned == "runs":
        return forward_runs_(out, x, A, B, scales, keys, weights, ranks, token_runs(keys))
    # not with native half GEMMs on a CPU, where the runs pass trailed both others in every case timed (bf16,
    # per sequence, T = 1024: 2.4-2.6x the base against 1.5-1.8x for dense or sparse, 2026-12-02)
    if pinned is None and not native_half(device_type, dtype):
        starts = few_runs(keys, r_max)
        if starts is not None:
            return forward_runs_(out, x, A, B, scales, keys, weights, ranks, starts)
    if segmented == "sparse":
        return torch_sparse.forward_(out, x, A, B, scales, keys, weights, ranks)
    forward_sorted_(out, x, A, B, scales, keys, weights, ranks)


def _coef(weights, scales, plan: SlotPlan, slot: int) -> torch.Tensor:
    """weights[t, j] * scales[e] per sorted row in the accumulator dtype, (T,); rows past P get 0."""
    N = scales.shape[0]
    acc = accumulator_dtype(weights.dtype)
    routed = plan.adapters < N
    value = weights[plan.tokens, slot].to(acc) * scales[plan.adapters.clamp_max(N - 1)].to(acc)
    return torch.where(routed, value, torch.zeros((), device=value.device))


def backward(grad, x, A, B, scales, idx, weights, ranks, need_x: bool, need_weights: bool):
    """(dx or None, dweights or None): the sparse pass's where the segmented pass is sparse (a pinned 'sparse'
    or 'sorted' strategy wins), else one slot at a time over the sorted primitives."""
    N = A.shape[0]
    keys = slot_keys(idx, N)
    if segmented_pass(x.device.type) == "sparse":
        return torch_sparse.backward(grad, x, A, B, scales, keys, weights, ranks, need_x, need_weights)
    acc = accumulator_dtype(x.dtype)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    dweights = torch.zeros(weights.shape, dtype=acc, device=x.device) if need_weights else None
    for slot in range(idx.shape[1]):
        plan = plan_slot(keys, slot, N)
        g = shrink(grad, B.transpose(1, 2), ranks, plan, None)        # (T, R): dy @ B[e]
        if need_weights:
            h = shrink(x, A, ranks, plan, None)                         # (T, R): x @ A[e].T
            scale = scales[plan.adapters.clamp_max(N - 1)].to(acc)
            dweights[plan.tokens, slot] = (h * g).sum(1) * scale * (plan.adapters < N)
        if need_x:
            expand(g * _coef(weights, scales, plan, slot)[:, None], A.transpose(1, 2), ranks, plan, dx)
    return (None if dx is None else dx.to(x.dtype)), (None if dweights is None else dweights.to(weights.dtype))
