"""Static fusion: several adapters -> one new `LoraAdapter` (addable to a library, exportable to PEFT).

Every method is defined on the updates dW_i = s_i·B_i·A_i, not on the factors:
    linear / cat      exactly Σ w_i·dW_i, by concatenating ranks: A = [A_1; ...], B = [w_1 s_1 B_1, ...]
    svd               the linear result truncated to `rank` (exact SVD from the factors, no dense dW)
    ties, dare_linear, dare_ties, magnitude_prune
                      PEFT's own merge_utils applied to the dense dW_i, then truncated to `rank`
PEFT's `add_weighted_adapter(combination_type="linear")` instead scales and sums A and B separately, which
adds cross terms B_i·A_j; its "cat" equals our "linear". Modules some adapters lack count as dW = 0 there.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..library.adapter import LoraAdapter, LoraModule, linear_combination

__all__ = ["fuse", "FUSION_METHODS"]

FUSION_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _truncate(module: LoraModule, rank: int, dtype) -> LoraModule:
    """Best rank-`rank` approximation of the module's dW, from its factors."""
    A, B = module.A.double(), module.B.double() * module.scale
    Qa, Ra = torch.linalg.qr(A.T)
    Qb, Rb = torch.linalg.qr(B)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = min(rank, S.shape[0])
    new_B = (Qb @ U[:, :k]) * S[:k].sqrt()
    new_A = (Vh[:k] * S[:k, None].sqrt()) @ Qa.T
    return LoraModule(new_A.to(dtype), new_B.to(dtype), alpha=float(k))


def _from_dense(delta: torch.Tensor, rank: int, dtype) -> LoraModule:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = max(1, min(rank, int((S > S[0] * 1e-12).sum()) if S.numel() and S[0] > 0 else 1))
    return LoraModule((Vh[:k] * S[:k, None].sqrt()).to(dtype), (U[:, :k] * S[:k].sqrt()).to(dtype), alpha=float(k))


def _merge_dense(method: str, deltas: list[torch.Tensor], weights: torch.Tensor, density: float,
                 majority_sign_method: str) -> torch.Tensor:
    from peft.utils import merge_utils

    stacked = torch.stack(deltas)
    if method == "ties":
        return merge_utils.ties(stacked, weights, density, majority_sign_method)
    if method == "dare_linear":
        return merge_utils.dare_linear(stacked, weights, density)
    if method == "dare_ties":
        return merge_utils.dare_ties(stacked, weights, density, majority_sign_method)
    pruned = torch.stack([merge_utils.prune(d, density, method="magnitude") for d in deltas])
    return (pruned * weights.view(-1, 1, 1)).sum(0)


def fuse(source, names: list[str], weights: list[float] | None = None, *, method: str = "linear",
         rank: int | None = None, density: float = 0.5, majority_sign_method: str = "total",
         name: str | None = None, seed: int = 0, progress: bool = False) -> LoraAdapter:
    """Fuse adapters `names` of a library (or a dict name -> LoraAdapter) into one new LoraAdapter.

    Args:
        weights: one per adapter (default: uniform 1/n).
        method: one of FUSION_METHODS.
        rank: target rank for svd / ties / dare / magnitude_prune (default: the largest input rank).
        density: fraction kept by ties / dare / magnitude_prune; seed: for DARE's random drop.
        progress: a progress bar over the modules.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {FUSION_METHODS}")
    if not names:
        raise ValueError("fuse needs at least one adapter name")
    weights = [1.0 / len(names)] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
    adapters = [source[n] if isinstance(source, dict) else source.get(n) for n in names]
    bases = {a.base_model for a in adapters}
    dtype = adapters[0].dtype
    rank = rank or max(a.max_rank for a in adapters)
    modules = sorted({m for a in adapters for m in a.modules})
    fused = {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in tqdm(modules, desc=f"fuse ({method})", disable=not progress, leave=False):
            present = [(w, a.modules[module]) for w, a in zip(weights, adapters) if module in a.modules]
            if method in ("linear", "cat", "svd"):
                merged = linear_combination(present, dtype)
                fused[module] = _truncate(merged, rank, dtype) if method == "svd" else merged
            else:
                deltas = [m.delta_weight(torch.float64) for _, m in present]
                dense = _merge_dense(method, deltas, torch.tensor([w for w, _ in present], dtype=torch.float64),
                                     density, majority_sign_method)
                fused[module] = _from_dense(dense, rank, dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    if hasattr(source, "base_model"):  # a library: its members passed its base check, the fusion carries its base
        bases = {source.base_model.name}
    description = f"{method} fusion of " + ", ".join(f"{n} ({w:g})" for n, w in zip(names, weights))
    return LoraAdapter(name=name or "fused_" + "_".join(names)[:100], base_model=bases.pop() if len(bases) == 1 else "",
                       modules=fused, description=description, source=f"fuse({method})",
                       conv1d=frozenset().union(*(a.conv1d for a in adapters)) & frozenset(fused))
