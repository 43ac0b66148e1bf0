"""Sweep the Triton launch tables (kernels/configs.py) on a GPU; print and save the time of each setting.

    python benchmarks/kernel_tune.py out=benchmarks/results/kernel_tune_cuda.json
    python benchmarks/kernel_tune.py strategy=fused out=benchmarks/results/kernel_tune_fused_cuda.json
    python benchmarks/kernel_tune.py strategy=cluster out=benchmarks/results/kernel_tune_cluster_cuda.json

Each row times the whole mixture (eager) for bf16, d = 4096, r = 16, top-2, with the strategy pinned.
strategy=plan (default) sweeps the grouped GEMM's tables (block_m, GPU_SHRINK, GPU_EXPAND; the plan halves
block_m where adapters get fewer rows than a block, configs.block_m); strategy=fused sweeps GPU_FUSED and the
d_out split (cases N·r <= configs.FUSED_MAX_COLUMNS); strategy=cluster sweeps GPU_CLUSTER[16] and the split.
The tables are data: copy the best setting there.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_mixture import SHAPES, median_ms, problem  # noqa: E402
from machine import machine  # noqa: E402

from adaptermix.kernels import configs, lora_mixture  # noqa: E402

GRID = dict(block_m=(32, 64, 128), shrink=((64, 4, 3), (128, 4, 4), (256, 8, 3)), expand=((64, 4, 2), (128, 4, 2),
                                                                                            (256, 8, 2)))
# (token block, d_in step, d_out step, warps, stages) x d_out split of the fused kernels; the blocks are also
# what benchmarks/kernel_compile.py compiles (sweep=fused), so both sweeps speak of the same candidates.
FUSED_GRID = dict(blocks=tuple(itertools.product((32, 64), (64, 128), (64, 128), (4, 8), (2, 3))),
                  split=(1, 2, 4, 8))
# The clustered kernel's candidates: (C, BM, BK, BN, warps, stages) at r = 16 (benchmarks/kernel_compile.py
# sweep=cluster compiles them all), and the d_out split; the timing sweep keeps those that compiled for
# sm_90a without spills, two programs per SM, 8 warps (benchmarks/results/kernel_compile_sweep_cluster_sm90.json).
CLUSTER_GRID = dict(blocks=tuple(itertools.product((32, 64, 128), (32, 64), (64, 128), (64, 128), (4, 8), (2, 3))),
                    split=(1, 2, 4))
CLUSTER_FACTS = Path(__file__).resolve().parent / "results" / "kernel_compile_sweep_cluster_sm90.json"
CASES = {"plan": "8192:32,8192:1024,2048:32", "fused": "8192:4,256:4,8192:8,256:8",
         "cluster": "8192:32,8192:128"}


def plan_settings(N, r):
    for bm, sh, ex in itertools.product(GRID["block_m"], GRID["shrink"], GRID["expand"]):
        configs.GPU_BLOCK_M[16], configs.GPU_SHRINK[16], configs.GPU_EXPAND[16] = bm, sh, ex
        yield dict(block_m=bm, shrink=sh, expand=ex)


def one_launch_settings(table: dict, key: int, name: str, blocks, splits):
    """Each (block, d_out split) of a one-launch kernel's table entry table[key] in turn (the split forced
    to exactly `split`), restoring the tables afterwards."""
    saved = table[key], configs.FUSED_PROGRAMS_PER_SM, configs.FUSED_MAX_SPLIT
    configs.FUSED_PROGRAMS_PER_SM = 10 ** 6                     # the split is then FUSED_MAX_SPLIT
    try:
        for block, split in itertools.product(blocks, splits):
            table[key], configs.FUSED_MAX_SPLIT = block, split
            yield {name: block, "split": split}
    finally:
        table[key], configs.FUSED_PROGRAMS_PER_SM, configs.FUSED_MAX_SPLIT = saved


def fused_settings(N, r):
    return one_launch_settings(configs.GPU_FUSED, configs.fused_columns(N * r), "fused", FUSED_GRID["blocks"],
                               FUSED_GRID["split"])


def cluster_settings(N, r):
    facts = json.loads(CLUSTER_FACTS.read_text())["sweep"]
    good = {(f["C"], f["BM"], f["BK"], f["BN"], f["num_warps"], f["num_stages"]) for f in facts
            if f["N"] == 32 and f["spill_bytes"] == 0 and f["blocks_per_sm"] >= 2 and f["num_warps"] == 8}
    return one_launch_settings(configs.GPU_CLUSTER, configs.rank_block(r), "cluster",
                               [b for b in CLUSTER_GRID["blocks"] if b in good], CLUSTER_GRID["split"])


def main(out: str | None = None, strategy: str = "plan", cases: str | None = None):
    cfg = SHAPES["cuda"]
    settings = {"plan": plan_settings, "fused": fused_settings, "cluster": cluster_settings}[strategy]
    torch.set_grad_enabled(False)
    rows = []
    for case in (cases or CASES[strategy]).split(","):
        T, N = map(int, case.split(":"))
        x, W, A, B, scales, idx, weights = problem(T, N, cfg, "cuda", per_sequence=False)
        y = x @ W.T
        base = median_ms(lambda: x @ W.T, 0.2)
        with configs.pin_triton_strategy(strategy):
            for setting in settings(N, cfg["r"]):
                ms = median_ms(lambda: lora_mixture(x, A, B, scales, idx, weights, out=y, backend="triton",
                                                    validate=False), 0.1)
                rows.append(dict(T=T, N=N, **setting, mixture_ms=round(ms, 4), base_ms=round(base, 4),
                                 ratio=round((base + ms) / base, 3)))
        best = sorted((r for r in rows if r["T"] == T and r["N"] == N), key=lambda r: r["mixture_ms"])[:3]
        for r in best:
            print(json.dumps(r), flush=True)
        if out:   # after every case: a sweep cut short by a device lease keeps the cases it finished
            Path(out).write_text(json.dumps(dict(machine=machine(), strategy=strategy, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main(**dict(a.split("=", 1) for a in sys.argv[1:]))
