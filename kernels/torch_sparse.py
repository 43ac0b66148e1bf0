"""The torch backend's sparse pass: the routing as a sparse (T, N·r_max) matrix R, two sparse products.

    R[t, e·r_max + i] = 1 for each slot j of token t with e = idx[t, j] >= 0 and i < r_max
    h    = R ⊙ (x @ A_cat.T)                 sampled dense-dense product (SDDMM), (T, k·r_max) values
    out += (h · w[t, j] · s[e], ranks masked) @ B_cat                       sparse-dense product (SpMM)

with A_cat = A viewed as (N·r_max, d_in) and B_cat = B's rows (N·r_max, d_out). Every row of R holds
exactly k·r_max entries (an empty slot points at adapter N - 1 with coefficient 0; a duplicate adapter is two
runs of entries, which both products sum), so R's row pointers are a fixed arange: no sort, no gather of
rows, no loop over adapters, and one host sync only (whether any rank is below r_max); scratch is T·k·r_max
values. The work is T·k·r_max·(d_in + d_out)
multiply-adds, the same as a grouped GEMM's. (torch.sparse refuses rows with more entries than columns, so
k > N, possible only with duplicates, runs in groups of N slots.)

The SDDMM is torch.sparse.sampled_addmm on R as a CSR tensor. The SpMM is an embedding bag (every row of R
a bag of k·r_max rows of the right factor, summed with its values as per-sample weights: F.embedding_bag,
mode="sum", over R's columns viewed (T, k·r_max)) for the backward's dx, which it makes afresh, and for the
forward wherever out does not have the compute dtype (half types: the bag runs in out's dtype, so no
mixed-dtype add); else (`EXPAND_IN_PLACE`) the forward runs torch.sparse's CSR addmm into out, in place.
On a CPU the bag is 1.6-1.8x faster than the CSR product (0.42-0.48 against 0.73-0.85 ms at T = 1024, top-2,
N = 16 and 64, d = 576, r = 8, one thread; 0.23-0.28 against 0.46-0.49 ms on two; AMD EPYC, 2026-12-02),
but it returns a new (T, d) tensor: in the forward, adding that into out cost more than it saved wherever glibc handed the
temporary back to the OS between calls (~1,100 page faults per call in the layer benchmark, the layer
1.65-1.78x the base GEMM against 1.42-1.46x for the in-place product, at T = 1024, N = 64, one thread; on
two threads four full benchmark runs of each were within the noise of each other).

Backward (adapters frozen), the same pattern:
    g          = R ⊙ (dy @ B_cat.T)                                          (T, k·r_max) values
    dweights   = s[e] · Σ_i h · g                                            (a second SDDMM, when needed)
    dx         = (g · w · s, ranks masked) @ A_cat                           SpMM (an embedding bag)

On a CPU the products are MKL's / ATen's kernels (fp32 and fp64; other dtypes run in fp32: `DTYPES`).
CPU, d = 576, r = 8, top-2, 2026-12-02, pinned side by side, one thread: forward 1.2-1.35x the base GEMM at
T = 1024, N = 16 (the sorted pass 1.6-2.3x), 2.2x at T = 64, N = 64 (sorted 4.2-4.7x). Backward, in the 12
cases of benchmarks/kernel_backward.py on both threads: less time than the per-slot sorted one in all,
0.10-0.36x of the base behind the cpu backend's fused backward at T = 1024 (four runs; README).
The pass runs on a CPU only (torch_backend.segmented_pass refuses it elsewhere). R breaks torch's own CSR
invariants: a row's columns are in slot order, not sorted, and repeat where a token names an adapter twice
or has an empty slot (check_invariants=True refuses such a matrix). The CPU kernels used here (ATen's SDDMM
loop, MKL's SpMM) and the embedding bag compute entry by entry and need neither property;
tests/test_kernels.py checks this pass against the reference on every shape (duplicates, empty slots,
k > N), so a torch whose kernels came to rely on the invariants would fail there. cuSPARSE's CSR format
wants sorted, distinct columns (pytorch#60277: repeated ones are undefined there), so on CUDA this matrix
would need sorting and merging first; the torch backend runs its sorted pass there instead.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .plan import cast, slot_scales
from .validation import lowest_rank

__all__ = ["DTYPES", "forward_", "backward"]

DTYPES = (torch.float32, torch.float64)   # what torch.sparse.sampled_addmm takes; others run in float32
# The forward's expand where out has the compute dtype: the CSR product into out, in place (True), or the
# embedding bag added into out (False: what a half-precision out takes anyway); a switch the tests turn.
EXPAND_IN_PLACE = True


@functools.cache
def _spend_beta_warning() -> None:
    """A CSR tensor's first construction warns once per process that sparse CSR support is in beta; this
    module uses only its stable core (construction, sampled_addmm, addmm), so that warning is spent here,
    silently, on the first call (not at import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), (1, 1),
                                check_invariants=False)


