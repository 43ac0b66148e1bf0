"""A minute-long tour on a model small enough to train here (`python examples/tiny_demo.py`; `make demo` runs
the main job, examples/demo.py, on SmolLM2 and the example library).

1. A tiny byte-level Llama stands in for the base model: a few seconds of full training on copying words
   (`copy: abc = abc`) give it the prompt format, but none of the tasks.
2. One LoRA per string task is trained with real PEFT, and saved as a PEFT checkpoint with a description.
3. The `adaptermix` CLI builds a library from those checkpoints, lists it, searches it and verifies it.
4. A PNG compares adapters by their descriptions (text embeddings) and by their weights (dW sketches).
5. The library is composed onto the base model and held-out prompts are scored with every token routed:
   answer loss of the base model, the task's own adapter (oracle), a uniform mix, Arrow top-1 / top-2 and
   retrieval, and a routing heatmap. (These adapters lower the loss a lot but rarely produce exact answers.)
"""

from __future__ import annotations

import codecs
import json
import random
import time
from pathlib import Path

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import adaptermix as am
from adaptermix.cli import load_config, main as cli
from adaptermix.library.owned import mark_owned, remove_owned

# name -> (description, transformation)
TASKS = {
    "reverse": ("Reverse the characters of a word", lambda s: s[::-1]),
    "uppercase": ("Convert a word to upper case letters", str.upper),
    "rot13": ("Encode a word with the ROT13 Caesar cipher", lambda s: codecs.encode(s, "rot13")),
    "sort_letters": ("Sort the letters of a word in alphabetical order", lambda s: "".join(sorted(s))),
    "drop_vowels": ("Remove every vowel from a word", lambda s: "".join(c for c in s if c not in "aeiou")),
    "double": ("Repeat each character of a word twice", lambda s: "".join(c * 2 for c in s)),
}


COPY = ("Copy a word unchanged", lambda s: s)


def examples(task: str, rng: random.Random, n: int) -> list[tuple[str, str]]:
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(n)]
    transform = COPY[1] if task == "copy" else TASKS[task][1]
    return [(f"{task}: {w} =", f" {transform(w)}\n") for w in words]


def encode(pairs, max_len=40):
    """Byte-level ids; loss only on the answer bytes."""
    ids = torch.zeros(len(pairs), max_len, dtype=torch.long)
    labels = torch.full((len(pairs), max_len), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(pairs):
        p, a = list(prompt.encode()), list(answer.encode())
        seq = (p + a)[:max_len]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(seq[len(p):])
    return ids, labels


def pretrain_base(cfg, base_dir: Path) -> float:
    """Full training on the copy task only; returns the final training loss."""
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, max_position_embeddings=64, **cfg.model))
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr)
    rng = random.Random(f"{cfg.seed}-copy")
    for _ in tqdm(range(cfg.pretrain_steps), desc="pretrain base (copy)"):
        ids, labels = encode(examples("copy", rng, cfg.batch_size))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(base_dir)
    return float(loss)


