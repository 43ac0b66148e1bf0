"""Launch configurations of the Triton kernels, as data.

Block sizes are picked per shape from these tables; a GPU-tuned table can replace them (one dict per
device name) without touching the kernels. Under TRITON_INTERPRET=1 (CPU, tests) large blocks are cheapest:
the interpreter runs one program at a time in numpy.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton

__all__ = ["TORCH_COST", "TORCH_SEGMENTED_PASS", "TORCH_RUN_TOKENS_PER_RANK", "TORCH_STRATEGIES", "pin_torch_strategy",
           "pinned_torch_strategy", "ShrinkConfig", "ExpandConfig", "BgmvConfig", "FusedConfig", "ClusterConfig",
           "TRITON_STRATEGIES", "block_m", "triton_strategy", "pin_triton_strategy", "bgmv_config", "fused_columns",
           "fused_fits", "fused_config", "cluster_fits", "cluster_config", "shrink_config", "expand_config",
           "rank_block", "dot_precision"]


@dataclass(frozen=True)
class ShrinkConfig:
    BR: int
    BK: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExpandConfig:
    BN: int
    num_warps: int
    num_stages: int


# Rows per block of the routing plan on a GPU (shared by both kernels), by rank block.
GPU_BLOCK_M = {16: 64, 32: 64, 64: 64, 128: 32}
# (d_in step, warps, pipeline stages) of the shrink kernel on a GPU, by rank block.
GPU_SHRINK = {16: (128, 4, 4), 32: (128, 4, 4), 64: (64, 4, 3), 128: (64, 8, 3)}   # 16: tuned on H100
# (d_out tile, warps, pipeline stages) of the expand kernel on a GPU, by rank block.
GPU_EXPAND = {16: (256, 8, 2), 32: (128, 4, 2), 64: (128, 4, 2), 128: (64, 8, 2)}   # 16: tuned on H100
INTERPRETER = {"BM": 64, "BK": 256, "BN": 256}
# Up to this many tokens the per-entry (BGMV-style) kernels run instead of the grouped GEMM: at decode
# sizes the plan's launches cost more than reading each entry's factors (benchmarks/kernel_mixture.py).
BGMV_MAX_TOKENS = {"gpu": 512, "interpreter": 8}
# Under CUDA-graph capture launches are cheap, and the grouped GEMM wins unless adapters are many (each then
# gets few rows): the per-entry kernels run only above this many adapters (H100, T = 256, bf16, d = 4096).
GRAPH_BGMV_MIN_ADAPTERS = 64
# (d_in step, d_out tile, warps) of the BGMV kernels on a GPU.
GPU_BGMV = (256, 128, 4)

# The fused token-major kernels (kernels/triton_fused.py) hold a (BM, C) float32 block of rank activations,
# C = N·r_max padded to a power of two; `auto` runs them up to FUSED_MAX_COLUMNS, where their extra flops
# (C·(1/d_in + 1/d_out) of the base GEMM) stay small while the grouped GEMM pays k reads of x and k
# read-modify-writes of out (T = 8192, top-2, d = 4096: 384 MB against 192 MB). Chosen from that traffic
# count; not yet timed on a GPU (benchmarks/kernel_mixture.py times both side by side). At C = 256 no block
# compiles for sm_90a without spills and with two programs per SM (benchmarks/kernel_compile.py), so the
# kernels stop at 128.
FUSED_MAX_COLUMNS = 128
# (token block, d_in step, d_out step, warps, pipeline stages) of the fused kernels on a GPU, by C: per C, of
# the blocks that compile for sm_90a without spills and leave two programs per SM, the most warps, then the
# largest blocks (benchmarks/results/kernel_compile_sweep_sm90.json). Compile facts, not timings.
GPU_FUSED = {16: (64, 128, 128, 8, 3), 32: (64, 128, 128, 8, 3), 64: (32, 128, 128, 8, 3),
             128: (32, 128, 128, 8, 2)}
# Programs aimed for per SM: a token block is split over d_out chunks until the grid reaches this many per
# SM (decode batches), at most FUSED_MAX_SPLIT chunks (each chunk recomputes the block's shrink from L2).
FUSED_PROGRAMS_PER_SM = 2
FUSED_MAX_SPLIT = 8

# The clustered kernel (kernels/triton_cluster.py): tokens ordered by their adapters, then the fused kernel's
# single pass over each token block's own adapters, G = C / RP at a time. Up to CLUSTER_MAX_ADAPTERS (the
# block's used-adapter vector lives in registers). Not yet timed on a GPU, so `auto` picks it for no stack
# (CLUSTER_AUTO_MAX_ADAPTERS = 0): benchmarks/kernel_mixture.py times it against the grouped GEMM
# ("ours[triton:cluster]"); where it wins at T = 8192, raise the threshold to the largest N it wins at. Decode
# batches never take it: 256 tokens of random top-2 over 32 adapters leave 18 adapters per 32-token block.
CLUSTER_MAX_ADAPTERS = 128   # at N = 256 the sm_90a build spilled 4 bytes (benchmarks/kernel_compile.py, 2026-12-02)
CLUSTER_AUTO_MAX_ADAPTERS = 0
# (columns C, token block, d_in step, d_out step, warps, pipeline stages) on a GPU, by rank block RP. RP = 16:
# C = 64 (G = 4 adapters a pass: random top-2 over 32 adapters, token-ordered, leaves 4.0 adapters per
# 32-token block on average, 1.18 passes), then by the GPU_FUSED rule over the blocks that compile for
# sm_90a without spills with two programs per SM (benchmarks/results/kernel_compile_sweep_cluster_sm90.json:
# 114 registers). Other RP by analogy, not compiled.
GPU_CLUSTER = {16: (64, 32, 128, 128, 8, 3), 32: (64, 32, 128, 128, 8, 3), 64: (64, 32, 128, 128, 8, 3),
               128: (128, 32, 64, 64, 8, 2)}

TRITON_STRATEGIES = ("fused", "bgmv", "plan", "cluster")


@dataclass(frozen=True)
class BgmvConfig:
    BR: int
    BK: int
    BN: int
    num_warps: int


@dataclass(frozen=True)
class FusedConfig:
    C: int          # adapter columns of one pass, a power of two >= 16 (fused: N·r_max padded)
    BM: int
    BK: int
    BN: int
    split: int      # d_out chunks per token block
    num_warps: int
    num_stages: int

    def d_out_chunks(self, d_out: int) -> tuple[int, int]:
        """(chunk, chunks): d_out in at most `split` chunks of whole BN steps (the last one ragged)."""
        chunk = triton.cdiv(triton.cdiv(d_out, self.split), self.BN) * self.BN
        return chunk, triton.cdiv(d_out, chunk)


@dataclass(frozen=True)
class ClusterConfig(FusedConfig):
    RP: int         # rank rows per adapter, r_max padded to a power of two (C = G·RP)
    N_PAD: int      # adapters, padded to a power of two

    @property
    def G(self) -> int:
        """Adapters per pass."""
        return self.C // self.RP


# Torch backend cost model (kernels/torch_backend.prefer_dense), in flop-equivalents. The dense path costs
# its flops, 2·T·n·r·(d_in + d_out); the segmented pass costs a fixed part plus, for the sparse pass,
# `sparse_per_entry_feature` per routing entry (token, slot, rank lane) and feature, and for the sorted pass
# `sorted_per_pair_feature` per (token, slot) pair and feature of gather / scatter / small-matmul work.
# CPU sparse numbers fitted 2026-12-02 to side-by-side timings of the two, pinned (d = 576, r = 8,
# T in {64, 256, 1024}, k in {1, 2}, N in {4, 8, 16, 32}, 9 interleaved rounds). Refitted after the sparse
# pass's routing got leaner (R's columns from a cached table): `sparse_fixed` 1.8e7 -> 0.8e7, with which the
# model picks the faster in all 24 shapes (1.8e7 missed 2: T = 64, N = 16, k = 1 and 2, by 0.15x and 0.04x
# the base GEMM; a least-squares fit of each pass's own time gives fixed parts of 2.5e7 for both, dense at
# 1.12 per flop and sparse at 11.6 per entry-feature). Dense wins below n ≈ 8·k at T = 1024 and up to
# n ≈ 8 at T = 64. Over a subset of the stack the dense path gathers the used adapters' factors (the census
# that counts them, torch_backend.adapter_census, runs before the choice): `dense_subset_fixed`, 85-150 us
# measured at T = 64 and ~110 us at T = 256, 16 of 64 adapters used, against a base GEMM at 155-187 GFLOP/s
# (2026-12-02; first fitted with torch.unique inside, ~0.29 ms). The sorted numbers (CUDA, not yet timed
# there; on the CPU the sorted pass runs only when pinned) come from benchmarks/kernel_mixture.py and
# compose_forward.py runs before the sparse pass. The CPU figures were probably fitted on one thread (the
# benchmark's Timer defaulted to one: README); checked on both threads the same day (the 24 shapes above, 5
# interleaved rounds), the model picked the faster of dense and sparse in 22, the other two (T = 1024, N = 8, k = 1 / 2)
# missing by 0.07x and 0.15x of the base in opposite directions: no refit.
# `native_half_flop`: a dense flop in a half type that the CPU multiplies natively (torch_backend.native_half),
# in float32 flop-equivalents. AMD EPYC family 26 (avx512_bf16), 2026-12-02: the T = 1024, d = 576 GEMM in
# bf16 took 0.9 ms against 4.3 in fp32 on both threads (2.3 against 10 on one), ~0.22; with 0.25 the choice
# between dense and sparse matched the faster of the two pinned in 10 of 12 bf16 shapes of
# benchmarks/kernel_mixture.py and was within 0.2x of the base in the other two (both threads).
TORCH_COST = {"cpu": {"sparse_fixed": 0.8e7, "sparse_per_entry_feature": 8.0, "dense_subset_fixed": 1.7e7,
                      "sorted_fixed": 1.0e7, "sorted_per_pair_feature": 150.0,
                      "native_half_flop": 0.25},
              "cuda": {"dense_subset_fixed": 0.0, "sorted_fixed": 5.0e7, "sorted_per_pair_feature": 200.0}}
# The segmented pass per device where dense does not run: sparse on the CPU (every dtype: half types in
# float32; it runs nowhere else: torch_backend.segmented_pass), sorted elsewhere.
TORCH_SEGMENTED_PASS = {"cpu": "sparse", "cuda": "sorted"}
# Where the cost model does not pick dense and tokens come in G runs of identical routing rows (one adapter
# set per sequence), the runs pass replaces the segmented one while G·r_max·TORCH_RUN_TOKENS_PER_RANK <= T: its
# factor copies are then at most a quarter of the rows the sorted pass gathers and scatters. CPU, d = 576,
# r = 8, N = 64, 2026-12-02: runs ahead of sorted up to G = 32 at T = 1024 and G = 16 at T = 256, for k = 1
# and 2 (G = 8 at T = 256 is this rule's bound); against the sparse pass, per sequence at T = 1024 with 16
# runs, within the noise of four runs (runs 1.19-1.30x the base, sparse 1.17-1.40x).
TORCH_RUN_TOKENS_PER_RANK = 4
TORCH_STRATEGIES = ("dense", "runs", "sparse", "sorted")

# A strategy pinned per backend (tests, benchmarks): None leaves the choice to the backend.
_STRATEGIES = {"torch": TORCH_STRATEGIES, "triton": TRITON_STRATEGIES}
_pinned: dict[str, str | None] = {"torch": None, "triton": None}


@contextlib.contextmanager
def _pin(backend: str, strategy: str | None):
    if strategy is not None and strategy not in _STRATEGIES[backend]:
        raise ValueError(f"strategy must be one of {_STRATEGIES[backend]} or None, got {strategy!r}")
    saved, _pinned[backend] = _pinned[backend], strategy
    try:
        yield
    finally:
        _pinned[backend] = saved


def pin_torch_strategy(strategy: str | None):
    """Run the torch backend with one strategy inside the block (tests, benchmarks): 'dense' (also past
    n·r = min(d_in, d_out), where `auto` never takes it), 'runs' (any number of runs), 'sparse' (any dtype:
    float32 where torch.sparse does not take it) or 'sorted'; the last two steer the backward pass too.
    None leaves the choice to the cost model."""
    return _pin("torch", strategy)


def pinned_torch_strategy() -> str | None:
    return _pinned["torch"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full precision (no TF32 rounding); half types use tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def rank_block(r_max: int) -> int:
    """tl.dot needs every block dimension >= 16."""
    if r_max > 128:
        raise ValueError(f"the Triton backend supports ranks up to 128, got r_max={r_max}")
    return max(16, triton.next_power_of_2(r_max))


def block_m(r_max: int, rows_per_adapter: float) -> int:
    """Rows per block of the Triton routing plan: half blocks when adapters get few rows each (many
    adapters, random routing) waste less of each block (benchmarks/kernel_tune.py)."""
    if interpreting():
        return INTERPRETER["BM"]
    bm = GPU_BLOCK_M[rank_block(r_max)]
    return bm // 2 if rows_per_adapter < bm else bm


def fused_columns(columns: int) -> int:
    """C of the fused kernels for N·r_max = columns: a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(columns))