@functools.lru_cache(maxsize=32)
def _column_table(num_adapters: int, r_max: int, index: torch.dtype, device: torch.device) -> torch.Tensor:
    """(N + 1, r_max) R's columns per key: row e holds e·r_max + i; row N (an empty slot) repeats adapter
    N - 1's, whose coefficient is 0. Cached per stack shape: one index_select per call instead of ~5 ops."""
    adapters = torch.arange(num_adapters + 1, device=device).clamp_(max=num_adapters - 1)
    return (adapters[:, None] * r_max + torch.arange(r_max, device=device)).to(index)


@functools.lru_cache(maxsize=32)
def _row_pointers(T: int, per_row: int, index: torch.dtype, device: torch.device) -> torch.Tensor:
    """R's row pointers, (T + 1,): every row holds per_row entries. Cached per shape (T + 1 integers); the
    sparse products copy the indices they are given and never write them."""
    return torch.arange(0, T * per_row + 1, per_row, device=device, dtype=index)


@functools.lru_cache(maxsize=16)
def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The sampled product's input values: read (beta = 0 multiplies them), never written; cached per size
    (one fill less per call, like the no-op casts `plan.cast` skips and the slices k <= N needs none of)."""
    return torch.zeros(n, dtype=dtype, device=device)


class _Routing:
    """R's structure for (T, k) keys in [0, N] (plan.slot_keys: N = empty)."""

    def __init__(self, keys: torch.Tensor, num_adapters: int, r_max: int):
        _spend_beta_warning()
        T, k = keys.shape
        self.keys, self.slots, self.shape, self.r_max = keys, (T, k), (T, num_adapters * r_max), r_max
        # int32 indices where they fit: the sparse kernels take them as they are (int64 ones cost a
        # conversion per call: 0.96 against 1.33 ms for the SpMM at T = 1024, top-2, N = 16, d = 576)
        index = torch.int32 if max(T * k * r_max, num_adapters * r_max) < 2 ** 31 else torch.int64
        table = _column_table(num_adapters, r_max, index, keys.device)
        self.columns = table.index_select(0, keys.reshape(-1)).view(-1)                    # (T·k·r_max,)
        self.rows = _row_pointers(T, k * r_max, index, keys.device)                        # (T + 1,)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.rows, self.columns, values.reshape(-1), self.shape,
                                       check_invariants=False)

    def spread(self, values: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """R(values) @ right: (T, right's columns), each row the sum of its entries' rows of right weighted
        by their values; values (T, k, r_max) in right's dtype."""
        T, k = self.slots
        return F.embedding_bag(self.columns.view(T, k * self.r_max), right, mode="sum",
                               per_sample_weights=values.reshape(T, k * self.r_max))

    def sample(self, left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
        """(left @ right_t.T) at R's entries: (T, k, r_max)."""
        zeros = _zeros(self.columns.shape[0], left.dtype, left.device)   # beta = 0 still reads them
        sampled = torch.sparse.sampled_addmm(self.matrix(zeros), left, right_t.T, beta=0.0)
        return sampled.values().view(*self.slots, self.r_max)

    def rank_mask(self, ranks: torch.Tensor) -> torch.Tensor | None:
        """(T, k, r_max) True on the rank lanes each entry's adapter has; None when every rank is r_max."""
        if lowest_rank(ranks, self.r_max) == self.r_max:
            return None
        lanes = torch.arange(self.r_max, device=ranks.device)
        adapter = self.keys.clamp(max=ranks.shape[0] - 1)
        return lanes < ranks[adapter][:, :, None]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in DTYPES else torch.float32


def _stacks(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, B_dtype: torch.dtype | None = None):
    """A_cat (N·r_max, d_in) in dtype and B_cat (N·r_max, d_out) in B_dtype (default dtype): views when B
    holds its rows contiguously and no cast is needed."""
    N, r_max, d_in = A.shape
    B_cat = cast(B.transpose(1, 2).reshape(N * r_max, B.shape[1]), dtype if B_dtype is None else B_dtype)
    return cast(A.reshape(N * r_max, d_in), dtype), B_cat


def _slot_groups(keys: torch.Tensor, weights: torch.Tensor, num_adapters: int):
    """(keys, weights) in groups of at most N slots: torch.sparse refuses a row with more entries than R has
    columns, which k > N (duplicate adapters within a token) would make; k <= N is one group, unsliced."""
    k = keys.shape[1]
    if k == 0:
        return
    if k <= num_adapters:
        yield slice(0, k), keys, weights
        return
    for start in range(0, k, num_adapters):
        slots = slice(start, min(start + num_adapters, k))
        yield slots, keys[:, slots], weights[:, slots]


def forward_(out, x, A, B, scales, keys, weights, ranks) -> None:
    """out += mixture, in place (keys: plan.slot_keys). The expand is the CSR product into out where out
    has the compute dtype (`EXPAND_IN_PLACE`), else the embedding bag in out's dtype, added in
    that dtype: a half-precision out never takes a mixed-dtype add (float32 into bf16 ran at ~1.5 ms for
    T = 1024, d = 576 on the CPU, against 0.18-0.24 ms for the whole bf16 bag)."""
    N, r_max, _ = A.shape
    dtype = _compute_dtype(x.dtype)
    in_place = out.dtype == dtype and EXPAND_IN_PLACE
    A_cat, B_cat = _stacks(A, B, dtype, B_dtype=dtype if in_place else out.dtype)
    x = cast(x, dtype)
    for _, group, gate in _slot_groups(keys, weights, N):
        routing = _Routing(group, N, r_max)
        hidden = routing.sample(x, A_cat)                                                  # (T, k, r_max)
        coefficient = cast(gate, dtype) * slot_scales(group, scales, dtype)                # (T, k)
        hidden = hidden.mul_(coefficient.unsqueeze(2))
        keep = routing.rank_mask(ranks)
        if keep is not None:   # where, not a product: the padding past a rank is ignored whatever it holds
            hidden = torch.where(keep, hidden, 0.0)
        if in_place:
            out.addmm_(routing.matrix(hidden), B_cat)
        else:
            out.add_(routing.spread(hidden.to(B_cat.dtype), B_cat))


def backward(grad, x, A, B, scales, keys, weights, ranks, need_x: bool, need_weights: bool):
    """(dx or None, dweights or None) for frozen adapters."""
    N, r_max, _ = A.shape
    dtype = _compute_dtype(x.dtype)
    A_cat, B_cat = _stacks(A, B, dtype)
    grad, x_c = grad.to(dtype), x.to(dtype)
    dx = None                                                # the first slot group's spread, then summed
    dweights = torch.zeros(weights.shape, dtype=dtype, device=x.device) if need_weights else None
    for slots, group, gate in _slot_groups(keys, weights, N):
        routing = _Routing(group, N, r_max)
        scale = slot_scales(group, scales, dtype)                                           # (T, k)
        keep = routing.rank_mask(ranks)
        g = routing.sample(grad, B_cat)                                                    # (T, k, r_max)
        if keep is not None:
            g = torch.where(keep, g, 0.0)
        if need_weights:
            h = routing.sample(x_c, A_cat)
            if keep is not None:
                h = torch.where(keep, h, 0.0)
            dweights[:, slots] = (h * g).sum(-1) * scale
        if need_x:
            gated = g * (cast(gate, dtype) * scale).unsqueeze(2)
            spread = routing.spread(gated, A_cat)
            dx = spread if dx is None else dx.add_(spread)
    if need_x and dx is None:                                # k = 0
        dx = torch.zeros(x.shape, dtype=dtype, device=x.device)
    return (None if dx is None else dx.to(x.dtype)), (None if dweights is None else dweights.to(weights.dtype))
