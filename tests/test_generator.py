"""The Text-to-LoRA generator: reconstructs the adapters it was trained on (in dW), saves and loads with the
library, and its adapters load in real PEFT."""

import pytest
import torch

import adaptermix as am
from adaptermix.library.peft_format import load_peft_adapter

TASKS = {"alpha": "Translate English sentences into French", "beta": "Count the vowels in a word",
         "gamma": "Write a haiku about the sea", "delta": "Convert kilometres to miles"}


@pytest.fixture
def trained(library, tmp_path, h):
    adapters = []
    for seed, (name, description) in enumerate(TASKS.items()):
        adapter = load_peft_adapter(h.make_peft_checkpoint(h.tiny_llama, tmp_path / name, seed=seed))
        adapters.append(adapter.with_metadata(name=name, description=description, examples=(f"{description}: x",)))
    library.add_many(adapters, progress=False)
    generator = am.train_generator(library, steps=800, lr=3e-3, hidden=128, progress=False)
    return library, generator


def relative_error(generated, original):
    errors = []
    for module, factors in original.modules.items():
        truth = factors.delta_weight()
        errors.append((generated.modules[module].delta_weight() - truth).norm() / truth.norm())
    return float(torch.stack(errors).max())


def test_generator_reconstructs_its_training_adapters_in_dw(trained):
    library, generator = trained
    for name, description in TASKS.items():
        generated = am.generate_adapter(generator, description)
        assert relative_error(generated, library.get(name)) < 0.1, name


def test_saved_with_the_library_and_loaded_generators_agree(trained, tmp_path):
    library, generator = trained
    generator.save(library, "t2l")
    loaded = am.LoraGenerator.load(library, "t2l")
    a = am.generate_adapter(generator, TASKS["beta"], name="x")
    b = am.generate_adapter(loaded, TASKS["beta"], name="x")
    assert all(torch.equal(a.modules[m].A, b.modules[m].A) for m in a.modules)


def test_generated_adapters_load_in_real_peft_and_join_the_library(trained, tmp_path, h):
    from peft import PeftModel

    library, generator = trained
    adapter = am.generate_adapter(generator, "Convert miles to kilometres", name="generated")
    adapter.save_peft(tmp_path / "peft")
    base = h.tiny_llama()
    ids = torch.arange(10)[None] * 5
    with torch.no_grad():
        plain = base(ids).logits
        peft_logits = PeftModel.from_pretrained(h.tiny_llama(), str(tmp_path / "peft"))(ids).logits
        library.add(adapter)
        ours = am.compose(h.tiny_llama(), library, am.FixedRouter({"generated": 1.0}), adapters=["generated"])(ids).logits
    assert not torch.allclose(plain, peft_logits)
    torch.testing.assert_close(ours, peft_logits, rtol=1e-4, atol=1e-5)


def test_bad_input(trained, h):
    library, generator = trained
    with pytest.raises(ValueError, match="non-empty description"):
        am.generate_adapter(generator, "  ")
    untrained = am.LoraGenerator({"model.layers.0.self_attn.q_proj": (64, 64)})
    with pytest.raises(ValueError, match="untrained"):
        am.generate_adapter(untrained, "anything")
    generator.save(library, "t2l")
    other = am.AdapterLibrary.create(library.root.parent / "other", base_model=h.tiny_gpt2())
    (other.root / "routers").mkdir(exist_ok=True)
    (other.root / "routers" / "t2l.safetensors").write_bytes((library.root / "routers" / "t2l.safetensors").read_bytes())
    with pytest.raises(am.BaseModelMismatchError, match="another base model"):
        am.LoraGenerator.load(other, "t2l")
    with pytest.raises(ValueError, match="at least 2 adapters"):
        am.train_generator(library, names=["alpha"])
