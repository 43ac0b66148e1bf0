"""compose / route / unload on tiny Llama and GPT-2 models, with real PEFT as the oracle."""

import pytest
import torch

import adaptermix as am

INPUT = (torch.arange(2 * 12).reshape(2, 12) * 7) % 128


def logits(model, input_ids=INPUT):
    with torch.no_grad():
        return model(input_ids).logits


def peft_model(h, checkpoints: dict, model_fn=None):
    from peft import PeftModel

    names = list(checkpoints)
    model = PeftModel.from_pretrained((model_fn or h.tiny_llama)(), str(checkpoints[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(checkpoints[name]), adapter_name=name)
    return model.eval()


@pytest.fixture
def full_library(library, checkpoints):
    library.add_many(checkpoints["sql"].parent, progress=False)
    return library


def test_zero_b_adapters_give_the_base_logits_exactly(library, llama, h):
    spec = library.base_model
    for i, name in enumerate(("z1", "z2", "z3")):
        modules = {m: am.LoraModule(torch.randn(4, spec.modules[m][1]), torch.zeros(spec.modules[m][0], 4), 8.0)
                   for m in list(spec.modules)[i::3]}
        library.add(am.LoraAdapter(name, spec.name, modules))
    expected = logits(llama)
    am.compose(llama, library, am.ArrowRouter(top_k=2))
    assert torch.equal(logits(llama), expected)


@pytest.mark.parametrize("name", ["reverse", "celsius", "sql"])
def test_a_router_that_always_picks_one_adapter_gives_peft_logits(full_library, checkpoints, name, h):
    model = am.compose(h.tiny_llama(), full_library, am.FixedRouter({name: 1.0}))
    expected = logits(peft_model(h, {name: checkpoints[name]}))
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, logits(h.tiny_llama()), atol=1e-3)


def test_per_sequence_router_equals_peft_mixed_batch(full_library, checkpoints, h):
    names = ["sql", "__base__", "reverse", "celsius"]
    inputs = (torch.arange(4 * 9).reshape(4, 9) * 5) % 128
    router = am.PerSequenceRouter()
    model = am.compose(h.tiny_llama(), full_library, router)
    router.assign(names)
    ours = logits(model, inputs)
    reference = peft_model(h, checkpoints)
    with torch.no_grad():
        expected = reference(inputs, adapter_names=names).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(am.AdapterNotFoundError, match="nope"):
        router.assign(["nope"] * 4)


def test_arrow_picks_what_peft_create_arrow_model_picks(library, tmp_path, h):
    from peft import ArrowConfig, create_arrow_model

    paths = [h.make_peft_checkpoint(h.tiny_llama, tmp_path / "arrow" / f"task{i}", seed=40 + i, r=4,
                                    targets=("q_proj", "v_proj", "up_proj")) for i in range(4)]
    for path in paths:
        library.add(path)
    names = [p.name for p in paths]
    reference = create_arrow_model(h.tiny_llama(), [str(p) for p in paths], ArrowConfig(top_k=2, router_temperature=1.0))
    ours = am.compose(h.tiny_llama(), library, am.ArrowRouter(top_k=2), adapters=names)
    module = "model.layers.0.mlp.up_proj"
    seen = {}
    handle = dict(ours.named_modules())[module].register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach()))
    inputs = (torch.arange(3 * 16).reshape(3, 16) * 11) % 128
    with torch.no_grad():
        reference(inputs)
        ours(inputs)
    handle.remove()
    peft_layer = dict(reference.named_modules())[f"base_model.model.{module}"]
    prototypes = peft_layer.lora_arrow["arrow_router"].prototypes.float()                # (E, d_in)
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).float()
    scores = (x @ prototypes.T).abs()
    top = torch.topk(scores, 3, dim=1)
    peft_choice = top.indices[:, :2].sort(1).values
    our_choice = am.routing_trace(ours).steps[-1][module].indices.sort(1).values
    differ = (peft_choice != our_choice).any(1)
    near_tie = (top.values[:, 1] - top.values[:, 2]).abs() <= 1e-3 * top.values[:, 0]
    assert not (differ & ~near_tie).any(), f"{int(differ.sum())} tokens differ beyond near-ties"
    assert differ.float().mean() < 0.1