def fused_fits(columns: int) -> bool:
    """The fused kernels can run a stack of N·r_max = columns."""
    return fused_columns(columns) <= FUSED_MAX_COLUMNS


def triton_strategy(T: int, num_adapters: int, r_max: int, capturing: bool = False) -> str:
    """Which Triton forward runs: 'fused' (one token-major launch) for small stacks, 'cluster' (tokens
    ordered by adapter, then the fused pass per token block) for prefill batches up to
    CLUSTER_AUTO_MAX_ADAPTERS, 'bgmv' (per-entry kernels) for small batches (while a CUDA graph is captured
    only with many adapters), else 'plan' (the grouped GEMM). A strategy pinned with `pin_triton_strategy`
    wins (fused_config / cluster_config refuse a stack their kernels cannot run, before any launch)."""
    if _pinned["triton"] is not None:
        return _pinned["triton"]
    if fused_fits(num_adapters * r_max):
        return "fused"
    small_batch = T <= BGMV_MAX_TOKENS["interpreter" if interpreting() else "gpu"]
    if not small_batch and num_adapters <= CLUSTER_AUTO_MAX_ADAPTERS and cluster_fits(num_adapters, r_max):
        return "cluster"     # prefill only: a decode batch's blocks hold too few tokens to share adapters
    if small_batch and (not capturing or num_adapters > GRAPH_BGMV_MIN_ADAPTERS):
        return "bgmv"
    return "plan"


