"""Where the mixture layer's time goes on a GPU: the CUDA kernels of one call, by total time.

    python benchmarks/kernel_profile.py            # T in {8192, 256}, N = 32, top-2, bf16, d = 4096
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_mixture import SHAPES, problem  # noqa: E402

from adaptermix.kernels import lora_mixture  # noqa: E402


def main(tokens=(8192, 256), N: int = 32, backend: str = "triton"):
    cfg = SHAPES["cuda"]
    torch.set_grad_enabled(False)
    for T in tokens:
        x, W, A, B, scales, idx, weights = problem(T, N, cfg, "cuda", per_sequence=False)
        y = x @ W.T

        def call():
            lora_mixture(x, A, B, scales, idx, weights, out=y, backend=backend, validate=False)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        print(f"--- T={T} N={N} backend={backend}: 10 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))


if __name__ == "__main__":
    main()
