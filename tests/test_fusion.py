"""The batched dense fusion (ties, dare, magnitude_prune) against the path it replaced: PEFT's merge_utils on
float64 dense updates and an exact SVD (`reference_merge`)."""

import pytest
import torch

import adaptermix as am
from adaptermix.composer.fusion import DENSE_MERGES, reference_merge, truncate_dense


def adapters(shapes, rank=4, n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        modules = {f"m{j}": am.LoraModule(torch.randn(rank, d_in, generator=generator),
                                          torch.randn(d_out, rank, generator=generator), 2.0 * rank)
                   for j, (d_out, d_in) in enumerate(shapes)}
        out[f"a{i}"] = am.LoraAdapter(f"a{i}", "tiny", modules)
    return out


SHAPES = [(48, 40), (48, 40), (17, 64), (64, 17), (48, 40)]   # groups of one shape, awkward sizes


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, -0.5, -0.5]])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_merge_equals_peft_merge_utils(method, weights, majority):
    group = adapters(SHAPES)
    for module in ("m0", "m2"):
        deltas = [a.modules[module].delta_weight(torch.float64) for a in group.values()]
        from peft.utils import merge_utils

        stacked = torch.stack(deltas)
        w = torch.tensor(weights, dtype=torch.float64)
        expected = (merge_utils.ties(stacked, w, 0.4, majority) if method == "ties"
                    else merge_utils.magnitude_prune(list(stacked), w, 0.4))
        got = DENSE_MERGES[method].merge(torch.stack(deltas).float()[None], torch.tensor(weights), density=0.4,
                                         majority_sign_method=majority, generator=torch.Generator())[0]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_fuse_equals_the_old_path_where_the_math_is_unchanged(method):
    group = adapters(SHAPES)
    rank = 6
    fused = am.fuse(group, list(group), [0.5, 0.3, 0.2], method=method, rank=rank, density=0.5)
    for module, factors in fused.modules.items():
        deltas = [a.modules[module].delta_weight(torch.float64) for a in group.values()]
        reference = reference_merge(method, deltas, [0.5, 0.3, 0.2], rank=rank, density=0.5)
        # the truncation is randomized subspace iteration: equal to the exact SVD's within its accuracy
        error = (factors.delta_weight() - reference).norm() / reference.norm()
        assert error < 2e-2, (module, float(error))
        assert factors.rank == rank


def test_truncation_is_near_optimal_and_exact_when_small():
    generator = torch.Generator().manual_seed(1)
    matrices = torch.randn(3, 200, 120, generator=generator) + \
        5 * torch.randn(3, 200, 6, generator=generator) @ torch.randn(3, 6, 120, generator=generator)
    A, B, S = truncate_dense(matrices, 6, torch.Generator().manual_seed(0))
    for i in range(3):
        exact = torch.linalg.svdvals(matrices[i].double())
        assert float((matrices[i] - B[i] @ A[i]).norm() / exact[6:].norm()) < 1.01
        torch.testing.assert_close(S[i].double(), exact[:6], rtol=1e-3, atol=1e-3)
    small = torch.randn(2, 12, 9, generator=generator)     # r + oversampling covers 9 columns: an exact SVD
    A, B, _ = truncate_dense(small, 3, generator)
    for i in range(2):
        U, S, Vh = torch.linalg.svd(small[i])
        torch.testing.assert_close(B[i] @ A[i], (U[:, :3] * S[:3]) @ Vh[:3], rtol=1e-4, atol=1e-5)


def test_dare_is_seeded_unbiased_and_leaves_the_global_generator_alone():
    group = adapters([(64, 64)] * 4, n=2)
    state = torch.random.get_rng_state()
    one = am.fuse(group, ["a0", "a1"], method="dare_linear", rank=64, density=0.5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    two = am.fuse(group, ["a0", "a1"], method="dare_linear", rank=64, density=0.5, seed=3)
    other = am.fuse(group, ["a0", "a1"], method="dare_linear", rank=64, density=0.5, seed=4)
    assert torch.equal(one.modules["m0"].delta_weight(), two.modules["m0"].delta_weight())
    assert not torch.equal(one.modules["m0"].delta_weight(), other.modules["m0"].delta_weight())
    # rank 64 = full: the drop-and-rescale is unbiased, so over many seeds the mean approaches the linear sum
    linear = sum(0.5 * a.modules["m0"].delta_weight() for a in group.values())
    mean = sum(am.fuse(group, ["a0", "a1"], method="dare_linear", rank=64, seed=s).modules["m0"].delta_weight()
               for s in range(40)) / 40
    assert float((mean - linear).norm() / linear.norm()) < 0.25


def test_bad_density_and_a_module_some_adapters_lack():
    group = adapters([(32, 16)], n=2)
    group["a1"].modules["extra"] = am.LoraModule(torch.randn(4, 16), torch.randn(8, 4), 8.0)
    fused = am.fuse(group, ["a0", "a1"], [0.6, 0.4], method="ties", rank=4)
    expected = 0.4 * group["a1"].modules["extra"].delta_weight()    # alone there: ties keeps its top half
    pruned = reference_merge("ties", [group["a1"].modules["extra"].delta_weight()], [0.4], rank=4)
    torch.testing.assert_close(fused.modules["extra"].delta_weight(), pruned, rtol=1e-3, atol=1e-4)
    assert fused.modules["extra"].delta_weight().count_nonzero() <= expected.numel()
    with pytest.raises(ValueError, match="density"):
        am.fuse(group, ["a0", "a1"], method="ties", density=1.5)