def pin_triton_strategy(strategy: str | None):
    """Run the Triton forward (and backward) with one strategy inside the block (tests, benchmarks);
    None leaves the choice to `triton_strategy`."""
    return _pin("triton", strategy)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused_config(columns: int, T: int, d_out: int, device: torch.device) -> FusedConfig:
    """Blocks of the fused kernels for N·r_max = columns; d_out is split so that small batches still fill
    the GPU."""
    if not fused_fits(columns):
        raise ValueError(f"the fused kernels take N·r_max <= {FUSED_MAX_COLUMNS}, got {columns}")
    C = fused_columns(columns)
    if interpreting():
        return FusedConfig(C, INTERPRETER["BM"], INTERPRETER["BK"], INTERPRETER["BN"], 1, 1, 1)
    BM, BK, BN, warps, stages = GPU_FUSED[C]
    return FusedConfig(C, BM, BK, BN, _d_out_split(T, d_out, BM, BN, device), warps, stages)


def _d_out_split(T: int, d_out: int, BM: int, BN: int, device: torch.device) -> int:
    """d_out chunks per token block of the one-launch kernels: enough programs for FUSED_PROGRAMS_PER_SM per
    SM, at most FUSED_MAX_SPLIT, never finer than one BN step."""
    wanted = triton.cdiv(FUSED_PROGRAMS_PER_SM * _multiprocessors(device), triton.cdiv(T, BM))
    return max(1, min(wanted, FUSED_MAX_SPLIT, triton.cdiv(d_out, BN)))


