"""PEFT checkpoints in and out: real PEFT is the oracle for loading and for logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptermix as am

INPUT = torch.arange(24).reshape(2, 12) % 128


def peft_logits(model_fn, checkpoint):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(model_fn(), str(checkpoint)).eval()(INPUT).logits


def merged_logits(model_fn, adapter: am.LoraAdapter):
    """Base model with every dW = s·B·A added to its weight by hand (our reading of the factors)."""
    model = model_fn()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in adapter.modules.items():
            delta = module.delta_weight(torch.float32)
            weight = modules[name].weight
            weight += delta.T if name in adapter.conv1d else delta
        return model(INPUT).logits


@pytest.mark.parametrize("kwargs", [
    dict(r=4, alpha=8),
    dict(r=4, alpha=8, use_rslora=True),
    dict(r=4, alpha=16, rank_pattern={"model.layers.1.self_attn.q_proj": 2, "v_proj": 6},
         alpha_pattern={"model.layers.0.self_attn.v_proj": 3}, use_rslora=True,
         targets=("q_proj", "v_proj", "down_proj")),
])
def test_peft_library_peft_round_trip_gives_identical_logits(tmp_path, kwargs, h):
    source = h.make_peft_checkpoint(h.tiny_llama, tmp_path / "src", seed=1, **kwargs)
    adapter = am.LoraAdapter.from_peft(source, name="a")
    assert len({m.rank for m in adapter.modules.values()}) == (3 if "rank_pattern" in kwargs else 1)
    library = am.AdapterLibrary.create(tmp_path / "lib", base_model=h.tiny_llama())
    library.add(source, name="a")
    exported = library.get("a").save_peft(tmp_path / "out")

    expected = peft_logits(h.tiny_llama, source)
    assert torch.equal(peft_logits(h.tiny_llama, exported), expected)
    torch.testing.assert_close(merged_logits(h.tiny_llama, library.get("a")), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, h.tiny_llama()(INPUT).logits, atol=1e-3)  # the adapter does something


def test_gpt2_conv1d_fan_in_fan_out_round_trip(tmp_path, h):
    source = h.make_peft_checkpoint(h.tiny_gpt2, tmp_path / "src", seed=2, r=2, alpha=4,
                                  targets=("c_attn", "c_proj"), fan_in_fan_out=True)
    library = am.AdapterLibrary.create(tmp_path / "lib", base_model=h.tiny_gpt2())
    assert library.base_model.conv1d  # Conv1D modules recognised with their (d_out, d_in)
    library.add(source, name="g")
    adapter = library.get("g")
    assert adapter.conv1d == frozenset(adapter.modules)
    exported = adapter.save_peft(tmp_path / "out")
    assert json.loads((exported / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    expected = peft_logits(h.tiny_gpt2, source)
    assert torch.equal(peft_logits(h.tiny_gpt2, exported), expected)
    torch.testing.assert_close(merged_logits(h.tiny_gpt2, adapter), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_preserved_through_the_library(tmp_path, dtype, h):
    source = h.make_peft_checkpoint(h.tiny_llama, tmp_path / "src", seed=3)
    adapter = am.LoraAdapter.from_peft(source, name="h").to(dtype)
    library = am.AdapterLibrary.create(tmp_path / "lib", base_model=h.tiny_llama())
    library.add(adapter)
    back = library.get("h")
    assert back.dtype == dtype and library.record("h").dtype == str(dtype).replace("torch.", "")
    for name, module in adapter.modules.items():
        assert torch.equal(back.modules[name].A, module.A) and torch.equal(back.modules[name].B, module.B)
    exported = back.save_peft(tmp_path / "out")
    assert load_file(str(exported / "adapter_model.safetensors"))[
        f"base_model.model.{name}.lora_A.weight"].dtype == dtype


def test_reads_keys_with_adapter_name_and_without_prefix(tmp_path, h):
    source = h.make_peft_checkpoint(h.tiny_llama, tmp_path / "src", seed=4)
    tensors = load_file(str(source / "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.", "").replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, str(source / "adapter_model.safetensors"))
    original = am.LoraAdapter.from_peft(h.make_peft_checkpoint(h.tiny_llama, tmp_path / "ref", seed=4))
    adapter = am.LoraAdapter.from_peft(source)
    assert adapter.content_hash() == original.content_hash()


# -- bad input ------------------------------------------------------------------------------------

def _break(source, kind):
    config_path = source / "adapter_config.json"
    config = json.loads(config_path.read_text())
    weights = source / "adapter_model.safetensors"
    if kind == "pickle":
        torch.save(load_file(str(weights)), source / "adapter_model.bin")
        weights.unlink()
    elif kind == "dora":
        config["use_dora"] = True
    elif kind == "loha":
        config["peft_type"] = "LOHA"
    elif kind == "no_config":
        config_path.unlink()
        return
    elif kind == "bad_json":
        config_path.write_text("{not json")
        return
    elif kind == "no_weights":
        weights.unlink()
    elif kind == "missing_tensor":
        tensors = load_file(str(weights))
        tensors.pop(next(k for k in tensors if "lora_B" in k))
        save_file(tensors, str(weights))
    elif kind == "rank_mismatch":
        config["r"] = 7
    elif kind == "stray_tensor":
        tensors = load_file(str(weights))
        tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
        save_file(tensors, str(weights))
    elif kind == "embedding_lora":
        tensors = load_file(str(weights))
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 2)
        save_file(tensors, str(weights))
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind, error, words", [
    ("pickle", am.UnsafeCheckpointError, "pickle"),
    ("dora", am.UnsupportedAdapterError, "DoRA"),
    ("loha", am.UnsupportedAdapterError, "LOHA"),
    ("no_config", am.AdapterFormatError, "adapter_config.json"),
    ("bad_json", am.AdapterFormatError, "malformed"),
    ("no_weights", am.AdapterFormatError, "adapter_model.safetensors"),
    ("missing_tensor", am.AdapterFormatError, "partner"),
    ("rank_mismatch", am.AdapterFormatError, "rank"),
    ("stray_tensor", am.AdapterFormatError, "lm_head"),
    ("embedding_lora", am.UnsupportedAdapterError, "embedding"),
])
def test_bad_checkpoints_are_refused_by_name_and_leave_library_unchanged(tmp_path, library, kind, error, words, h):
    library.add(h.make_peft_checkpoint(h.tiny_llama, tmp_path / "good", seed=5), name="good")
    before = h.snapshot(library.root)
    source = h.make_peft_checkpoint(h.tiny_llama, tmp_path / "bad", seed=6)
    _break(source, kind)
    with pytest.raises(error, match=words):
        library.add(source, name="bad")
    assert h.snapshot(library.root) == before and library.verify() == []


def test_pickle_loads_only_when_the_caller_opts_in(tmp_path, library, h):
    source = h.make_peft_checkpoint(h.tiny_llama, tmp_path / "p", seed=7)
    reference = am.LoraAdapter.from_peft(source).content_hash()
    _break(source, "pickle")
    library.add(source, name="pickled", allow_pickle=True)
    assert library.get("pickled").content_hash() == reference


def test_lora_module_problems_are_reported():
    bad = am.LoraModule(torch.full((2, 4), float("nan")), torch.zeros(3, 2), alpha=2.0)
    adapter = am.LoraAdapter("x", "tiny-llama", {"m": bad})
    with pytest.raises(am.AdapterValidationError, match="NaN"):
        adapter.validate()
    with pytest.raises(am.AdapterValidationError, match="columns"):
        am.LoraAdapter("x", "", {"m": am.LoraModule(torch.zeros(2, 4), torch.zeros(3, 3), 1.0)}).validate()
    with pytest.raises(am.AdapterValidationError, match="no modules"):
        am.LoraAdapter("x", "", {}).validate()


def test_save_peft_refuses_a_non_empty_folder(tmp_path, h):
    adapter = am.LoraAdapter.from_peft(h.make_peft_checkpoint(h.tiny_llama, tmp_path / "s", seed=8))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        adapter.save_peft(tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
