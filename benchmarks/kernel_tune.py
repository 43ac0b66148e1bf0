"""Sweep the Triton launch tables (kernels/configs.py) on a GPU; print and save the time of each setting.

    python benchmarks/kernel_tune.py out=benchmarks/results/kernel_tune_cuda.json

Each row times the whole mixture (plan + shrink + expands, eager) for bf16, d = 4096, r = 16, top-2.
The tables in kernels/configs.py are data: copy the best setting there. block_m is the table's entry; the
plan halves it where adapters get fewer rows than a block (configs.block_m). Sizes at or below
configs.BGMV_MAX_TOKENS run the per-entry kernels, which these tables do not touch.
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


def main(out: str | None = None, cases: str = "8192:32,8192:1024,2048:32"):
    cfg = SHAPES["cuda"]
    torch.set_grad_enabled(False)
    rows = []
    for case in cases.split(","):
        T, N = map(int, case.split(":"))
        x, W, A, B, scales, idx, weights = problem(T, N, cfg, "cuda", per_sequence=False)
        y = x @ W.T
        base = median_ms(lambda: x @ W.T, 0.2)
        for bm, sh, ex in itertools.product(GRID["block_m"], GRID["shrink"], GRID["expand"]):
            configs.GPU_BLOCK_M[16], configs.GPU_SHRINK[16], configs.GPU_EXPAND[16] = bm, sh, ex
            ms = median_ms(lambda: lora_mixture(x, A, B, scales, idx, weights, out=y, backend="triton",
                                                validate=False), 0.1)
            rows.append(dict(T=T, N=N, block_m=bm, shrink=sh, expand=ex, mixture_ms=round(ms, 4),
                             base_ms=round(base, 4), ratio=round((base + ms) / base, 3)))
        best = sorted((r for r in rows if r["T"] == T and r["N"] == N), key=lambda r: r["mixture_ms"])[:3]
        for r in best:
            print(json.dumps(r), flush=True)
    if out:
        Path(out).write_text(json.dumps(dict(machine=machine(), rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main(**dict(a.split("=", 1) for a in sys.argv[1:]))
