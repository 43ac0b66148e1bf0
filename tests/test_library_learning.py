"""Library learning: MBC clustering of adapters by their weights, merged clusters, and the few-shot
fusion-weight search (LoRAHub)."""

import pytest
import torch

import adaptermix as am
from adaptermix.library import LoraModule
from adaptermix.library.peft_format import load_peft_adapter


def near_copy(adapter, name, seed, noise=0.05):
    gen = torch.Generator().manual_seed(seed)
    modules = {m: LoraModule(f.A + noise * torch.randn(f.A.shape, generator=gen),
                             f.B + noise * torch.randn(f.B.shape, generator=gen), f.alpha)
               for m, f in adapter.modules.items()}
    return adapter.with_metadata(name=name, modules=modules, description=f"{name} task", examples=(name,))


@pytest.fixture
def families(library, tmp_path, h):
    """Three families of near-duplicate adapters (2, 3 and 2 members)."""
    members = {}
    for family, size in (("f0", 2), ("f1", 3), ("f2", 2)):
        seed = int(family[1])
        base = load_peft_adapter(h.make_peft_checkpoint(h.tiny_llama, tmp_path / family, seed=seed))
        members[family] = [f"{family}_{i}" for i in range(size)]
        library.add_many([near_copy(base, name, 100 * seed + i) for i, name in enumerate(members[family])],
                         progress=False)
    return members


def test_clustering_is_deterministic_and_groups_near_duplicates(library, families):
    clusters = am.cluster_adapters(library, 3, seed=0)
    assert clusters == am.cluster_adapters(library, 3, seed=0)
    assert sorted(sorted(c) for c in clusters.values()) == sorted(sorted(m) for m in families.values())
    for k in (0, 8):
        with pytest.raises(ValueError, match="k must lie in"):
            am.cluster_adapters(library, k)


def test_clustered_library_holds_exact_cluster_means(library, families, tmp_path):
    clustered, members = am.clustered_library(library, tmp_path / "mbc", 3, seed=0, progress=False)
    assert len(clustered) == 3 and clustered.verify() == []
    for name, names in members.items():
        merged = clustered.get(name)
        for module, factors in merged.modules.items():
            mean = sum(library.get(n).modules[module].delta_weight() for n in names) / len(names)
            torch.testing.assert_close(factors.delta_weight(), mean, rtol=1e-5, atol=1e-6)
        assert all(n in merged.source for n in names) and len(merged.examples) == len(names)


def test_weight_search_finds_the_adapter_that_wrote_the_answers(library, checkpoints, h):
    """Targets are what the tiny model writes with the "celsius" adapter; the searched weights beat uniform."""
    library.add_many(checkpoints["sql"].parent, progress=False)
    names = library.names()
    teacher = am.compose(h.tiny_llama(), library, am.FixedRouter({"celsius": 1.0}), adapters=["celsius"])
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(5):
        prompt = torch.randint(1, 128, (1, 8), generator=gen)
        with torch.no_grad():
            full = teacher.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)[0]
        examples.append({"input_ids": full, "labels": torch.cat([torch.full((8,), -100), full[8:]])})

    def loss(weights):
        model = am.compose(h.tiny_llama(), library, am.FixedRouter(weights))
        batch = am.composer.training.pad_examples(examples, 0)
        with torch.no_grad():
            return float(model(**batch).loss)

    weights, fused = am.search_fusion_weights(h.tiny_llama(), library, names, examples, budget=60, l1=0.01,
                                              progress=False)
    searched, uniform = loss(weights), loss({n: 1 / len(names) for n in names})
    assert searched < uniform, (weights, searched, uniform)
    assert abs(weights["celsius"] - 1) < 0.3 and all(abs(w) < 0.3 for n, w in weights.items() if n != "celsius"), weights
    assert set(fused.modules) == set().union(*(library.get(n).modules for n in names))
    with pytest.raises(ValueError, match="at least one example"):
        am.search_fusion_weights(h.tiny_llama(), library, names, [])
