"""Shared test helpers: tiny HF models from configs, real PEFT checkpoints, library snapshots."""

import hashlib
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._name_or_path = "tiny-llama"
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    config._name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(config).eval()


def make_peft_checkpoint(model_fn, path: Path, *, seed: int, r=4, alpha=8, targets=("q_proj", "v_proj"),
                         **lora_kwargs) -> Path:
    """Save a real PEFT LoRA checkpoint with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    model = model_fn()
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                        **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(str(path))
    return Path(path)


def snapshot(root: Path) -> dict:
    """Everything a library is: catalog rows (all tables) and every file with its hash."""
    conn = sqlite3.connect(str(root / "catalog.sqlite"))
    tables = {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}")))
              for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
    conn.close()
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in root.rglob("*") if p.is_file() and not p.name.startswith("catalog.sqlite")
             and p.parent.name != "index"}
    return {"tables": tables, "files": files}


@pytest.fixture(scope="session")
def h():
    """Helpers for tests (tests/ is not a package, so they come as a fixture, not an import)."""
    return SimpleNamespace(tiny_llama=tiny_llama, tiny_gpt2=tiny_gpt2, make_peft_checkpoint=make_peft_checkpoint,
                           snapshot=snapshot, repo=REPO, save_tiny_model=save_tiny_model)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def library(tmp_path, llama):
    import adaptermix as am

    return am.AdapterLibrary.create(tmp_path / "lib", base_model=llama)


@pytest.fixture
def checkpoints(tmp_path):
    """Three real PEFT checkpoints on the tiny Llama, with descriptions in the adaptermix sidecar."""
    import json

    specs = {
        "reverse": ("Reverse the order of the words in a sentence", ["reverse: the cat sat"]),
        "celsius": ("Convert temperatures from Celsius to Fahrenheit", ["convert 20 C to F"]),
        "sql": ("Write an SQL query that answers a question about a table", ["count the users in the table"]),
    }
    out = {}
    for i, (name, (description, examples)) in enumerate(specs.items()):
        path = make_peft_checkpoint(tiny_llama, tmp_path / "ckpt" / name, seed=10 + i, r=2 + i)
        (path / "adaptermix.json").write_text(json.dumps({"description": description, "examples": examples}))
        out[name] = path
    return out


WORDS = ("the a of to and in is it on for with as date rewrite convert sql query table users count reverse words "
         "sentence celsius fahrenheit temperature email write say word three times ocean nice something tell me "
         "about extract address acronym").split()


def save_tiny_model(model, folder: Path) -> Path:
    """A loadable model folder: the tiny model's weights and config, and a word-level tokenizer (ids below
    the tiny vocab) with a one-line chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), model.config.vocab_size)})  # every id decodes to a word
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


@pytest.fixture
def llama_folder(tmp_path, llama):
    """The tiny Llama (weights, config, tokenizer) saved as 'tiny-llama', the name its checkpoints record."""
    return save_tiny_model(llama, tmp_path / "tiny-llama")
