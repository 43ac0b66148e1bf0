"""Launch configurations of the Triton kernels, as data.

Block sizes are picked per shape from these tables; a GPU-tuned table can replace them (one dict per
device name) without touching the kernels. Under TRITON_INTERPRET=1 (CPU, tests) large blocks are cheapest:
the interpreter runs one program at a time in numpy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

__all__ = ["TORCH_COST", "ShrinkConfig", "ExpandConfig", "BgmvConfig", "block_m", "use_bgmv", "bgmv_config",
           "shrink_config", "expand_config", "rank_block", "dot_precision"]


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


@dataclass(frozen=True)
class BgmvConfig:
    BR: int
    BK: int
    BN: int
    num_warps: int


# Torch backend cost model (kernels/torch_backend.prefer_dense), in flop-equivalents. The dense path costs
# its flops, 2·T·n·r·(d_in + d_out); the sorted pass costs `sorted_fixed` plus `sorted_per_pair_feature`
# per (token, slot) pair and feature of gather / scatter / small-matmul work. CPU numbers fitted to
# side-by-side timings: benchmarks/kernel_mixture.py (d = 576: even at n·r = 128, sorted ahead at 512) and
# benchmarks/compose_forward.py (SmolLM2, 16 rank-8 adapters, top-2: dense 1.47x, sorted 1.81x the base).
# The paths cross at n·r ≈ 75·k.
TORCH_COST = {"cpu": {"sorted_fixed": 1.0e7, "sorted_per_pair_feature": 150.0},
              "cuda": {"sorted_fixed": 5.0e7, "sorted_per_pair_feature": 200.0}}


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


def use_bgmv(T: int, num_adapters: int, capturing: bool = False) -> bool:
    """Per-entry kernels for small batches; while a CUDA graph is captured, only for many adapters."""
    if T > BGMV_MAX_TOKENS["interpreter" if interpreting() else "gpu"]:
        return False
    return not capturing or num_adapters > GRAPH_BGMV_MIN_ADAPTERS


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
