"""The families users bring, as tiny models built from configs: Qwen2, Mistral, Phi-3 (fused qkv and gate_up),
Gemma, GPT-2 (Conv1D), and a BERT-style encoder. Each composes, routes and generates against real PEFT as the
oracle: one adapter, a weighted mixture (PEFT's `cat` combination is exactly Σ w·dW), one adapter per
sequence (PEFT's mixed batch), greedy generation."""

import pytest
import torch

import adaptermix as am

INPUT = (torch.arange(2 * 12).reshape(2, 12) * 7 + 3) % 96


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM, ("q_proj", "v_proj", "down_proj")
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM, ("q_proj", "o_proj", "up_proj")
    if family == "phi3":
        return (tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2), tf.Phi3ForCausalLM,
                ("qkv_proj", "gate_up_proj", "down_proj"))
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=16), tf.GemmaForCausalLM, ("q_proj", "v_proj", "gate_proj")
    if family == "gpt2":
        return (tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                              eos_token_id=0), tf.GPT2LMHeadModel, ("c_attn", "c_fc"))
    if family == "bert":
        return (tf.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64), tf.BertModel, ("query", "value"))
    raise ValueError(family)


def model_fn(family: str):
    config, cls, _ = _config(family)
    config._name_or_path = f"tiny-{family}"

    def build():
        torch.manual_seed(0)
        return cls(config).eval()

    return build


@pytest.fixture
def family_library(request, tmp_path, h):
    """(model_fn, library with adapters a0, a1, a2, {name: checkpoint})."""
    family = request.param
    build = model_fn(family)
    targets = _config(family)[2]
    extra = {"fan_in_fan_out": True} if family == "gpt2" else {}
    paths = {f"a{i}": h.make_peft_checkpoint(build, tmp_path / "ckpt" / f"a{i}", seed=20 + i, r=2 + i,
                                              targets=targets, **extra) for i in range(3)}
    library = am.AdapterLibrary.create(tmp_path / "lib", base_model=build())
    library.add_many(tmp_path / "ckpt", progress=False)
    return family, build, library, paths


def _peft(build, paths: dict):
    from peft import PeftModel

    names = list(paths)
    model = PeftModel.from_pretrained(build(), str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    return model.eval()


def _out(model, **kwargs):
    with torch.no_grad():
        result = model(INPUT, **kwargs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


CAUSAL = ["qwen2", "mistral", "phi3", "gemma", "gpt2"]
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family_library", CAUSAL + ["bert"], indirect=True)
def test_one_adapter_and_a_weighted_mixture_equal_peft(family_library):
    family, build, library, paths = family_library
    reference = _peft(build, paths)
    reference.set_adapter("a1")
    ours = am.compose(build(), library, am.FixedRouter({"a1": 1.0}))
    torch.testing.assert_close(_out(ours), _out(reference), **TOLERANCE)
    assert am.routing_trace(ours).usage()["a1"] == pytest.approx(1.0)

    reference.add_weighted_adapter(["a0", "a2"], [0.7, 0.3], "mix", combination_type="cat")
    reference.set_adapter("mix")
    mixed = am.compose(build(), library, am.FixedRouter({"a0": 0.7, "a2": 0.3}))
    torch.testing.assert_close(_out(mixed), _out(reference), **TOLERANCE)
    assert _out(mixed).shape == _out(build()).shape and not torch.allclose(_out(mixed), _out(build()))


@pytest.mark.parametrize("family_library", CAUSAL, indirect=True)
def test_one_adapter_per_sequence_and_generation_equal_peft(family_library):
    family, build, library, paths = family_library
    reference = _peft(build, paths)
    router = am.PerSequenceRouter()
    ours = am.compose(build(), library, router)
    router.assign(["a2", "a0"])
    torch.testing.assert_close(_out(ours), _out(reference, adapter_names=["a2", "a0"]), **TOLERANCE)

    reference.set_adapter("a2")
    single = am.compose(build(), library, am.FixedRouter({"a2": 1.0}))
    with torch.no_grad():
        expected = reference.generate(input_ids=INPUT, attention_mask=torch.ones_like(INPUT), max_new_tokens=6,
                                      do_sample=False, pad_token_id=0)
        got = single.generate(input_ids=INPUT, attention_mask=torch.ones_like(INPUT), max_new_tokens=6,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert len(am.routing_trace(single).steps) == 6          # the prefill and 5 decode steps, all routed


@pytest.mark.parametrize("family_library", CAUSAL + ["bert"], indirect=True)
def test_arrow_routes_every_targeted_linear(family_library):
    family, build, library, paths = family_library
    model = am.compose(build(), library, am.ArrowRouter(top_k=2))
    _out(model)
    trace = am.routing_trace(model)
    targets = _config(family)[2]
    assert trace.modules and all(m.rsplit(".", 1)[-1] in targets for m in trace.modules)
    assert len(trace.modules) == 2 * len(targets)                           # every layer, every target
    for module in trace.modules:
        routing = trace.steps[-1][module]
        assert routing.indices.shape == (INPUT.numel(), 2) and bool((routing.indices >= 0).all())
        torch.testing.assert_close(routing.weights.sum(1), torch.ones(INPUT.numel()))
    am.unload(model)
    torch.testing.assert_close(_out(model), _out(build()))
