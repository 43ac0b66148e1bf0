"""Few-shot fusion-weight search (LoRAHub, Huang et al. 2023): gradient-free search over one weight per
adapter on a handful of examples, minimising the answer loss plus an L1 penalty; returns the weights and
the fused adapter.

    weights, fused = search_fusion_weights(model, library, names, examples, budget=60)
    fused.save_peft("out/fused")

The search runs CMA-ES (the `cma` package) in [-1.5, 1.5]^N from uniform weights. Each candidate is scored
by composing the adapters with fixed weights through the mixture kernel: no merged weights are written
until the end, where the best weights give `fuse(..., method="linear")`, the exact weighted sum of dW.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..library.adapter import LoraAdapter
from ..routers.fixed import FixedRouter
from .compose import compose, unload
from .fusion import fuse
from .training import pad_examples

__all__ = ["search_fusion_weights"]


def search_fusion_weights(model, library, names: list[str], examples: list, *, budget: int = 60,
                          l1: float = 0.05, bound: float = 1.5, seed: int = 0, pad_id: int = 0,
                          name: str = "lorahub", progress: bool = True) -> tuple[dict[str, float], LoraAdapter]:
    """Search fusion weights of `names` on `examples` (1-D token-id tensors, or dicts with "input_ids" and
    "labels", -100 = no loss; LoRAHub uses <= 5). Returns ({name: weight}, the fused LoraAdapter).

    The model is composed for the search and given back unloaded (unchanged)."""
    import cma

    if not examples:
        raise ValueError("search_fusion_weights needs at least one example")
    if not names:
        raise ValueError("search_fusion_weights needs at least one adapter name")
    if budget < 2:
        raise ValueError(f"budget must be >= 2 loss evaluations, got {budget}")
    examples = [e if isinstance(e, dict) else {"input_ids": e} for e in examples]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in pad_examples(examples, pad_id).items()}
    router = FixedRouter({n: 1.0 / len(names) for n in names})
    composed = compose(model, library, router, adapters=list(names), trace=False)
    try:
        def objective(weights) -> float:
            router._weights = torch.tensor(weights, dtype=torch.float32)
            with torch.no_grad():
                loss = float(composed(**batch).loss)
            return loss + l1 * float(abs(torch.tensor(weights)).sum())

        start = [1.0 / len(names)] * len(names)
        if len(names) == 1:              # CMA-ES needs two dimensions: a 1-D search is a scan
            grid = torch.linspace(-bound, bound, budget).tolist()
            scores = [objective([w]) for w in tqdm(grid, desc="weight search", disable=not progress)]
            best = [grid[min(range(len(grid)), key=scores.__getitem__)]]
        else:
            search = cma.CMAEvolutionStrategy(start, 0.5, {"bounds": [-bound, bound], "seed": seed + 1,
                                                           "maxfevals": budget, "verbose": -9})
            bar = tqdm(total=budget, desc="weight search", disable=not progress)
            best, best_score = start, objective(start)
            while not search.stop():
                candidates = search.ask()
                scores = [objective(list(c)) for c in candidates]
                search.tell(candidates, scores)
                bar.update(len(candidates))
                i = min(range(len(scores)), key=scores.__getitem__)
                if scores[i] < best_score:
                    best, best_score = list(candidates[i]), scores[i]
            bar.close()
    finally:
        unload(composed)
    weights = {n: float(w) for n, w in zip(names, best)}
    return weights, fuse(library, list(names), list(weights.values()), method="linear", name=name)