def test_generate_gives_the_same_tokens_with_and_without_the_kv_cache(full_library, h):
    model = am.compose(h.tiny_llama(), full_library, am.ArrowRouter(top_k=2))
    prompt = INPUT[:, :6]
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        uncached = model.generate(prompt, use_cache=False, **settings)
        cached = model.generate(prompt, use_cache=True, **settings)
    assert torch.equal(cached, uncached)
    trace = am.routing_trace(model)  # of the cached run (without a cache, every step is a new prefill)
    assert len(trace.steps) == 8  # the prefill, then one forward per generated token (no second pass)


def test_unload_restores_the_original_modules_bit_for_bit(full_library, llama):
    originals = {n: m for n, m in llama.named_modules()}
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    expected = logits(llama)
    am.compose(llama, full_library, am.ArrowRouter(top_k=2))
    assert not torch.equal(logits(llama), expected)
    am.unload(llama)
    assert all(originals[n] is m for n, m in llama.named_modules())
    assert all(torch.equal(state[k], v) for k, v in llama.state_dict().items())
    assert torch.equal(logits(llama), expected) and not hasattr(llama, "_adaptermix")


def test_gradient_checkpointing_gives_the_same_gradients(full_library, h):
    grads = []
    for checkpointing in (False, True):
        model = am.compose(h.tiny_llama(), full_library, am.ArrowRouter(top_k=2)).train()
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(INPUT, labels=INPUT).loss
        loss.backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
        assert model.model.layers[0].gradient_checkpointing == checkpointing
        assert len(am.routing_trace(model).steps) == 1
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_gpt2_conv1d_layers_compose(tmp_path, h):
    source = h.make_peft_checkpoint(h.tiny_gpt2, tmp_path / "g", seed=3, r=2, targets=("c_attn", "c_proj"),
                                    fan_in_fan_out=True)
    library = am.AdapterLibrary.create(tmp_path / "lib", base_model=h.tiny_gpt2())
    library.add(source, name="g")
    model = am.compose(h.tiny_gpt2(), library, am.FixedRouter({"g": 1.0}))
    torch.testing.assert_close(logits(model), logits(peft_model(h, {"g": source}, h.tiny_gpt2)), rtol=1e-5, atol=1e-5)


def test_adapters_lacking_modules_contribute_nothing_there(library, h):
    spec = library.base_model
    q = [m for m in spec.modules if m.endswith("q_proj")]
    v = [m for m in spec.modules if m.endswith("v_proj")]
    gen = torch.Generator().manual_seed(0)
    for name, modules in (("only_q", q), ("only_v", v)):
        factors = {m: am.LoraModule(torch.randn(2, spec.modules[m][1], generator=gen),
                                    torch.randn(spec.modules[m][0], 2, generator=gen), 4.0) for m in modules}
        library.add(am.LoraAdapter(name, spec.name, factors))
    model = am.compose(h.tiny_llama(), library, am.ArrowRouter(top_k=1))
    logits(model)
    step = am.routing_trace(model).steps[-1]
    assert set(step) == set(q) | set(v)
    assert all((step[m].indices == 0).all() for m in q) and all((step[m].indices == 1).all() for m in v)


