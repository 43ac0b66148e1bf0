"""Library learning: Model-Based Clustering (MBC, Ostapenko et al. 2024, "Towards Modular LLMs by Building
and Reusing a Library of LoRAs").

    clusters = cluster_adapters(library, k=6, seed=0)        # {0: ["date_dmy", "date_mdy"], ...}
    clustered = clustered_library(library, "lib-mbc", k=6)    # one merged adapter per cluster

Adapters are clustered by the cosine similarity of their parameter embeddings (the library's
factorisation-invariant dW sketches, unit rows, so k-means on them is spherical k-means), with
scikit-learn's KMeans, deterministic for a seed. Each cluster is merged into one adapter: the exact mean of
its members' dW, formed by concatenating their factors (`linear_combination`), described by its members'
descriptions and example prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .adapter import LoraAdapter, linear_combination

__all__ = ["cluster_adapters", "merge_cluster", "clustered_library"]


def cluster_adapters(library, k: int, *, seed: int = 0, names: list[str] | None = None) -> dict[int, list[str]]:
    """k clusters of the library's adapters (or of `names`), numbered by their first member's order."""
    from sklearn.cluster import KMeans

    names, vectors = library.parameter_embeddings(names)
    if not 1 <= k <= len(names):
        raise ValueError(f"k must lie in [1, {len(names)}] (the number of adapters), got {k}")
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.asarray(vectors, dtype=np.float64))
    clusters: dict[int, list[str]] = {}
    order: dict[int, int] = {}
    for name, label in zip(names, labels.tolist()):
        cluster = order.setdefault(label, len(order))
        clusters.setdefault(cluster, []).append(name)
    return clusters


def merge_cluster(adapters: list[LoraAdapter], name: str) -> LoraAdapter:
    """The exact mean of the adapters' dW, as one adapter (ranks concatenated)."""
    if not adapters:
        raise ValueError("merge_cluster needs at least one adapter")
    share = 1.0 / len(adapters)
    modules = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        modules[module] = linear_combination([(share, a.modules[module]) for a in adapters if module in a.modules])
    return LoraAdapter(
        name=name, base_model=adapters[0].base_model, modules=modules,
        description="; ".join(a.description for a in adapters if a.description),
        tags=tuple(sorted({t for a in adapters for t in a.tags} | {"mbc"})),
        examples=tuple(e for a in adapters for e in a.examples),
        source="mbc(" + ", ".join(a.name for a in adapters) + ")",
    )


def clustered_library(library, path, k: int, *, seed: int = 0, progress: bool = True):
    """Write a new library at `path` with one merged adapter per cluster (named cluster_<i>). Returns
    (the new AdapterLibrary, {cluster name: member names})."""
    from .store import AdapterLibrary

    clusters = cluster_adapters(library, k, seed=seed)
    merged = {f"cluster_{i}": members for i, members in clusters.items()}
    target = AdapterLibrary.create(Path(path), base_model=library.base_model, encoder=library.encoder,
                                   config=library.config)
    adapters = [merge_cluster([library.get(n) for n in members], name) for name, members in merged.items()]
    target.add_many(adapters, progress=progress)
    return target, merged