def cluster_fits(num_adapters: int, r_max: int) -> bool:
    """The clustered kernel can run N adapters of rank r_max."""
    return num_adapters <= CLUSTER_MAX_ADAPTERS and r_max <= 128


def cluster_config(num_adapters: int, r_max: int, T: int, d_out: int, device: torch.device) -> ClusterConfig:
    """Blocks of the clustered kernel; d_out is split as for the fused kernels."""
    if not cluster_fits(num_adapters, r_max):
        raise ValueError(f"the clustered kernel takes N <= {CLUSTER_MAX_ADAPTERS} adapters of rank <= 128, "
                         f"got N={num_adapters}, r_max={r_max}")
    RP = rank_block(r_max)
    N_PAD = max(16, triton.next_power_of_2(num_adapters))
    if interpreting():
        return ClusterConfig(max(64, RP), INTERPRETER["BM"], INTERPRETER["BK"], INTERPRETER["BN"], 1, 1, 1, RP, N_PAD)
    C, BM, BK, BN, warps, stages = GPU_CLUSTER[RP]
    return ClusterConfig(C, BM, BK, BN, _d_out_split(T, d_out, BM, BN, device), warps, stages, RP, N_PAD)


def bgmv_config(r_max: int, d_in: int, d_out: int) -> BgmvConfig:
    BR = max(16, triton.next_power_of_2(r_max))
    if interpreting():
        return BgmvConfig(BR, min(INTERPRETER["BK"], triton.next_power_of_2(d_in)),
                          min(INTERPRETER["BN"], triton.next_power_of_2(d_out)), 1)
    return BgmvConfig(BR, *GPU_BGMV)


def shrink_config(r_max: int, d_in: int, dtype: torch.dtype) -> ShrinkConfig:
    BR = rank_block(r_max)
    if interpreting():
        return ShrinkConfig(BR, min(INTERPRETER["BK"], max(16, triton.next_power_of_2(d_in))), 1, 1)
    return ShrinkConfig(BR, *GPU_SHRINK[BR])


def expand_config(r_max: int, d_out: int, dtype: torch.dtype) -> ExpandConfig:
    BR = rank_block(r_max)
    if interpreting():
        return ExpandConfig(min(INTERPRETER["BN"], max(16, triton.next_power_of_2(d_out))), 1, 1)
    return ExpandConfig(*GPU_EXPAND[BR])
