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

__all__ = ["TORCH_COST", "ShrinkConfig", "ExpandConfig", "shrink_config", "expand_config", "rank_block", "dot_precision"]


@dataclass(frozen=True)
class ShrinkConfig:
    BM: int
    BR: int
    BK: int
    num_warps: int


@dataclass(frozen=True)
class ExpandConfig:
    BM: int
    BN: int
    num_warps: int


# (max rows per adapter block, d_in step, warps) on a GPU, by rank block.
GPU_SHRINK = {16: (64, 128, 4), 32: (64, 64, 4), 64: (32, 64, 4), 128: (32, 32, 8)}
# (rows per block, d_out tile, warps) on a GPU, by rank block.
GPU_EXPAND = {16: (64, 128, 4), 32: (64, 128, 4), 64: (64, 64, 4), 128: (32, 64, 8)}
INTERPRETER = {"BM": 64, "BK": 256, "BN": 256}

# Torch backend cost model (kernels/torch_backend.prefer_dense), in flop-equivalents. The dense path costs
# its flops, 2·T·n·r·(d_in + d_out); the sorted pass costs `sorted_fixed` plus `sorted_per_pair_feature`
# per (token, slot) pair and feature of gather / scatter / small-matmul work. CPU numbers fitted to
# side-by-side timings (benchmarks/kernel_mixture.py, d = 576): the paths cross at n·r ≈ 52·k.
TORCH_COST = {"cpu": {"sorted_fixed": 1.0e7, "sorted_per_pair_feature": 105.0},
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


def shrink_config(r_max: int, d_in: int, dtype: torch.dtype) -> ShrinkConfig:
    BR = rank_block(r_max)
    if interpreting():
        return ShrinkConfig(INTERPRETER["BM"], BR, min(INTERPRETER["BK"], max(16, triton.next_power_of_2(d_in))), 1)
    BM, BK, warps = GPU_SHRINK[BR]
    return ShrinkConfig(BM, BR, BK, warps)


def expand_config(r_max: int, d_out: int, dtype: torch.dtype) -> ExpandConfig:
    BR = rank_block(r_max)
    if interpreting():
        return ExpandConfig(INTERPRETER["BM"], min(INTERPRETER["BN"], max(16, triton.next_power_of_2(d_out))), 1)
    BM, BN, warps = GPU_EXPAND[BR]
    return ExpandConfig(BM, BN, warps)
