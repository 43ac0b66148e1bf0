"""The learned MoE gate and the token-level router, on adapters that really do different tasks:
a tiny byte-level Llama (trained a few seconds to copy words) and three task LoRAs trained with PEFT."""

import random

import pytest
import torch

import adaptermix as am

TASKS = {"reverse": lambda w: w[::-1], "upper": str.upper, "sort": lambda w: "".join(sorted(w))}
DESCRIPTIONS = {"reverse": "Reverse the characters of a word", "upper": "Write a word in capital letters",
                "sort": "Sort the letters of a word alphabetically"}


def encode(task: str, word: str) -> dict:
    prompt, answer = f"{task}: {word} =".encode(), f" {TASKS.get(task, lambda w: w)(word)}\n".encode()
    ids = torch.tensor(list(prompt + answer))
    labels = ids.clone()
    labels[:len(prompt)] = -100
    return {"input_ids": ids, "labels": labels}


def words(rng, n):
    return ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 6))) for _ in range(n)]


def fit(model, params, task, steps, lr, seed):
    optimiser = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = am.composer.training.pad_examples([encode(task, w) for w in words(rng, 16)], 0)
        loss = model(**batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode(errors="replace")


@pytest.fixture(scope="module")
def task_setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    fit(base, base.parameters(), "copy", steps=250, lr=3e-3, seed=1)
    base.save_pretrained(root / "base")
    library = am.AdapterLibrary.create(root / "lib", base_model=base)
    for i, task in enumerate(TASKS):
        torch.manual_seed(10 + i)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        fit(model, [p for p in model.parameters() if p.requires_grad], task, steps=120, lr=1e-2, seed=20 + i)
        model.save_pretrained(root / task)
        library.add(root / task, name=task, description=DESCRIPTIONS[task])
    return root, library


def base_model(root):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(root / "base").eval()


def routed_share(model, examples, task) -> float:
    """Share of (token, module) top-1 choices that go to the example's own task adapter."""
    names = am.routing_trace(model).adapter_names if hasattr(model, "_adaptermix") else None
    hits = total = 0
    for example in examples:
        with torch.no_grad():
            model(example["input_ids"][None])
        trace = am.routing_trace(model)
        for routing in trace.steps[-1].values():
            hits += int((routing.indices[:, 0] == names.index(task)).sum())
            total += routing.indices.shape[0]
    return hits / total


def test_trained_moe_gate_routes_held_out_examples_to_their_own_adapters(task_setup):
    root, library = task_setup
    router = am.MoEGateRouter(top_k=2, load_balance=0.05)
    model = am.compose(base_model(root), library, router)
    rng = random.Random(3)
    train = [encode(task, w) for task in TASKS for w in words(rng, 16)]
    losses = am.train_router(model, train, steps=150, batch_size=12, lr=5e-2, progress=False)
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10])
    held_out = random.Random(99)
    shares = {task: routed_share(model, [encode(task, w) for w in words(held_out, 6)], task) for task in TASKS}
    # Per-token gates at layer 0 see a letter before any attention to the task prefix, so per-task shares
    # are uneven at this scale; on average the own adapter is chosen more often than chance.
    assert sum(shares.values()) / len(shares) > 1 / len(TASKS), shares
    usage = am.routing_trace(model).usage()
    assert min(usage.values()) > 0.05, usage  # the load-balancing loss keeps every adapter in use

    router.save("gate")
    fresh = am.MoEGateRouter(top_k=2)
    reloaded = am.compose(base_model(root), library, fresh)
    fresh.load("gate")
    example = encode("sort", "dcba")["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example).logits, model(example).logits)


def test_a_gate_trained_for_other_adapters_is_refused(task_setup):
    root, library = task_setup
    router = am.MoEGateRouter(top_k=1)
    am.compose(base_model(root), library, router, adapters=["reverse", "upper", "sort"])
    router.save("gate_three")
    other = am.MoEGateRouter(top_k=1)
    am.compose(base_model(root), library, other, adapters=["reverse", "upper"])
    with pytest.raises(am.BaseModelMismatchError, match="trained for adapters"):
        other.load("gate_three")
    with pytest.raises(ValueError, match="nothing to train"):
        am.train_router(am.compose(base_model(root), library, am.ArrowRouter(top_k=1)), [torch.arange(5)])


def test_token_level_router_follows_the_context_every_other_token(task_setup):
    root, library = task_setup
    router = am.TokenLevelRouter(top_k=1, every=2)
    model = am.compose(base_model(root), library, router, tokenizer=ByteTokenizer())
    prompt = torch.tensor([list(b"sort the letters alphabetically: dcba =")])
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    trace = am.routing_trace(model)
    names = trace.adapter_names
    first = next(iter(trace.steps[0].values()))
    assert names[int(first.indices[0, 0])] == "sort"
    assert len(trace.steps) == 5
    with pytest.raises(ValueError, match="tokenizer"):
        no_tokenizer = am.compose(base_model(root), library, am.TokenLevelRouter(top_k=1))
        with torch.no_grad():
            no_tokenizer(prompt)
