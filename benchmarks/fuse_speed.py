"""`fuse` with ties / dare / magnitude_prune on SmolLM2-135M-Instruct shapes: the batched path
(composer/fusion.py) against the path it replaced (`reference_merge`: PEFT's merge_utils on float64 dense
updates, one module at a time, then a full SVD), side by side in one run, and how close they come.

    python benchmarks/fuse_speed.py            # writes benchmarks/results/fuse_speed_cpu.json

Wall time and process CPU time (one thread) of each, after a warm-up; the batched path's best of 3, the old
path once (~1 min). On a shared machine the CPU time is the steadier figure.
Two workloads: two example adapters (examples/suite_adapters, rank 4, 150 modules) and two random rank-8
adapters on 180 modules (q, k, v, o, up, down of 30 layers). Closeness, per module: the fused update's
Frobenius distance from the reference's, relative to the reference; and the rank-r truncation error of the
batched path over the exact SVD's, on the same merged matrix (1.0 = optimal).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.composer.fusion import reference_merge  # noqa: E402
from adaptermix.models import smollm2_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "fuse_speed_cpu.json"
METHODS = ("ties", "dare_ties", "magnitude_prune")
REFERENCE = ("ties",)
REPEATS = 3             # the batched path: the fastest of 3 (the machine is shared); the old path: once   # the old path takes ~1 min of CPU per run: timed side by side for ties


def random_adapters(rank: int = 8) -> dict[str, am.LoraAdapter]:
    spec = am.BaseModelSpec.from_pretrained(str(smollm2_path()))
    targets = [m for m in spec.modules if m.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                                   "down_proj")]
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    for name in ("one", "two"):
        modules = {m: am.LoraModule(torch.randn(rank, spec.modules[m][1], generator=generator) * 0.02,
                                    torch.randn(spec.modules[m][0], rank, generator=generator) * 0.02, 16.0)
                   for m in targets}
        adapters[name] = am.LoraAdapter(name, spec.name, modules)
    return adapters


def suite_adapters() -> dict[str, am.LoraAdapter]:
    return {n: am.LoraAdapter.from_peft(REPO / "examples" / "suite_adapters" / n) for n in ("acronym", "date_dmy")}


def reference_fuse(adapters, method: str, rank: int) -> tuple[dict[str, torch.Tensor], float]:
    start = time.perf_counter()
    names = list(adapters)
    fused = {}
    for module in adapters[names[0]].modules:
        deltas = [adapters[n].modules[module].delta_weight(torch.float64) for n in names]
        fused[module] = reference_merge(method, deltas, [0.5, 0.5], rank=rank)
    return fused, time.perf_counter() - start


def closeness(adapters, fast: am.LoraAdapter, reference: dict[str, torch.Tensor], method: str) -> dict:
    distances = [float((fast.modules[m].delta_weight() - ref).norm() / ref.norm().clamp_min(1e-30))
                 for m, ref in reference.items()]
    return {"relative_distance_median": sorted(distances)[len(distances) // 2], "relative_distance_max": max(distances)}


def truncation_quality(adapters, rank: int, sample: int = 12) -> float:
    """max over sampled modules of ||M - batched rank-r|| / ||M - exact rank-r|| on the same merged M."""
    from adaptermix.composer.fusion import DENSE_MERGES, truncate_dense

    names, worst = list(adapters), 1.0
    modules = list(adapters[names[0]].modules)[::max(1, len(adapters[names[0]].modules) // sample)]
    for module in modules:
        deltas = torch.stack([adapters[n].modules[module].delta_weight(torch.float32) for n in names])[None]
        merged = DENSE_MERGES["ties"].merge(deltas, torch.tensor([0.5, 0.5]), density=0.5, majority_sign_method="total",
                                            generator=torch.Generator().manual_seed(0))
        A, B, _ = truncate_dense(merged, rank, torch.Generator().manual_seed(0))
        S = torch.linalg.svdvals(merged[0].double())
        worst = max(worst, float((merged[0] - B[0] @ A[0]).norm() / S[rank:].norm()))
    return worst


def warm_up() -> None:
    """First calls pay one-time costs (PEFT's import, allocator growth): paid here, outside the timings."""
    small = {n: am.LoraAdapter(n, "", {"m": am.LoraModule(torch.randn(2, 64), torch.randn(64, 2), 4.0)})
             for n in ("x", "y")}
    for method in METHODS:
        am.fuse(small, ["x", "y"], method=method, rank=2)
        reference_merge(method, [a.modules["m"].delta_weight() for a in small.values()], [0.5, 0.5], rank=2)


def main() -> None:
    torch.set_num_threads(1)
    warm_up()
    results = {"benchmark": "fuse_speed", "machine": machine(), "threads": 1, "workloads": {}}
    for label, adapters in (("random_r8_180_modules", random_adapters()), ("suite_r4_150_modules", suite_adapters())):
        rank = max(a.max_rank for a in adapters.values())
        rows = {"modules": len(next(iter(adapters.values())).modules), "rank": rank,
                "truncation_error_over_optimal_max": round(truncation_quality(adapters, rank), 5)}
        for method in METHODS:
            walls, cpus = [], []
            for _ in range(REPEATS):
                start, cpu = time.perf_counter(), time.process_time()
                fast = am.fuse(adapters, list(adapters), [0.5, 0.5], method=method, rank=rank)
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
            rows[method] = {"batched_s": round(min(walls), 2), "batched_cpu_s": round(min(cpus), 2)}
            if method in REFERENCE:  # (DARE's random draws differ between the paths: never compared)
                cpu = time.process_time()
                reference, reference_s = reference_fuse(adapters, method, rank)
                rows[method].update(reference_s=round(reference_s, 2),
                                    reference_cpu_s=round(time.process_time() - cpu, 2),
                                    **{k: round(v, 5) for k, v in closeness(adapters, fast, reference, method).items()})
                rows[method]["speedup_cpu"] = round(rows[method]["reference_cpu_s"] / rows[method]["batched_cpu_s"], 1)
            print(label, method, rows[method], flush=True)
        results["workloads"][label] = rows
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