def train_adapter(cfg, base_dir: Path, task: str, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    rng = random.Random(f"{cfg.seed}-{task}")
    held_out = encode(examples(task, random.Random(f"eval-{task}"), 64))
    evaluate = lambda: float(model(input_ids=held_out[0], labels=held_out[1]).loss)  # noqa: E731
    with torch.no_grad():
        before = evaluate()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        ids, labels = encode(examples(task, rng, cfg.batch_size))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        after = evaluate()
    model.save_pretrained(out)
    prompts = [p for p, _ in examples(task, random.Random(f"doc-{task}"), 3)]
    (out / "adaptermix.json").write_text(json.dumps({"description": TASKS[task][0], "examples": prompts,
                                                     "tags": ["demo", "string"]}))
    return {"task": task, "held_out_loss_before": round(before, 3), "held_out_loss_after": round(after, 3),
            "train_seconds": round(seconds, 1)}


def answer_loss(model, prompt: str, expected: str, router=None) -> float:
    """Teacher-forced loss (nats per byte) of the expected answer after the prompt, every token routed."""
    ids, labels = encode([(prompt, expected)], max_len=len(prompt) + len(expected) + 1)
    if isinstance(router, am.RetrievalRouter):
        am.set_prompts(model, [prompt])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def route_and_score(cfg, base_dir: Path, library: am.AdapterLibrary, out: Path) -> dict:
    """Held-out answer loss: base, oracle (the task's own adapter), uniform, Arrow top-1 / top-2, retrieval."""
    rng = random.Random(f"held-out-{cfg.seed}")
    held_out = {task: examples(task, rng, cfg.eval_per_task) for task in TASKS}
    fresh = lambda: LlamaForCausalLM.from_pretrained(base_dir).eval()  # noqa: E731
    uniform = {name: 1.0 / len(TASKS) for name in TASKS}
    methods = {"base": None, "oracle": "oracle", "uniform": am.FixedRouter(uniform),
               "arrow_top1": am.ArrowRouter(top_k=1), "arrow_top2": am.ArrowRouter(top_k=2),
               "retrieval": am.RetrievalRouter(top_k=1)}
    scores = {}
    for method, router in tqdm(methods.items(), desc="route and score"):
        losses = []
        for task, pairs in held_out.items():
            if router == "oracle":
                model = am.compose(fresh(), library, am.FixedRouter({task: 1.0}), adapters=[task])
            else:
                model = fresh() if router is None else am.compose(fresh(), library, router)
            losses += [answer_loss(model, prompt, expected, router) for prompt, expected in pairs]
        scores[method] = sum(losses) / len(losses)
    arrow = am.compose(fresh(), library, am.ArrowRouter(top_k=2))
    prompt, expected = held_out["reverse"][0]
    answer_loss(arrow, prompt, expected)
    am.routing_trace(arrow).heatmap(out / "routing_heatmap.png", tokens=list(prompt + expected.rstrip()) + ["⏎"])
    return scores


def plot_similarity(library: am.AdapterLibrary, path: Path) -> None:
    names, text = library.text_embeddings()
    _, params = library.parameter_embeddings(names)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, matrix, title in ((axes[0], text @ text.T, "descriptions (MiniLM cosine)"),
                              (axes[1], params @ params.T, "weights (dW sketch cosine)")):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(title)
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(cfg: DictConfig) -> None:
    out = Path(cfg.out_dir).resolve()
    base_dir, checkpoints, lib_dir = out / "tiny-byte-llama", out / "checkpoints", out / "library"
    copy_loss = pretrain_base(cfg, base_dir)
    print(f"== 0. base model: tiny byte-level Llama, copy-task loss after pretraining {copy_loss:.3f}")

    print(f"== 1. training {len(TASKS)} LoRA adapters with PEFT on a tiny byte-level Llama ({cfg.steps} steps each)")
    report = [train_adapter(cfg, base_dir, task, checkpoints / task) for task in tqdm(TASKS, desc="adapters")]
    for row in report:
        print(f"   {row['task']:13s} held-out loss {row['held_out_loss_before']:.3f} -> "
              f"{row['held_out_loss_after']:.3f}  ({row['train_seconds']} s)")

    print("== 2. adaptermix build")
    remove_owned(lib_dir, "tiny demo library")   # a folder this demo did not make is never deleted
    assert cli(["build", str(lib_dir), str(checkpoints), f"base_model={base_dir}"]) == 0
    mark_owned(lib_dir, "tiny demo library")
    print("== 3. adaptermix list")
    cli(["list", str(lib_dir)])
    print("== 4. adaptermix search")
    for query in cfg.queries:
        print(f"   query: {query!r}")
        cli(["search", str(lib_dir), query, f"search.k={cfg.search_k}"])
    print("== 5. adaptermix verify")
    assert cli(["verify", str(lib_dir), "verify.deep=true"]) == 0

    with am.AdapterLibrary.open(lib_dir) as library:
        plot_similarity(library, out / "adapter_similarity.png")
        vectors, values = library.prototypes("reverse")["model.layers.0.self_attn.q_proj"]
        print(f"== Arrow prototypes of 'reverse' at layer 0 q_proj: {tuple(vectors.shape)}, "
              f"singular values {[round(v, 3) for v in values.tolist()]}")
        print(f"== 6. compose the library onto the base model; held-out answer loss ({cfg.eval_per_task} prompts "
              f"per task), every token routed (lower is better)")
        scores = route_and_score(cfg, base_dir, library, out)
    for method, score in scores.items():
        print(f"   {method:12s} {score:.3f} nats/byte")
    (out / "training_report.json").write_text(json.dumps({"adapters": report, "answer_loss": scores}, indent=2))
    print(f"== wrote {out / 'adapter_similarity.png'}, {out / 'routing_heatmap.png'} and "
          f"{out / 'training_report.json'}")


if __name__ == "__main__":
    run(load_config(sys.argv[1:], config_name="tiny_demo"))
