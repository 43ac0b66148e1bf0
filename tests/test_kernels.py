"""lora_mixture: every backend against the float64 reference, forward and backward, awkward sizes."""

import contextlib
import functools

import pytest
import torch

from adaptermix.kernels import configs, cpu_backend, lora_mixture, lora_mixture_reference

@pytest.fixture(autouse=True)
def poisoned_allocations():
    """Every tensor the op allocates without initialising (torch.empty and kin: scratch, plans, results)
    starts as NaN (floats) or the dtype's largest value (integers), so a kernel that reads what it never
    wrote fails here instead of passing on zeroed memory. (torch fills only in deterministic mode; warn_only
    keeps ops without a deterministic version running.)"""
    import warnings

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
        yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]


# Relative tolerance (max |err| / max |ref|) by dtype: one helper for every comparison.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to(result: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    scale = reference.abs().max().clamp_min(1e-6)
    error = (result.double() - reference).abs().max() / scale
    assert torch.isfinite(result).all(), "non-finite values in the result"
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]} for {dtype}"


def make_case(T, d_in, d_out, N, r_max, k, *, dtype, seed=0, ranks=None, idx=None, empty_slots=0.2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    A = torch.randn(N, r_max, d_in, generator=gen) / d_in ** 0.5
    B = torch.randn(N, d_out, r_max, generator=gen)
    ranks = torch.randint(1, r_max + 1, (N,), generator=gen) if ranks is None else torch.as_tensor(ranks)
    # Poison the padding past each rank: it must be ignored.
    pad = torch.arange(r_max)[None, :] >= ranks[:, None]
    A[pad] = 1e4
    B.transpose(1, 2)[pad] = -1e4
    if idx is None:
        idx = torch.randint(0, N, (T, k), generator=gen)
        idx[torch.rand(T, k, generator=gen) < empty_slots] = -1
    weights = torch.randn(T, k, generator=gen)
    scales = torch.rand(N, generator=gen) + 0.5
    base = torch.randn(T, d_out, generator=gen)
    return dict(x=x.to(dtype), A=A.to(dtype), B=B.to(dtype), scales=scales, idx=idx, weights=weights.to(dtype),
                ranks=ranks, base=base.to(dtype))


def reference_of(case):
    double = {k: (v.double() if v.dtype.is_floating_point else v) for k, v in case.items()}
    return lora_mixture_reference(double["x"], double["A"], double["B"], double["scales"], double["idx"],
                                  double["weights"], ranks=double["ranks"], base=double["base"])


@contextlib.contextmanager
def strategy(name):
    """Pin a backend's strategy: the torch backend's dense / runs / sorted, or the triton backend's fused /
    cluster / bgmv / plan (forward and backward)."""
    with configs.pin_torch_strategy(name if name in configs.TORCH_STRATEGIES else None), \
            configs.pin_triton_strategy(name if name in configs.TRITON_STRATEGIES else None):
        yield


def run(case, backend, **kwargs):
    """backend may be 'torch-dense' / 'torch-runs' / 'torch-sorted' / 'triton-fused' / 'triton-cluster' /
    'triton-plan' / 'triton-bgmv' to pin a strategy."""
    name, _, pinned = backend.partition("-")
    with strategy(pinned):
        return lora_mixture(case["x"], case["A"], case["B"], case["scales"], case["idx"], case["weights"],
                            ranks=case["ranks"], backend=name, **kwargs)


def assert_gradients_match(case, backend, dtype, grad=None, **factors):
    """Gradients of x, weights and base through `backend` (a pinned strategy runs forward and backward)
    against autograd through the float64 reference; factors= gives A / B in another layout (same values) for
    the backend's call. grad defaults to ones. Returns (y, the float64 y)."""
    x = case["x"].clone().requires_grad_()
    weights = case["weights"].clone().requires_grad_()
    base = case["base"].clone().requires_grad_()
    name, _, pinned = backend.partition("-")
    with strategy(pinned):
        y = lora_mixture(x, factors.get("A", case["A"]), factors.get("B", case["B"]), case["scales"], case["idx"],
                         weights, ranks=case["ranks"], base=base, backend=name)
        grad = torch.ones_like(y) if grad is None else grad
        y.backward(grad)
    x64 = case["x"].to(torch.float64, copy=True).requires_grad_()
    w64 = case["weights"].to(torch.float64, copy=True).requires_grad_()
    y64 = lora_mixture_reference(x64, case["A"].double(), case["B"].double(), case["scales"].double(), case["idx"],
                                 w64, ranks=case["ranks"], base=case["base"].double())
    y64.backward(grad.double())
    assert_close_to(x.grad, x64.grad, dtype)
    assert_close_to(weights.grad, w64.grad, dtype)
    assert torch.equal(base.grad, grad)
    return y.detach(), y64.detach()


SHAPES = {
    # name: (T, d_in, d_out, N, r_max, k, extra)
    "aligned": (64, 96, 64, 6, 8, 2, {}),
    "awkward_d": (37, 100, 70, 5, 6, 3, {}),
    "one_token": (1, 64, 48, 3, 4, 2, {}),
    "one_adapter": (20, 32, 40, 1, 4, 1, {}),
    "k8_duplicates": (16, 48, 32, 3, 8, 8, {}),
    "all_on_one_adapter": (33, 40, 24, 7, 5, 2, {"idx": "one"}),
    "unused_adapters": (12, 24, 40, 50, 4, 2, {}),
    "all_empty": (9, 16, 16, 4, 4, 2, {"idx": "empty"}),
    "rank_one": (17, 24, 24, 4, 1, 2, {}),
    "narrower_than_a_vector": (11, 5, 3, 3, 9, 2, {}),   # d below one SIMD vector; r_max = 8 + 1
}


def build(name, dtype, seed=0):
    T, d_in, d_out, N, r_max, k, extra = SHAPES[name]
    idx = None
    if extra.get("idx") == "one":
        idx = torch.full((T, k), 3)
    elif extra.get("idx") == "empty":
        idx = torch.full((T, k), -1)
    return make_case(T, d_in, d_out, N, r_max, k, dtype=dtype, seed=seed, idx=idx)


CASES = [("reference", torch.float64), ("triton-plan", torch.float32), ("triton-plan", torch.float16),
         ("triton-bgmv", torch.float32), ("triton-bgmv", torch.float16), ("triton-fused", torch.float32),
         ("triton-fused", torch.float16), ("triton-cluster", torch.float32), ("triton-cluster", torch.float16),
         ("cpu", torch.float64),
         ("cpu", torch.float32)] + [
    (f"torch-{strategy}", dtype) for strategy in configs.TORCH_STRATEGIES
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]


def applies(shape, backend) -> bool:
    """The fused kernels take N·r_max <= configs.FUSED_MAX_COLUMNS, the clustered one
    N <= configs.CLUSTER_MAX_ADAPTERS."""
    T, d_in, d_out, N, r_max, k, _ = SHAPES[shape]
    if backend == "triton-fused":
        return configs.fused_fits(N * r_max)
    if backend == "triton-cluster":
        return configs.cluster_fits(N, r_max)
    return True


FORWARD = [(shape, backend, dtype) for shape in SHAPES for backend, dtype in CASES if applies(shape, backend)]


@pytest.mark.parametrize("shape, backend, dtype", FORWARD)
def test_forward_matches_float64_reference(shape, backend, dtype):
    case = build(shape, dtype)
    expected = reference_of(case)
    y = run(case, backend, base=case["base"])
    assert y.dtype == dtype and y.shape == expected.shape
    assert_close_to(y, expected, dtype)
    out = case["base"].clone()
    assert run(case, backend, out=out) is out          # accumulates into the base output in place
    assert_close_to(out, expected, dtype)


@pytest.mark.parametrize("shape", ["aligned", "awkward_d", "k8_duplicates", "one_token", "all_on_one_adapter"])
@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                            ("triton-plan", torch.float32), ("triton-fused", torch.float32),
                                            ("triton-fused", torch.float16), ("torch", torch.bfloat16),
                                            ("cpu", torch.float64), ("cpu", torch.float32),
                                            ("torch-sorted", torch.float64), ("torch-sorted", torch.float32)])
