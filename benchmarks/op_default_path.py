"""`lora_mixture` called with its defaults against the composer's path, side by side in one run.

A SmolLM2-135M-like linear layer (d_model 576; the q/o, k/v, gate/up and down shapes) with 8 rank-8 adapters,
k = 2 per token, at T in {1, 8, 64, 256} tokens, no grad (inference), one torch thread. Each method is timed in
turn, round after round, by this thread's CPU clock (time.thread_time: a call preempted by another job on this
shared machine is not charged their time); per method the median over rounds of its time per call, and the
median over rounds of its ratio to the same round's base GEMM:
  base            y = x @ W.T alone (the denominator)
  composer        what composer/layer.py runs: y = x @ W.T; check_routing (the router-output check);
                  lora_mixture(..., out=y, validate=False) with B as the composer stores it (rows, viewed)
  op[rows]        lora_mixture(x, A, B, scales, idx, weights, ranks=ranks, base=x @ W.T): every default
                  (validate=True, backend 'auto'), B the transposed view of rows (N, r, d_out)
  op[peft]        the same with B contiguous (N, d_out, r), as PEFT stores lora_B
  op[peft,out=]   the same with out=y (in place, as the composer calls it) instead of base=
  before[peft]    what op[peft] cost until 2026-12-03, emulated: the value checks as four torch reductions
                  with a sync each (idx min and max, weights and scales finite) plus ranks' min and max, and B
                  transposed into rows by a copy on every call
The target (issue 22): op[*] - composer <= 0.05 (in units of the base GEMM's time). Before timing, every
method's output is checked against the float64 definition.

    python benchmarks/op_default_path.py [rounds=31]
Writes benchmarks/results/op_default_path_cpu.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from statistics import median
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptermix.composer.layer import check_routing  # noqa: E402
from adaptermix.kernels import lora_mixture, lora_mixture_reference  # noqa: E402
from adaptermix.routers.routing import Routing  # noqa: E402
from machine import machine  # noqa: E402

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}  # (d_in, d_out)
TOKENS = (1, 8, 64, 256)
ADAPTERS, RANK, K = 8, 8, 2
TARGET = 0.05
OUT = Path(__file__).resolve().parent / "results" / "op_default_path_cpu.json"


def problem(T: int, d_in: int, d_out: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(ADAPTERS, RANK, d_out, generator=gen) / RANK
    idx = torch.stack([torch.randperm(ADAPTERS, generator=gen)[:K] for _ in range(T)])
    return dict(x=torch.randn(T, d_in, generator=gen), W=torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5,
                A=torch.randn(ADAPTERS, RANK, d_in, generator=gen) / d_in ** 0.5,
                B_rows=rows.transpose(1, 2), B_peft=rows.transpose(1, 2).contiguous(),
                scales=torch.full((ADAPTERS,), 2.0), ranks=torch.full((ADAPTERS,), RANK, dtype=torch.int32),
                idx=idx, weights=torch.softmax(torch.randn(T, K, generator=gen), -1))


def methods(p: dict) -> dict:
    x, W, A, scales, ranks, idx, weights = (p[key] for key in ("x", "W", "A", "scales", "ranks", "idx", "weights"))
    routing = Routing(indices=idx, weights=weights)

    def base():
        return F.linear(x, W)

    def composer():
        y = F.linear(x, W)
        check_routing(routing, ADAPTERS, "layer", None)
        return lora_mixture(x, A, p["B_rows"], scales, idx, weights, ranks=ranks, out=y, validate=False)

    def op(B):
        return lambda: lora_mixture(x, A, B, scales, idx, weights, ranks=ranks, base=F.linear(x, W))

    def op_out():
        return lora_mixture(x, A, p["B_peft"], scales, idx, weights, ranks=ranks, out=F.linear(x, W))

    def before():
        low, high = int(idx.min()), int(idx.max())
        checks = (bool(torch.isfinite(weights).all()), bool(torch.isfinite(scales).all()), int(ranks.min()),
                  int(ranks.max()))
        assert low >= -1 and high < ADAPTERS and all(checks)
        rows = p["B_peft"].transpose(1, 2).contiguous().transpose(1, 2)
        return lora_mixture(x, A, rows, scales, idx, weights, ranks=ranks, base=F.linear(x, W), validate=False)

    return {"base": base, "composer": composer, "op[rows]": op(p["B_rows"]), "op[peft]": op(p["B_peft"]),
            "op[peft,out=]": op_out, "before[peft]": before}


def max_error(found: dict, p: dict) -> float:
    want = lora_mixture_reference(p["x"].double(), p["A"].double(), p["B_peft"].double(), p["scales"], p["idx"],
                                  p["weights"].double(), ranks=p["ranks"], base=F.linear(p["x"], p["W"]).double())
    return max(float((fn().double() - want).abs().max() / want.abs().max())
               for name, fn in found.items() if name != "base")


def interleaved_cpu_us(methods: dict, rounds: int, sample_s: float = 0.01) -> dict[str, list[float]]:
    """This thread's CPU time per call (us) of each method in each round, the methods in turn each round.
    CPU time, not wall time: on a machine shared with other jobs a preempted call would count their time too;
    with one torch thread every op runs on this thread, so its CPU clock holds exactly this work."""
    numbers = {}
    for name, fn in methods.items():
        fn()                                                                 # warm up
        start = time.thread_time()
        fn()
        numbers[name] = max(1, int(sample_s / max(time.thread_time() - start, 1e-6)))
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.thread_time_ns()
            for _ in range(numbers[name]):
                fn()
            samples[name].append((time.thread_time_ns() - start) / numbers[name] / 1e3)
    return samples


def main(rounds: int = 31) -> None:
    from tqdm import tqdm

    torch.set_num_threads(1)                       # every op on this thread: its CPU clock times it exactly
    cases = [(shape, T) for shape in SHAPES for T in TOKENS]
    result = {"benchmark": "op_default_path", "machine": machine(), "threads": 1, "clock": "thread CPU time",
              "load_average_at_start": os.getloadavg(), "adapters": ADAPTERS, "rank": RANK, "k": K,
              "rounds": rounds, "target": f"op[*] - composer <= {TARGET} (base GEMM = 1)", "cases": []}
    with torch.no_grad():
        for shape, T in tqdm(cases, desc="op default path"):
            p = problem(T, *SHAPES[shape])
            found = methods(p)
            error = max_error(found, p)
            if error > 1e-4:
                sys.exit(f"{shape} T={T}: an output is off by {error:.3g} (relative)")
            samples = interleaved_cpu_us(found, rounds)
            us = {name: round(median(times), 2) for name, times in samples.items()}
            ratios = {name: round(median([t / b for t, b in zip(times, samples["base"])]), 3)
                      for name, times in samples.items()}
            gaps = {name: round(ratios[name] - ratios["composer"], 3) for name in ratios if name != "base"}
            worst = max(gap for name, gap in gaps.items() if name.startswith("op"))
            result["cases"].append({"shape": shape, "d_in_d_out": SHAPES[shape], "T": T, "us_per_call": us,
                                    "ratio_to_base": ratios, "gap_to_composer": gaps,
                                    "gap_to_composer_us": {name: round(us[name] - us["composer"], 2) for name in gaps},
                                    "within_target": worst <= TARGET, "max_rel_error": error})
            result["load_average_at_end"] = os.getloadavg()
            OUT.write_text(json.dumps(result, indent=1) + "\n")
    met = sum(case["within_target"] for case in result["cases"])
    print(f"{met}/{len(result['cases'])} cases within {TARGET} of the composer's path; {OUT}")


if __name__ == "__main__":
    options = dict(arg.split("=", 1) for arg in sys.argv[1:])
    main(rounds=int(options.get("rounds", 31)))
