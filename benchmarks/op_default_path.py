"""`lora_mixture` called with its defaults against the composer's path, side by side in one run.

A SmolLM2-135M-like linear layer (d_model 576; the q/o, k/v, gate/up and down shapes) with 8 rank-8 adapters,
k = 2 per token, at T in {1, 8, 64, 256} tokens, no grad (inference). Methods, each timed in turn round after
round (benchmarks/kernel_mixture.py's interleaving). Reported per method: its best round (us per call; on a
shared machine the least disturbed), the ratio of bests to the base GEMM's best, and the median over rounds of
the ratio to the same round's base GEMM:
  base            y = x @ W.T alone (the denominator)
  composer        what composer/layer.py runs: y = x @ W.T; check_routing (the router-output check);
                  lora_mixture(..., out=y, validate=False) with B as the composer stores it (rows, viewed)
  op[rows]        lora_mixture(x, A, B, scales, idx, weights, ranks=ranks, base=x @ W.T): every default
                  (validate=True, backend 'auto'), B the transposed view of rows (N, r, d_out)
  op[peft]        the same with B contiguous (N, d_out, r), as PEFT stores lora_B
  op[peft,out=]   the same with out=y (in place, as the composer calls it) instead of base=
The target (issue 22): op[*] - composer <= 0.05 (in units of the base GEMM's time), judged on the ratios of
bests. Before timing, every method's output is checked against the float64 definition.

    python benchmarks/op_default_path.py [threads=N] [rounds=15]
Writes benchmarks/results/op_default_path_cpu.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptermix.composer.layer import check_routing  # noqa: E402
from adaptermix.kernels import lora_mixture, lora_mixture_reference  # noqa: E402
from adaptermix.routers.routing import Routing  # noqa: E402
from kernel_mixture import interleaved_ms, median  # noqa: E402
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

    return {"base": base, "composer": composer, "op[rows]": op(p["B_rows"]), "op[peft]": op(p["B_peft"]),
            "op[peft,out=]": op_out}


def max_error(found: dict, p: dict) -> float:
    want = lora_mixture_reference(p["x"].double(), p["A"].double(), p["B_peft"].double(), p["scales"], p["idx"],
                                  p["weights"].double(), ranks=p["ranks"], base=F.linear(p["x"], p["W"]).double())
    return max(float((fn().double() - want).abs().max() / want.abs().max())
               for name, fn in found.items() if name != "base")


def main(threads: int | None = None, rounds: int = 15) -> None:
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    cases = [(shape, T) for shape in SHAPES for T in TOKENS]
    result = {"benchmark": "op_default_path", "machine": machine(), "threads": torch.get_num_threads(),
              "load_average_at_start": os.getloadavg(), "adapters": ADAPTERS, "rank": RANK, "k": K,
              "rounds": rounds, "target": f"op[*] - composer <= {TARGET} (base GEMM = 1)", "cases": []}
    with torch.no_grad():
        for shape, T in tqdm(cases, desc="op default path"):
            p = problem(T, *SHAPES[shape])
            found = methods(p)
            error = max_error(found, p)
            if error > 1e-4:
                sys.exit(f"{shape} T={T}: an output is off by {error:.3g} (relative)")
            samples = interleaved_ms(found, min_run_time=0.3, rounds=rounds)
            ratios = {name: round(median([t / b for t, b in zip(times, samples["base"])]), 3)
                      for name, times in samples.items()}
            best_us = {name: round(min(times) * 1e3, 2) for name, times in samples.items()}
            best_ratios = {name: round(best_us[name] / best_us["base"], 3) for name in best_us}
            gaps = {name: round(best_ratios[name] - best_ratios["composer"], 3)
                    for name in best_us if name.startswith("op")}
            result["cases"].append({"shape": shape, "d_in_d_out": SHAPES[shape], "T": T,
                                    "best_us": best_us, "ratio_to_base_of_bests": best_ratios,
                                    "ratio_to_base_median_of_rounds": ratios,
                                    "gap_to_composer_us": {name: round(best_us[name] - best_us["composer"], 2)
                                                           for name in gaps},
                                    "gap_to_composer": gaps, "within_target": max(gaps.values()) <= TARGET,
                                    "max_rel_error": error})
            result["load_average_at_end"] = os.getloadavg()
            OUT.write_text(json.dumps(result, indent=1) + "\n")
    met = sum(case["within_target"] for case in result["cases"])
    print(f"{met}/{len(result['cases'])} cases within {TARGET} of the composer's path; {OUT}")


if __name__ == "__main__":
    options = dict(arg.split("=", 1) for arg in sys.argv[1:])
    main(threads=int(options["threads"]) if "threads" in options else None, rounds=int(options.get("rounds", 15)))