def test_backward_matches_autograd_through_the_reference(shape, backend, dtype):
    case = build(shape, dtype, seed=1)
    grad = torch.randn(case["base"].shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert_gradients_match(case, backend, dtype, grad)


def test_one_adapter_per_sequence_equals_plain_lora():
    """k = 1, w = 1 (multi-tenant serving) is each token's own LoRA: x @ (s·B·A).T."""
    case = make_case(30, 32, 24, 4, 4, 1, dtype=torch.float64, ranks=[4, 4, 4, 4], empty_slots=0.0)
    case["weights"] = torch.ones(30, 1, dtype=torch.float64)
    y = run(case, "torch", base=case["base"])
    for t in range(30):
        e = int(case["idx"][t, 0])
        delta = case["scales"][e].double() * case["B"][e] @ case["A"][e]
        torch.testing.assert_close(y[t], case["base"][t] + delta @ case["x"][t])


def test_zero_weights_and_empty_slots_give_the_base_exactly():
    case = build("aligned", torch.float32)
    case["weights"] = torch.zeros_like(case["weights"])
    for backend in ("torch-dense", "torch-runs", "torch-sorted", "triton-fused", "triton-plan", "triton-bgmv",
                    "cpu"):
        assert torch.equal(run(case, backend, base=case["base"]), case["base"])


def per_sequence_case(dtype, d_out=48):
    """Five sequences of ragged lengths, each routed to its own adapter pair (k = 2): an empty slot in one, a
    duplicate adapter in another, the first and last the same pair; mixed ranks, per-token weights."""
    pairs, lengths = [[3, 0], [5, -1], [2, 2], [0, 4], [3, 0]], [7, 1, 12, 5, 9]
    idx = torch.cat([torch.tensor(pair).repeat(n, 1) for pair, n in zip(pairs, lengths)])
    return make_case(idx.shape[0], 40, d_out, 6, 8, 2, dtype=dtype, seed=3, idx=idx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d_out", [48, 36])        # 36: fp16 / bf16 rows not 16-byte aligned (the loop fallback)
def test_torch_runs_pass_multiplies_each_run_by_its_own_adapters(dtype, d_out):
    from adaptermix.kernels import torch_backend

    case = per_sequence_case(dtype, d_out)
    keys = torch_backend.slot_keys(case["idx"], 6)
    assert torch_backend.token_runs(keys).tolist() == [0, 7, 8, 20, 25]
    expected = reference_of(case)
    assert_close_to(run(case, "torch-runs", base=case["base"]), expected, dtype)
    out = case["base"].clone()
    run(case, "torch-runs", out=out)
    assert_close_to(out, expected, dtype)
    assert_gradients_match(case, "torch-runs", dtype)            # backward: the per-slot sorted primitives


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_torch_runs_pass_in_equal_chunks(dtype):
    """Sequences of one length (40 tokens; the first two share their adapters, so their runs merge): every run
    is a whole number of 40-token chunks, and the pass runs as batched products on (chunks, 40, d) views,
    into out in place, also where out is a strided view; ragged runs take the grouped path."""
    from adaptermix.kernels import torch_backend

    pairs = [[3, 0], [3, 0], [5, -1], [2, 2]]
    idx = torch.cat([torch.tensor(pair).repeat(40, 1) for pair in pairs])
    case = make_case(160, 40, 48, 6, 8, 2, dtype=dtype, seed=5, idx=idx)
    starts = torch_backend.token_runs(torch_backend.slot_keys(idx, 6))
    assert starts.tolist() == [0, 80, 120] and torch_backend.chunk_length(starts, 160, 8) == 40
    assert torch_backend.chunk_length(torch.tensor([0, 7, 8, 20, 25]), 34, 8) == 0      # per_sequence_case
    assert torch_backend.chunk_length(torch.tensor([0, 80]), 160, 8) == 80
    expected = reference_of(case)
    assert_close_to(run(case, "torch-runs", base=case["base"]), expected, dtype)
    wide = torch.zeros(160, 53, dtype=dtype)
    out = wide[:, 2:50]                                              # rows 53 apart: a strided view of wide
    out.copy_(case["base"])
    run(case, "torch-runs", out=out)
    assert_close_to(out, expected, dtype)
    assert not wide[:, :2].any() and not wide[:, 50:].any()          # nothing written outside the view


def test_few_runs_reads_a_prefix_first_and_agrees_with_the_full_count():
    """few_runs returns token_runs' starts exactly when that many runs pay, whether it decides on the host
    prefix (routing changing token to token; a batch no longer than the prefix) or counts on the device."""
    from adaptermix.kernels import torch_backend

    gen = torch.Generator().manual_seed(7)

    def layout(lengths, k=2, N=9):
        pairs = [torch.randperm(N, generator=gen)[:k] for _ in lengths]
        return torch.cat([pair.repeat(n, 1) for pair, n in zip(pairs, lengths)])

    cases = [layout([1] * 64), layout([64]), layout([16] * 4), layout([4] * 16), layout([1024]),
             layout([64] * 16), layout([100] + [1] * 924), layout([16] * 64), layout([500, 3, 200, 321]),
             layout([31] * 33 + [1]), layout([32] * 32), layout([300, 300, 300, 124], k=1),
             layout([32, 32]), layout([20, 20, 24])]          # T = 64: two runs pay, three do not
    for idx in cases:
        keys = torch_backend.slot_keys(idx, 9)
        starts = torch_backend.token_runs(keys)
        pays = torch_backend.runs_pay(starts.numel(), idx.shape[0], 8)
        found = torch_backend.few_runs(keys, 8)
        assert (found is not None) == pays, (idx.shape, starts.numel())
        if pays:
            assert found.tolist() == starts.tolist()


def test_torch_adapter_census_and_token_changes():
    """The census counts each adapter's pairs and ignores empty slots; it skips looking only where the stack
    is narrower than d and pairs are at least 4N. token_changes marks where a routing row differs."""
    from adaptermix.kernels import torch_backend

    idx = torch.tensor([[3, -1], [3, -1], [0, 3], [0, 3], [5, 5]])
    keys = torch_backend.slot_keys(idx, 6)
    n, counts = torch_backend.adapter_census(keys, 6, 8, d=32)           # N·r = 48 > d: it looks
    assert n == 3 and counts.tolist() == [2, 0, 0, 4, 0, 2]
    assert torch_backend.adapter_census(keys, 2, 1, d=32) == (2, None)    # N·r = 2 <= d, 10 pairs >= 8: all
    assert torch_backend.token_changes(keys).tolist() == [False, True, False, True]
    assert torch_backend.token_runs(keys).tolist() == [0, 2, 4]
    n, counts = torch_backend.adapter_census(torch_backend.slot_keys(torch.full((3, 2), -1), 6), 6, 8, d=32)
    assert n == 0 and counts.tolist() == [0] * 6
    # no census where dense cannot win whatever the count: neither one adapter (a gather) nor all of them
    may_win = functools.partial(torch_backend.dense_may_win, d_in=576, d_out=576, r_max=8, device_type="cpu",
                                segmented="sparse")
    assert may_win(64, N=4, k=2) and not may_win(64, N=32, k=1) and not may_win(64, N=32, k=2)


def test_torch_strategy_by_shape(monkeypatch):
    """auto: dense over a narrow stack, the runs pass for per-sequence batches over a wide one, else the
    segmented pass: sparse on the CPU (half types in float32), sorted elsewhere for dtypes torch.sparse does
    not take; a pin wins, and an unknown one is refused by name."""
    from adaptermix.kernels import torch_backend, torch_sparse

    taken = []
    for name in ("forward_dense_", "forward_runs_", "forward_sorted_"):
        monkeypatch.setattr(torch_backend, name, lambda *args, name=name: taken.append(name[8:-1]))
    monkeypatch.setattr(torch_sparse, "forward_", lambda *args: taken.append("sparse"))

    def strategy_of(N, idx, pin=None, dtype=torch.float32):
        case = make_case(idx.shape[0], 64, 64, N, 8, idx.shape[1], dtype=dtype, idx=idx)
        taken.clear()
        with torch.no_grad():
            run(case, "torch" if pin is None else f"torch-{pin}", base=case["base"])
        return taken[0]

    gen = torch.Generator().manual_seed(0)
    top2 = torch.stack([torch.randperm(32, generator=gen)[:2] for _ in range(512)])
    sequences = (torch.arange(512) // 32)[:, None] * 2                      # 16 runs of 32 tokens, 16 adapters
    assert strategy_of(4, top2 % 4) == "dense"                               # N·r = 32 <= d = 64
    assert strategy_of(32, sequences) == "runs"                              # 16 used: n·r = 128 > d
    assert strategy_of(32, top2) == "sparse"
    assert strategy_of(32, top2, dtype=torch.float16) == "sparse"            # on the CPU, in float32
    # the sparse pass stays on the CPU (cuSPARSE leaves its routing matrix undefined): off it, the table
    # cannot choose it and a pin is refused by name
    monkeypatch.setitem(configs.TORCH_SEGMENTED_PASS, "cuda", "sparse")
    assert torch_backend.segmented_pass("cuda") == "sorted" and torch_backend.segmented_pass("cpu") == "sparse"
    with configs.pin_torch_strategy("sparse"), pytest.raises(ValueError, match="sparse pass runs on the CPU"):
        torch_backend.segmented_pass("cuda")
    # half types on a CPU: natively where oneDNN runs their GEMMs natively, else in float32
    monkeypatch.setattr(torch_backend, "native_half_gemm", lambda dtype: dtype == torch.bfloat16)
    assert torch_backend.compute_dtype("cpu", torch.bfloat16) == torch.bfloat16
    assert torch_backend.compute_dtype("cpu", torch.float16) == torch.float32
    assert torch_backend.compute_dtype("cuda", torch.bfloat16) == torch.bfloat16
    # native half flops are cheaper: dense wins a stack that float32 leaves to the sparse pass
    prefer = functools.partial(torch_backend.prefer_dense, 1024, 576, 576, k=2, r_max=8, device_type="cpu",
                               segmented="sparse", subset=False)
    assert not prefer(16 * 8) and prefer(16 * 8, dtype=torch.bfloat16) and not prefer(16 * 8, dtype=torch.float16)
    assert strategy_of(32, sequences, dtype=torch.bfloat16) == "sparse"      # native half: the runs pass sits out
    assert strategy_of(32, sequences, dtype=torch.float16) == "runs"
    monkeypatch.setattr(torch_backend, "native_half_gemm", lambda dtype: False)
    assert torch_backend.compute_dtype("cpu", torch.bfloat16) == torch.float32
    assert not prefer(16 * 8, dtype=torch.bfloat16)
    assert strategy_of(32, (torch.arange(512) // 16)[:, None] % 32) == "sparse"    # 32 runs: G·r·4 > T
    assert strategy_of(32, top2, pin="runs") == "runs"
    assert strategy_of(4, top2 % 4, pin="sorted") == "sorted"
    assert strategy_of(4, top2 % 4, pin="sparse") == "sparse"
    assert strategy_of(32, sequences, pin="dense") == "dense"
    with pytest.raises(ValueError, match="strategy must be one of"):
        with configs.pin_torch_strategy("magic"):
            pass


@pytest.mark.parametrize("in_place", [True, False])      # the forward's expand: CSR addmm_ / embedding bag
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])   # float16: computed in float32
def test_torch_sparse_pass_forward_and_backward(dtype, in_place, monkeypatch):
    """The CSR routing pass: k = 5 over N = 3 (duplicates; more entries per row than R has columns, so two
    slot groups), empty slots, ranks 1..r_max with poisoned padding, d not a multiple of anything."""
    from adaptermix.kernels import torch_sparse

    monkeypatch.setattr(torch_sparse, "EXPAND_IN_PLACE", in_place)
    case = make_case(29, 37, 23, 3, 6, 5, dtype=dtype, seed=7, ranks=[1, 6, 4])
    expected = reference_of(case)
    assert_close_to(run(case, "torch-sparse", base=case["base"]), expected, dtype)
    out = case["base"].clone()
    run(case, "torch-sparse", out=out)
    assert_close_to(out, expected, dtype)
    grad = torch.randn(29, 23, generator=torch.Generator().manual_seed(8)).to(dtype)
    assert_gradients_match(case, "torch-sparse", dtype, grad)


def test_torch_sparse_pass_warns_nothing():
    """torch.sparse's one-time beta warning is spent silently on first use and the CSR tensors opt out of
    invariant checks explicitly: a user's warnings stay clean."""
    import warnings

    case = build("aligned", torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_gradients_match(case, "torch-sparse", torch.float32)
    assert not [str(w.message) for w in caught]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_types_either_way(dtype, native, monkeypatch):
    """Half types on a CPU, both ways whatever this machine has: multiplied natively (oneDNN's bf16 / fp16
    GEMMs) or in float32, through every torch strategy and auto; mixed ranks with poisoned padding, empty
    slots, an out of the half type accumulated in place."""
    from adaptermix.kernels import torch_backend

    monkeypatch.setattr(torch_backend, "native_half_gemm", lambda half: native)
    case = make_case(40, 48, 40, 6, 8, 2, dtype=dtype, seed=11, ranks=[8, 3, 5, 8, 1, 6])
    expected = reference_of(case)
    for backend in ("torch", "torch-dense", "torch-runs", "torch-sparse", "torch-sorted"):
        out = case["base"].clone()
        run(case, backend, out=out)
        assert_close_to(out, expected, dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu", "torch", "torch-dense", "torch-runs", "torch-sparse",
                                     "torch-sorted"])
def test_no_slots_is_the_base(backend):
    """k = 0 (a router that picks nothing): the output is the base, dx is zero, d(weights) is (T, 0)."""
    case = make_case(7, 12, 10, 3, 4, 0, dtype=torch.float64)
    assert case["idx"].shape == (7, 0)
    x, weights, base = (case[name].clone().requires_grad_(True) for name in ("x", "weights", "base"))
    y = run(dict(case, x=x, weights=weights), backend, base=base)
    assert torch.equal(y.detach(), case["base"])
    y.sum().backward()
    assert torch.equal(base.grad, torch.ones_like(base))
    assert x.grad is None or torch.equal(x.grad, torch.zeros_like(x))           # the reference: x unused
    assert weights.grad is None or weights.grad.shape == (7, 0)


def test_full_ranks_are_known_without_looking():
    """ranks=None becomes one cached all-r_max tensor per shape and device, whose minimum the backends know
    by identity (no device sync); any other tensor is looked at."""
    from adaptermix.kernels.validation import full_ranks, is_full_ranks, lowest_rank

    cpu = torch.device("cpu")
    full = full_ranks(5, 8, cpu)
    assert full is full_ranks(5, 8, cpu) and full.tolist() == [8] * 5 and full.dtype == torch.int32
    assert is_full_ranks(full, 8) and lowest_rank(full, 8) == 8 and not is_full_ranks(full, 9)
    lookalike = torch.full((5,), 8, dtype=torch.int32)
    assert not is_full_ranks(lookalike, 8) and lowest_rank(lookalike, 8) == 8
    assert lowest_rank(torch.tensor([8, 3, 8, 8, 8], dtype=torch.int32), 8) == 3


def test_out_refuses_autograd():
    case = build("aligned", torch.float32)
    with pytest.raises(ValueError, match="not differentiable"):
        run(dict(case, x=case["x"].requires_grad_()), "torch", out=case["base"].clone())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_traces_the_registered_op_without_graph_breaks(backend):
    case = build("aligned", torch.float32)
    if backend == "cpu":   # the native kernels are built eagerly, never while torch.compile traces
        assert cpu_backend.available(), cpu_backend.build_error()

    def layer(x, weights):
        return lora_mixture(x, case["A"], case["B"], case["scales"], case["idx"], weights, ranks=case["ranks"],
                            base=case["base"], backend=backend, validate=False)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = case["x"].clone().requires_grad_()
    y = compiled(x, case["weights"])
    y.sum().backward()
    assert_close_to(y.detach(), reference_of(case), torch.float32)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("change, error, words", [
    (lambda c: c.update(A=c["A"][:, :, :-1]), ValueError, "A's last dim"),
    (lambda c: c.update(B=c["B"][:-1]), ValueError, "B must be"),
    (lambda c: c.update(B=c["B"].double()), TypeError, "B has dtype"),
    (lambda c: c.update(idx=c["idx"].float()), TypeError, "idx must be an integer"),
    (lambda c: c.update(idx=c["idx"].clone().fill_(6)), ValueError, "idx must lie in"),
    (lambda c: c.update(idx=c["idx"].clone().fill_(-2)), ValueError, "idx must lie in"),
    (lambda c: c["weights"].__setitem__((0, 0), float("nan")), ValueError, "weights contain NaN"),
    (lambda c: c.update(weights=c["weights"][:, :1]), ValueError, "weights must match idx"),
    (lambda c: c.update(ranks=torch.full((6,), 9)), ValueError, "ranks must lie in"),
    (lambda c: c.update(ranks=torch.zeros(6, dtype=torch.long)), ValueError, "ranks must lie in"),
    (lambda c: c.update(scales=c["scales"][:2]), ValueError, "scales must be"),
    (lambda c: c.update(x=c["x"].to("meta")), ValueError, "is on"),
])
def test_bad_input_names_the_argument(change, error, words):
    case = build("aligned", torch.float32)
    change(case)
    with pytest.raises(error, match=words):
        run(case, "torch", base=case["base"] if case["x"].device.type != "meta" else None)


def test_triton_strategy_by_shape_and_pins(monkeypatch):
    """Small stacks take the fused kernels, small batches of wide stacks the per-entry ones, the rest the
    grouped GEMM; a pin wins, and a stack too wide for the fused kernels' registers is refused by name."""
    wide = configs.FUSED_MAX_COLUMNS + 1
    assert configs.triton_strategy(4096, 4, 16) == "fused"
    assert configs.triton_strategy(4096, wide, 1) == "plan"
    assert configs.triton_strategy(1, wide, 1) == "bgmv"
    with configs.pin_triton_strategy("plan"):
        assert configs.triton_strategy(1, 4, 16) == "plan"
        with configs.pin_triton_strategy("bgmv"):
            assert configs.triton_strategy(1, 4, 16) == "bgmv"
        assert configs.triton_strategy(1, 4, 16) == "plan"
    assert configs.triton_strategy(1, 4, 16) == "fused"
    monkeypatch.setattr(configs, "CLUSTER_AUTO_MAX_ADAPTERS", 64)          # once timed: prefill, N <= 64
    assert configs.triton_strategy(4096, 32, 16) == "cluster"
    assert configs.triton_strategy(4096, 65, 16) == "plan"
    assert configs.triton_strategy(1, 32, 16) == "bgmv"                  # never the clustered kernel at decode
    assert configs.triton_strategy(4096, 4, 16) == "fused"
    monkeypatch.undo()
    assert configs.triton_strategy(4096, 32, 16) == "plan"                # until then, pinned only
    with configs.pin_triton_strategy("cluster"):
        assert configs.triton_strategy(4096, 32, 16) == "cluster"
    with pytest.raises(ValueError, match="strategy must be one of"):
        with configs.pin_triton_strategy("magic"):
            pass
    case = make_case(8, 32, 32, 3, configs.FUSED_MAX_COLUMNS, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="fused kernels take"):
        run(case, "triton-fused", base=case["base"])
    assert_close_to(run(case, "triton", base=case["base"]), reference_of(case), torch.float32)   # auto: not fused


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_triton_fused_takes_strided_factors_and_another_out_dtype(layout):
    """B as the composer stores it (a transposed view of rows), x and out with strided rows, a float32 out
    under float16 inputs, and (unpacked) factor stacks whose adapters are not back to back (slices of
    wider-rank stacks): the same mixture, forward and backward."""
    case = build("awkward_d", torch.float16)
    expected = reference_of(case)
    N, d_out, r_max = case["B"].shape
    A, B = case["A"], case["B"].transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "unpacked":
        A = torch.zeros(N, r_max + 3, A.shape[2], dtype=A.dtype)[:, :r_max].copy_(A)
        B = torch.zeros(N, r_max + 2, d_out, dtype=B.dtype)[:, :r_max].copy_(B.transpose(1, 2)).transpose(1, 2)
    from adaptermix.kernels.triton_fused import packed

    assert packed(A, 1) == packed(B, 2) == (layout == "packed")
    x_wide = torch.zeros(case["x"].shape[0], 2 * case["x"].shape[1], dtype=torch.float16)[:, ::2]
    x_wide.copy_(case["x"])
    out = case["base"].float().T.contiguous().T                                 # column-major rows
    run(dict(case, A=A, B=B, x=x_wide), "triton-fused", out=out)
    assert_close_to(out, expected, torch.float16)
    assert_gradients_match(case, "triton-fused", torch.float16, A=A, B=B)


def test_triton_fused_grid_of_token_blocks_and_d_out_chunks(monkeypatch):
    """The GPU grid run in the interpreter: several token blocks (the last one ragged), several d_in steps,
    and d_out split into chunks of whole BN steps with a ragged last chunk, forward and backward."""
    from adaptermix.kernels import triton_fused

    def small_blocks(columns, T, d_out, device):
        return configs.FusedConfig(configs.fused_columns(columns), BM=16, BK=32, BN=16, split=3, num_warps=1,
                                   num_stages=1)

    monkeypatch.setattr(triton_fused, "fused_config", small_blocks)
    case = make_case(37, 100, 70, 5, 6, 3, dtype=torch.float32, seed=5)           # chunks [0, 32) [32, 64) [64, 70)
    case["idx"][::5, 2] = case["idx"][::5, 0]                                       # duplicates within a token
    y, y64 = assert_gradients_match(case, "triton-fused", torch.float32)
    assert_close_to(y, y64, torch.float32)


def test_fused_config_splits_d_out_to_fill_the_gpu(monkeypatch):
    """On a GPU a decode batch's few token blocks are split over d_out chunks (at most FUSED_MAX_SPLIT, never
    finer than one BN step); a prefill batch that fills the SMs is not."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_multiprocessors", lambda device: 132)
    device = torch.device("cuda")
    BM, _, BN, _, _ = configs.GPU_FUSED[64]
    filled = configs.FUSED_PROGRAMS_PER_SM * 132 * BM
    assert configs.fused_config(64, filled, 4096, device).split == 1
    assert configs.fused_config(64, filled // 2, 4096, device).split == 2
    assert configs.fused_config(64, 256, 4096, device).split == configs.FUSED_MAX_SPLIT
    assert configs.fused_config(64, 256, BN, device).split == 1
    assert configs.fused_config(33, 1, 4096, device).C == 64
    with pytest.raises(ValueError, match="fused kernels take"):
        configs.fused_config(configs.FUSED_MAX_COLUMNS + 1, 256, 4096, device)


def test_token_order_puts_tokens_of_the_same_adapters_side_by_side():
    """A permutation of the tokens in which each set of adapters (whatever the slot order, empty slots
    included) is one run; with more slots than a 62-bit key holds, tokens still group by their largest ids."""
    from adaptermix.kernels.triton_cluster import token_order

    gen = torch.Generator().manual_seed(0)
    sets = torch.tensor([[3, 7], [7, 3], [-1, 5], [5, -1], [0, 0], [2, 9]])
    idx = sets[torch.randint(0, len(sets), (200,), generator=gen)]
    order = token_order(idx, 10).long()
    assert torch.equal(order.sort().values, torch.arange(200))
    keys = [tuple(sorted(row)) for row in idx[order].tolist()]
    runs = [key for i, key in enumerate(keys) if i == 0 or key != keys[i - 1]]
    assert len(runs) == len(set(keys)) == 4                      # {3, 7} = {7, 3} and {-1, 5} = {5, -1}
    wide = torch.randint(-1, 1000, (64, 8), generator=gen)                  # 1001^8 > 2^62: the 6 largest ids
    order = token_order(wide, 1000).long()
    assert torch.equal(order.sort().values, torch.arange(64))
    largest = [tuple(sorted(row)[2:]) for row in wide[order].tolist()]
    assert largest == sorted(largest)


def test_triton_cluster_runs_several_passes_per_token_block(monkeypatch):
    """Token blocks that use more adapters than one pass holds (G = 2 here) run several passes, each adding
    to out once; ragged blocks, ranks below r_max, empty and duplicate slots, d_out in ragged chunks."""
    from adaptermix.kernels import triton_cluster

    def small_blocks(num_adapters, r_max, T, d_out, device):
        RP = configs.rank_block(r_max)
        return configs.ClusterConfig(C=2 * RP, BM=16, BK=32, BN=16, split=3, num_warps=1, num_stages=1, RP=RP,
                                     N_PAD=max(16, 1 << (num_adapters - 1).bit_length()))          # G = 2

    monkeypatch.setattr(triton_cluster, "cluster_config", small_blocks)
    case = make_case(45, 100, 70, 23, 6, 3, dtype=torch.float32, seed=4)
    case["idx"][::5, 2] = case["idx"][::5, 0]                                       # duplicates within a token
    expected = reference_of(case)
    out = case["base"].clone()
    run(case, "triton-cluster", out=out)
    assert_close_to(out, expected, torch.float32)
    assert_close_to(run(case, "triton-cluster", base=case["base"]), expected, torch.float32)


@pytest.mark.parametrize("backend", ["triton-fused", "triton-cluster", "triton-plan", "triton-bgmv", "torch-dense",
                                     "torch-runs", "torch-sorted"])
def test_unvalidated_ids_past_the_stack_count_as_empty_and_read_nothing(backend):
    """validate=False skips the idx range check (a device sync); ids >= N then count as empty slots, and no
    factor row, rank or scale past the stack is read (the cpu backend refuses them: test below), forward
    and backward."""
    case = build("aligned", torch.float32)
    N, r_max, d_in = case["A"].shape
    bad = case["idx"].clone()
    bad[::3, 0], bad[1::4, 1] = N, N + 3
    expected = reference_of(dict(case, idx=torch.where(bad >= N, -1, bad)))
    # the stacks are views of longer ones whose rows past N are NaN: a read past the stack shows in the output
    A = torch.full((N + 4, r_max, d_in), float("nan"))
    B = torch.full((N + 4, r_max, case["B"].shape[1]), float("nan"))
    A[:N], B[:N] = case["A"], case["B"].transpose(1, 2)
    ranks, scales = torch.full((N + 4,), r_max), torch.full((N + 4,), float("nan"))
    ranks[:N], scales[:N] = case["ranks"], case["scales"]
    views = dict(case, idx=bad, A=A[:N], B=B[:N].transpose(1, 2), ranks=ranks[:N], scales=scales[:N])
    assert_close_to(run(views, backend, base=case["base"], validate=False), expected, torch.float32)
    x = case["x"].clone().requires_grad_()
    weights = case["weights"].clone().requires_grad_()
    run(dict(views, x=x, weights=weights), backend, base=case["base"], validate=False).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(weights.grad[bad >= N], torch.zeros_like(weights.grad[bad >= N]))


def test_cluster_config_refuses_too_many_adapters():
    with pytest.raises(ValueError, match="clustered kernel takes"):
        configs.cluster_config(configs.CLUSTER_MAX_ADAPTERS + 1, 16, 256, 4096, torch.device("cpu"))
    case = make_case(8, 32, 32, configs.CLUSTER_MAX_ADAPTERS + 1, 2, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="clustered kernel takes"):
        run(case, "triton-cluster", base=case["base"])


# -- the cpu backend (kernels/cpu_mixture.cpp, built on first use) --------------------------------------

def test_cpu_kernels_build_here_and_auto_picks_them():
    from adaptermix.kernels import resolve_backend

    assert cpu_backend.available(), f"the cpu kernels did not build: {cpu_backend.build_error()}"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"   # half types: torch backend
    with pytest.raises(TypeError, match="cpu backend takes"):
        run(build("aligned", torch.float16), "cpu")


def test_cpu_backend_layouts_strided_out_and_other_out_dtype():
    """B as the composer stores it (a transposed view of rows), as a contiguous tensor, and as a strided
    copy; an output with strided rows and one of another dtype: all the same mixture."""
    case = build("awkward_d", torch.float32)
    expected = reference_of(case)
    rows = case["B"].transpose(1, 2).contiguous()                              # (N, r_max, d_out)
    padded = torch.zeros(*case["B"].shape[:2], 2 * case["B"].shape[2])[:, :, ::2]
    padded.copy_(case["B"])                                                    # (N, d_out, r_max), no unit stride
    for B in (case["B"], rows.transpose(1, 2), padded):
        assert_close_to(run(dict(case, B=B), "cpu", base=case["base"]), expected, torch.float32)
    wide = torch.zeros(case["base"].shape[1], case["base"].shape[0]).T        # rows with stride 1 along T
    wide.copy_(case["base"])
    run(case, "cpu", out=wide)
    assert_close_to(wide, expected, torch.float32)
    double_out = case["base"].double()
    run(case, "cpu", out=double_out)
    assert_close_to(double_out, expected, torch.float32)


def test_cpu_backend_copies_a_contiguous_B_once_per_version():
    """PEFT's layout (contiguous (N, d_out, r_max)) is copied into rows once and reused; an in-place write to
    B (or a view of it) makes the next call see the new values; the copy goes when B does."""
    import gc

    from adaptermix.kernels.cpu_backend import _B_ROWS

    case = build("awkward_d", torch.float32)
    B = case["B"].clone()
    assert B.is_contiguous() and B.transpose(1, 2).stride(-1) != 1
    first = run(dict(case, B=B), "cpu", base=case["base"])
    copy = _B_ROWS.get(B, lambda B: pytest.fail("the copy was not cached"))
    run(dict(case, B=B), "cpu", base=case["base"])
    assert _B_ROWS.get(B, lambda B: pytest.fail("recopied without a write")) is copy
    assert_close_to(first, reference_of(case), torch.float32)
    B[0].mul_(2.0)                                                             # a write through a view
    changed = dict(case, B=B)
    assert_close_to(run(changed, "cpu", base=case["base"]), reference_of(changed), torch.float32)
    assert not torch.equal(run(changed, "cpu", base=case["base"]), first)
    grad = torch.randn(case["base"].shape, generator=torch.Generator().manual_seed(3))
    assert_gradients_match(changed, "cpu", torch.float32, grad=grad)
    held = len(_B_ROWS)
    del B, changed
    gc.collect()
    assert len(_B_ROWS) == held - 1


def test_validation_checks_scales_and_ranks_once_per_version():
    """Scales and ranks are checked once per tensor and version: a write after a passing call is caught on
    the next call; finite weights whose sum overflows still pass, NaN weights never do."""
    case = build("aligned", torch.float32)
    scales, ranks = case["scales"].clone(), case["ranks"].clone()
    case.update(scales=scales, ranks=ranks)
    run(case, "cpu", base=case["base"])
    scales[1] = float("inf")
    with pytest.raises(ValueError, match="scales contain NaN"):
        run(case, "cpu", base=case["base"])
    scales[1] = 1.0
    run(case, "cpu", base=case["base"])
    ranks[0] = case["A"].shape[1] + 1
    with pytest.raises(ValueError, match="ranks must lie in"):
        run(case, "cpu", base=case["base"])
    ranks[0] = 1
    huge = torch.full_like(case["weights"], 3e38)                              # finite; their sum is inf
    assert torch.isinf(huge.sum())
    for backend in ("cpu", "torch"):
        run(dict(case, weights=huge), backend, base=case["base"])              # accepted (the output may overflow)
    huge[-1, -1] = float("nan")
    with pytest.raises(ValueError, match="weights contain NaN"):
        run(dict(case, weights=huge), "cpu", base=case["base"])


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_backend_splits_tokens_across_threads(threads):
    """Big enough to wake the thread pool: each thread sorts its own tokens' pairs; duplicates, -1 slots, mixed
    ranks and tiles of four tokens per adapter all cross the split."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = make_case(301, 200, 150, 9, 8, 3, dtype=torch.float64, seed=4)
        case["idx"][::7, 1] = case["idx"][::7, 0]                              # duplicates within a token
        assert_close_to(run(case, "cpu", base=case["base"]), reference_of(case), torch.float64)
        assert_gradients_match(case, "cpu", torch.float64)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_backward_gives_each_gradient_alone_as_together(backend):
    """dx alone and d(weights) alone (the fused CPU pass skips the other's work) equal the pair computed
    together, which the reference checks elsewhere; an empty slot's d(weights) is exactly 0."""
    from adaptermix.kernels.mixture import mixture_backward

    case = make_case(301, 200, 150, 9, 8, 3, dtype=torch.float64, seed=6)
    case["idx"][::5, 2] = case["idx"][::5, 0]                                  # duplicates within a token
    grad = torch.randn(case["base"].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    args = (grad, case["x"], case["A"], case["B"], case["scales"], case["idx"], case["weights"], case["ranks"],
            backend)
    dx, dweights = mixture_backward(*args, True, True)
    dx_alone, none = mixture_backward(*args, True, False)
    none_too, dweights_alone = mixture_backward(*args, False, True)
    assert none is None and none_too is None
    assert torch.equal(dx_alone, dx) and torch.equal(dweights_alone, dweights)
    assert (dweights[case["idx"] < 0] == 0).all() and (case["idx"] < 0).any()


@pytest.mark.parametrize("bad", [6, -2])
def test_cpu_kernel_refuses_bad_ids_even_unvalidated(bad):
    """validate=False skips the host checks; the kernel still never reads outside the stacks."""
    case = build("aligned", torch.float32)
    case["idx"] = case["idx"].clone()
    case["idx"][5, 1] = bad
    out = case["base"].clone()
    for kwargs in (dict(base=case["base"]), dict(out=out)):
        with pytest.raises(ValueError, match="idx holds an adapter id outside"):
            run(case, "cpu", validate=False, **kwargs)
    assert torch.equal(out, case["base"])                                        # refused before any write

    with pytest.raises(ValueError, match="idx holds an adapter id outside"):       # the backward's kernels too
        cpu_backend.backward(torch.ones_like(case["base"]), case["x"], case["A"], case["B"], case["scales"],
                             case["idx"], case["weights"], case["ranks"], True, True)


def test_unknown_backend_and_unsupported_triton_dtype():
    case = build("aligned", torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        run(case, "cuda-magic")
    with pytest.raises(TypeError, match="triton backend takes"):
        run(build("aligned", torch.float64), "triton")


# -- CUDA: the compiled Triton kernels (run on a GPU machine; CI has none, so these skip there) ----------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_CASES = [("triton-plan", torch.float32), ("triton-plan", torch.float16), ("triton-plan", torch.bfloat16),
             ("triton-bgmv", torch.float32), ("triton-bgmv", torch.bfloat16), ("triton-fused", torch.float32),
             ("triton-fused", torch.float16), ("triton-fused", torch.bfloat16), ("triton-cluster", torch.float32),
             ("triton-cluster", torch.bfloat16), ("torch", torch.float32), ("torch", torch.bfloat16),
             ("torch-runs", torch.bfloat16), ("torch-sorted", torch.bfloat16)]   # bf16: torch._grouped_mm on CUDA


def on_cuda(case):
    return {key: value.cuda() for key, value in case.items()}


@cuda
@pytest.mark.parametrize("shape, backend, dtype", [(shape, backend, dtype)
                                                   for shape in list(SHAPES) + ["wide_mixed_ranks"]
                                                   for backend, dtype in GPU_CASES
                                                   if shape == "wide_mixed_ranks" or applies(shape, backend)])
def test_cuda_forward_matches_float64_reference(shape, backend, dtype):
    if shape == "wide_mixed_ranks" and backend == "triton-fused":   # d past several blocks and chunks
        case = make_case(300, 1000, 1500, 8, 16, 2, dtype=dtype, seed=3, ranks=torch.arange(8) * 2 + 1)
    elif shape == "wide_mixed_ranks":   # d past several blocks, ranks 1..128 in one stack
        case = make_case(300, 1000, 1500, 12, 128, 2, dtype=dtype, seed=3)
    else:
        case = build(shape, dtype)
    case = on_cuda(case)
    expected = reference_of(case)
    assert_close_to(run(case, backend, base=case["base"]), expected, dtype)
    out = case["base"].clone()
    run(case, backend, out=out)
    assert_close_to(out, expected, dtype)


@cuda
@pytest.mark.parametrize("shape", ["aligned", "awkward_d", "k8_duplicates", "one_token"])
@pytest.mark.parametrize("backend, dtype", GPU_CASES)
def test_cuda_backward_matches_the_reference(shape, backend, dtype):
    case = on_cuda(build(shape, dtype, seed=1))
    grad = torch.randn(case["base"].shape, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    assert_gradients_match(case, backend, dtype, grad)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_torch_runs_pass(dtype):
    case = on_cuda(per_sequence_case(dtype))
    assert_close_to(run(case, "torch-runs", base=case["base"]), reference_of(case), dtype)


@cuda
def test_cuda_inductor_compiles_the_triton_op_forward_and_backward():
    case = on_cuda(build("awkward_d", torch.float16))

    def layer(x, weights):
        return lora_mixture(x, case["A"], case["B"], case["scales"], case["idx"], weights, ranks=case["ranks"],
                            base=case["base"], backend="triton", validate=False)

    compiled = torch.compile(layer, fullgraph=True)
    x = case["x"].clone().requires_grad_()
    y = compiled(x, case["weights"])
    y.float().sum().backward()
    assert_close_to(y.detach(), reference_of(case), torch.float16)
    x64 = case["x"].double().requires_grad_()
    lora_mixture_reference(x64, case["A"].double(), case["B"].double(), case["scales"].double(), case["idx"],
                           case["weights"].double(), ranks=case["ranks"], base=case["base"].double()).sum().backward()
    assert_close_to(x.grad, x64.grad, torch.float16)


@cuda
@pytest.mark.parametrize("backend", ["triton-plan", "triton-bgmv", "triton-fused", "triton-cluster"])
def test_cuda_graph_replays_with_new_routing(backend):
    """The Triton path never syncs with the host: one captured graph serves any routing written into idx."""
    case = on_cuda(build("aligned", torch.bfloat16))
    out = torch.empty_like(case["base"])

    def step():
        out.copy_(case["base"])
        run(case, backend, out=out, validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                   # compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(7)
    N, k = case["A"].shape[0], case["idx"].shape[1]
    for _ in range(3):
        case["idx"].copy_(torch.randint(-1, N, (case["idx"].shape[0], k), generator=gen))
        case["weights"].copy_(torch.randn(case["weights"].shape, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to(out, reference_of(case), torch.bfloat16)