def test_retrieval_routes_each_sequence_by_its_prompt(full_library, h):
    router = am.RetrievalRouter(top_k=1)
    model = am.compose(h.tiny_llama(), full_library, router)
    with pytest.raises(ValueError, match="prompt texts"):
        logits(model)
    am.set_prompts(model, ["convert 30 degrees celsius to fahrenheit", "select all rows from the users table"])
    with torch.no_grad():
        model.generate(INPUT[:, :5], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    names = am.routing_trace(model).adapter_names
    for step in am.routing_trace(model).steps:       # held for the generated tokens too
        routing = next(iter(step.values()))
        rows = routing.indices.view(2, -1)
        assert {names[int(i)] for i in rows[0]} == {"celsius"} and {names[int(i)] for i in rows[1]} == {"sql"}


def test_trace_statistics_and_heatmap(full_library, tmp_path, h):
    model = am.compose(h.tiny_llama(), full_library, am.ArrowRouter(top_k=2))
    logits(model)
    trace = am.routing_trace(model)
    usage = trace.usage()
    assert set(usage) == set(full_library.names()) and abs(sum(usage.values()) - 1) < 1e-5
    assert 0 <= trace.entropy() <= torch.log(torch.tensor(2.0)) + 1e-5
    assert abs(sum(trace.top1_share().values()) - 1) < 1e-5
    assert set(trace.per_layer_usage()) == set(trace.modules)
    path = trace.heatmap(tmp_path / "routing.png")
    assert path.stat().st_size > 1000


def test_fusion_methods(full_library, tmp_path, h):
    names, weights = ["reverse", "celsius"], [0.7, 0.3]
    adapters = [full_library.get(n) for n in names]
    linear = am.fuse(full_library, names, weights, method="linear")
    for module, fused in linear.modules.items():
        expected = sum(w * a.modules[module].delta_weight() for w, a in zip(weights, adapters))
        torch.testing.assert_close(fused.delta_weight(), expected, rtol=1e-6, atol=1e-7)
    svd = am.fuse(full_library, names, weights, method="svd", rank=2)
    for module, fused in svd.modules.items():
        S = torch.linalg.svdvals(linear.modules[module].delta_weight())
        error = torch.linalg.matrix_norm(fused.delta_weight() - linear.modules[module].delta_weight())
        torch.testing.assert_close(error, S[2:].norm(), rtol=1e-4, atol=1e-6)   # Eckart-Young optimum
    for method in ("cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        fused = am.fuse(full_library, names, weights, method=method, name=f"f_{method}")
        full_library.add(fused)
        exported = full_library.get(f"f_{method}").save_peft(tmp_path / method)
        torch.testing.assert_close(logits(peft_model(h, {method: exported})),
                                   logits(am.compose(h.tiny_llama(), full_library, am.FixedRouter({f"f_{method}": 1.0}),
                                                     adapters=[f"f_{method}"])), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown fusion method"):
        am.fuse(full_library, names, method="average")


def test_merge_and_unmerge_exactly(full_library, checkpoints, llama, h):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    am.merge_adapter(llama, full_library.get("celsius"))
    torch.testing.assert_close(logits(llama), logits(peft_model(h, {"celsius": checkpoints["celsius"]})),
                               rtol=1e-4, atol=1e-5)
    am.unmerge_adapter(llama)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_bad_input(full_library, tmp_path, h):
    with pytest.raises(ValueError, match="top_k=5"):
        am.compose(h.tiny_llama(), full_library, am.ArrowRouter(top_k=5))
    with pytest.raises(am.AdapterNotFoundError, match="ghost"):
        am.compose(h.tiny_llama(), full_library, am.ArrowRouter(top_k=1), adapters=["sql", "ghost"])
    with pytest.raises(am.AdapterNotFoundError, match="ghost"):
        am.compose(h.tiny_llama(), full_library, am.FixedRouter({"ghost": 1.0}))
    with pytest.raises(am.BaseModelMismatchError, match="does not fit"):
        am.compose(h.tiny_gpt2(), full_library, am.ArrowRouter(top_k=1))
    empty = am.AdapterLibrary.create(tmp_path / "empty", base_model=h.tiny_llama())
    with pytest.raises(am.LibraryError, match="empty"):
        am.compose(h.tiny_llama(), empty, am.ArrowRouter(top_k=1))
    model = am.compose(h.tiny_llama(), full_library, am.ArrowRouter(top_k=1))
    with pytest.raises(ValueError, match="already composed"):
        am.compose(model, full_library, am.ArrowRouter(top_k=1))
    with pytest.raises(ValueError, match="not composed"):
        am.routing_trace(h.tiny_llama())


def test_arrow_genknowsub_subtracts_the_mean_general_update_in_dw_space(full_library, tmp_path, h):
    spec = full_library.base_model
    gen = torch.Generator().manual_seed(7)
    for name in ("general1", "general2"):
        modules = {m: am.LoraModule(torch.randn(3, spec.modules[m][1], generator=gen),
                                    torch.randn(spec.modules[m][0], 3, generator=gen), 6.0)
                   for m in spec.modules if m.endswith(("q_proj", "v_proj"))}
        full_library.add(am.LoraAdapter(name, spec.name, modules))
    router = am.ArrowRouter(top_k=1, general=["general1", "general2"])
    model = am.compose(h.tiny_llama(), full_library, router, adapters=["sql"])
    task, g1, g2 = (full_library.get(n) for n in ("sql", "general1", "general2"))
    module = "model.layers.1.self_attn.v_proj"
    expected = (task.modules[module].delta_weight() - 0.5 * g1.modules[module].delta_weight()
                - 0.5 * g2.modules[module].delta_weight())
    top = torch.linalg.svd(expected)[2][0]
    cos = torch.nn.functional.cosine_similarity(router.prototypes[module][0].double(), top, dim=0).abs()
    assert cos > 0.9999
    reference = am.fuse(full_library, ["sql", "general1", "general2"], [1.0, -0.5, -0.5], name="sql_gks")
    full_library.add(reference)
    exported = full_library.get("sql_gks").save_peft(tmp_path / "gks")
    torch.testing.assert_close(logits(model), logits(peft_model(h, {"gks": exported})), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="general adapters"):
        am.compose(h.tiny_llama(), full_library, am.ArrowRouter(top_k=1, general=["general1"]),
                   adapters=["general1", "sql"])


def test_retrieval_falls_back_to_the_base_for_unmatched_and_empty_prompts(full_library, h):
    """A prompt that matches nothing (or is empty) gets no adapter, and the trace says why."""
    router = am.RetrievalRouter(top_k=1, min_similarity=0.35)
    model = am.compose(h.tiny_llama(), full_library, router)
    am.set_prompts(model, ["select all rows from the users table", "zebra violin thunderstorm"])
    routed = logits(model)
    trace = am.routing_trace(model)
    rows = next(iter(trace.steps[0].values())).indices.view(2, -1)
    assert (rows[0] >= 0).all() and (rows[1] == -1).all()
    assert any("sequence 1" in note and "min_similarity" in note for note in trace.notes)
    base = logits(am.unload(model))
    torch.testing.assert_close(routed[1], base[1])                      # the unmatched row is the base model
    model = am.compose(h.tiny_llama(), full_library, am.RetrievalRouter(top_k=1))
    am.set_prompts(model, ["select all rows from the users table", "   "])
    logits(model)
    assert any("sequence 1: empty prompt" in note for note in am.routing_trace(model).notes)


def test_decision_counts_score_prompt_and_generated_tokens_only(full_library, h):
    model = am.compose(h.tiny_llama(), full_library, am.FixedRouter({"sql": 1.0}), adapters=["celsius", "sql"])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model.generate(INPUT[:, :5], attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    generated = out[:, 5:].clone()
    generated[0, 1] = 99                                                 # row 0 "ends" at its second token
    counts = am.routing_trace(model).decision_counts(mask, generated, eos_id=99)
    layers = h.tiny_llama().config.num_hidden_layers
    # Generated tokens are routed when fed back: the last of the 3 never is. Row 0: 3 prompt tokens + 2
    # generated (up to and including eos); row 1: 5 + 2. All on "sql" (index 1).
    assert counts.tolist() == [[0, 5 * layers, 0], [0, 7 * layers, 0]]
    per_layer = am.routing_trace(model).decision_counts(mask, generated, eos_id=99, per_layer=True)
    assert per_layer.shape == (2, layers, 3) and torch.equal(per_layer.sum(1), counts)


def test_text_needing_sequence_router_names_adapters_without_descriptions(library, checkpoints, h):
    library.add(checkpoints["sql"], description="", examples=[])
    with pytest.raises(ValueError, match="description or example prompts"):
        am.compose(h.tiny_llama(), library, am.SequenceArrowRouter(calibrate=True))
    model = am.compose(h.tiny_llama(), library, am.SequenceArrowRouter(calibrate=False, aggregate="global"))
    assert logits(model).shape[0] == 2                                   # weights alone need no text
    for router in (am.RetrievalRouter(lexical_weight=1.0), am.TokenLevelRouter(top_k=1),
                   am.SequenceArrowRouter(calibrate=False, retrieval_weight=1.0)):
        with pytest.raises(am.AdapterTextMissingError, match=rf"{type(router).__name__}.*\['sql'\] have neither"):
            am.compose(h.tiny_llama(), library, router)
    generic = am.SequenceArrowRouter(calibrate=True, calibration="generic")
    model = am.compose(h.tiny_llama(), library, generic)                # calibrated without the adapters' text
    assert generic.reference_texts()[0] == "Tell me a fun fact about octopuses."


def test_confidence_combination_follows_the_surer_signal_and_breaks_ties_deterministically():
    from adaptermix.routers.sequence_arrow import combined_scores

    weights = torch.tensor([[0.3, 0.0, 0.0, 0.0], [1.0, 0.9, 0.0, 0.0]])       # row 0: weights sure of 0
    dense = torch.tensor([[0.50, 0.52, 0.1, 0.1], [0.2, 0.2, 0.9, 0.1]])      # row 1: retrieval sure of 2
    scores, confidence = combined_scores(weights, dense, retrieval_weight=1.0, combine="confidence")
    assert scores.argmax(1).tolist() == [0, 2] and torch.equal(confidence, dense.max(1).values)
    fixed, _ = combined_scores(weights, dense, retrieval_weight=8.0, combine="sum")
    assert fixed.argmax(1).tolist()[0] == 1                                    # a fixed weight lets retrieval win
    tied = torch.zeros(1, 3)                                                   # identical adapters: the first
    assert combined_scores(tied, tied, retrieval_weight=1.0, combine="confidence")[0].argmax(1).tolist() == [0]
    one, _ = combined_scores(torch.ones(2, 1), torch.ones(2, 1), retrieval_weight=1.0, combine="confidence")
    assert torch.isfinite(one).all()                                           # a library of one adapter
    # two seeds of one task share their text: retrieval ties them at the top and still outweighs unsure weights
    twins = torch.tensor([[0.9, 0.9, 0.2, 0.1]])
    unsure = torch.tensor([[0.0, 0.1, 0.35, 0.3]])
    assert combined_scores(unsure, twins, retrieval_weight=1.0, combine="confidence")[0].argmax(1).tolist() == [1]
    router = am.HybridRouter()
    assert (router.combine, router.retrieval_weight, router.lexical_weight, router.min_similarity) == \
        ("confidence", 1.0, 0.5, 0.125)
    with pytest.raises(ValueError, match="combine='confidence'.*retrieval_weight"):
        am.SequenceArrowRouter(combine="confidence")


def test_sequence_router_with_candidates_scores_only_them(full_library, h):
    """candidates=m: retrieval proposes m adapters per prompt and only their weights are scored (the cost of
    a large library); with m = every adapter the scores equal those of no candidates at all."""
    n = len(full_library.names())
    scores = {}
    for candidates in (None, n, 2):
        router = am.SequenceArrowRouter(calibrate=False, retrieval_weight=1.0, candidates=candidates)
        model = am.compose(h.tiny_llama(), full_library, router)
        am.set_prompts(model, ["select all rows from the users table", "convert 30 degrees celsius to fahrenheit"])
        logits(model)
        scores[candidates] = router.last_signals["weights"]
    torch.testing.assert_close(scores[None], scores[n])
    assert (scores[2] != 0).sum(1).tolist() == [2, 2]        # z-scored among the 2 candidates, the rest unscored
