"""Why plain Arrow routes poorly on the example library, measured on the TRAIN split (the held-out split stays
for the evaluation). Writes docs/routing/*.png and benchmarks/results/routing_diagnosis.json; docs/ROUTING.md
discusses them.

    python benchmarks/diagnose_routing.py               # 5 train prompts per task, about 2 minutes on 2 cores

1. prototypes: mean |cos| between different adapters' top prototypes, per module kind.
2. token kinds: per layer, the share of per-token Arrow top-1 decisions that go to the task's own adapter,
   for chat-template / system tokens, the user's tokens, and generated tokens.
3. scores per layer: sequence-level accuracy (mean score over the user's tokens, argmax) per layer, raw
   vs calibrated (hidden states centred on the library's example prompts, adapters z-scored there), for the
   prototype and the subspace score.
4. massive activations: per layer, the share of a user token's squared norm in its 3 largest coordinates,
   and the share of |<p, x>| that those coordinates contribute.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.routers.prompt_tokens import user_token_mask  # noqa: E402
from adaptermix.suite import generate, suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, chat_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
LAYER = re.compile(r"layers\.(\d+)\.")


def capture(model, tokenizer, texts, fn):
    """Run the base model on chat-formatted texts; fn(module, x (B·L, d), users (B·L,) bool, batch) per
    target module."""
    encoded = tokenizer([chat_prompt(tokenizer, t) for t in texts], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    users = user_token_mask(encoded.input_ids, encoded.attention_mask, tokenizer).reshape(-1)
    hooks = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in KINDS:
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: fn(name, args[0].reshape(-1, args[0].shape[-1]).float(), users,
                                                len(texts))))
    try:
        with torch.no_grad():
            model(**encoded)
    finally:
        for hook in hooks:
            hook.remove()
    return encoded, users


def line_chart(path, series: dict, title: str, ylabel: str | None, *, chance: bool = False, ylim=None,
               height: float = 3.5) -> None:
    """One PNG of lines over layers: series = {label: (xs, ys)}; chance: a dotted line at 1 / #adapters."""
    fig, ax = plt.subplots(figsize=(8, height))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    if chance:
        ax.axhline(1 / len(SUITE), color="grey", linestyle=":", label="chance")
    ax.set_xlabel("layer")
    if ylabel:
        ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def prototype_overlap(library, modules=None, protos=None):
    """({module kind: mean |cos| between the top prototypes of different adapters}, (N, N) mean |cos| matrix)."""
    modules = modules or [m for m in library.base_model.modules if m.rsplit(".", 1)[-1] in KINDS]
    protos = protos or {name: library.prototypes(name, modules=modules) for name in SUITE}
    overlap = {}
    pair = torch.zeros(len(SUITE), len(SUITE))
    for kind in KINDS:
        values = []
        for module in [m for m in modules if m.endswith(kind)]:
            P = torch.stack([protos[n][module][0][0] for n in SUITE]).float()
            cos = (P @ P.T).abs()
            pair += cos / len(modules)
            values.append(cos[~torch.eye(len(SUITE), dtype=torch.bool)].mean())
        if values:
            overlap[kind] = round(float(torch.stack(values).mean()), 4)
    return overlap, pair


def main(per_task: int = 5):
    torch.set_grad_enabled(False)
    library = suite_library()
    model, tokenizer = load_smollm2()
    model.eval()
    tokenizer.padding_side = "left"
    out_png = ROOT / "docs" / "routing"
    out_png.mkdir(parents=True, exist_ok=True)
    modules = [m for m in library.base_model.modules if m.rsplit(".", 1)[-1] in KINDS]
    protos = {name: library.prototypes(name, modules=modules) for name in SUITE}
    result = {"machine": machine(), "per_task": per_task, "split": "train"}

    # 1. prototype overlap
    overlap, pair = prototype_overlap(library, modules, protos)
    result["prototype_abs_cos"] = overlap
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(pair.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(SUITE)), SUITE, rotation=90, fontsize=7)
    ax.set_yticks(range(len(SUITE)), SUITE, fontsize=7)
    ax.set_title("|cos| of top prototypes, mean over modules")
    fig.colorbar(image, ax=ax)
    fig.savefig(out_png / "prototype_similarity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    # Directions per module: prototype (N, d) and weighted subspace (N, r, d).
    proto = {m: torch.stack([protos[n][m][0][0] for n in SUITE]).float() for m in modules}
    sub = {m: torch.stack([protos[n][m][0] * (protos[n][m][1] / protos[n][m][1].norm())[:, None]
                           for n in SUITE]).float() for m in modules}

    # Calibration statistics from the library's example prompts (as SequenceArrowRouter computes them).
    reference = [t for n in SUITE for t in library.record(n).examples]
    mu, spread = {}, {}
    capture(model, tokenizer, reference, lambda m, x, u, b: mu.__setitem__(m, x[u].mean(0)))

    def spread_of(m, x, u, b):
        xc = x[u] - mu[m]
        spread[m] = {"prototype": ((xc @ proto[m].T).abs().mean(0), (xc @ proto[m].T).abs().std(0)),
                     "subspace": (torch.einsum("td,nrd->tnr", xc, sub[m]).norm(dim=2).mean(0),
                                  torch.einsum("td,nrd->tnr", xc, sub[m]).norm(dim=2).std(0))}
    capture(model, tokenizer, reference, spread_of)

    # 3 + 4 on the train prompts.
    prompts = [(n, p) for n in SUITE for p, _ in TASKS[n].examples("train", per_task)]
    own = torch.tensor([SUITE.index(n) for n, _ in prompts])
    layer_acc = {f"{s}_{c}": {} for s in ("prototype", "subspace") for c in ("raw", "calibrated")}
    massive = {}
    for start in range(0, len(prompts), 20):
        chunk = prompts[start:start + 20]
        chunk_own = own[start:start + 20]

        def per_module(m, x, u, b):
            layer = int(LAYER.search(m).group(1))
            L = x.shape[0] // b
            row = torch.arange(b).repeat_interleave(L)
            for score in ("prototype", "subspace"):
                for calibrated in (False, True):
                    xc = x - mu[m] if calibrated else x
                    s = (xc @ proto[m].T).abs() if score == "prototype" else \
                        torch.einsum("td,nrd->tnr", xc, sub[m]).norm(dim=2)
                    if calibrated:
                        s = (s - spread[m][score][0]) / spread[m][score][1].clamp_min(1e-6)
                    seq = torch.zeros(b, len(SUITE)).index_add_(0, row[u], s[u])
                    hit = (seq.argmax(1) == chunk_own).float().sum()
                    key = f"{score}_{'calibrated' if calibrated else 'raw'}"
                    layer_acc[key].setdefault(layer, []).append(float(hit))
            xu = x[u]
            energy = xu.pow(2)
            top = energy.topk(3, dim=1)
            share = (top.values.sum(1) / energy.sum(1)).mean()
            mask = torch.zeros_like(xu).scatter_(1, top.indices, 1.0)
            contribution = ((xu * mask) @ proto[m].T).abs().sum() / (xu @ proto[m].T).abs().sum().clamp_min(1e-9)
            massive.setdefault(layer, []).append((float(share), float(contribution)))

        capture(model, tokenizer, [p for _, p in chunk], per_module)
    n_prompts = len(prompts)
    layers = sorted(massive)
    result["sequence_accuracy_by_layer"] = {
        key: {str(layer): round(sum(v[layer]) / (n_prompts * len(KINDS)), 4) for layer in layers}
        for key, v in layer_acc.items()}
    result["massive_activations"] = {str(layer): {
        "top3_energy_share": round(sum(a for a, _ in massive[layer]) / len(massive[layer]), 4),
        "top3_share_of_prototype_score": round(sum(b for _, b in massive[layer]) / len(massive[layer]), 4)}
        for layer in layers}

    line_chart(out_png / "layer_scores.png",
               {key: (layers, [values[str(layer)] for layer in layers])
                for key, values in result["sequence_accuracy_by_layer"].items()},
               "sequence-level scores per layer (mean over the user's tokens), train split",
               "share of prompts routed to their own adapter", chance=True, height=4)
    massive_by_layer = result["massive_activations"]
    line_chart(out_png / "massive_activations.png", {
        "share of ||x||^2 in the 3 largest coordinates":
            (layers, [massive_by_layer[str(layer)]["top3_energy_share"] for layer in layers]),
        "share of |<p, x>| from those coordinates":
            (layers, [massive_by_layer[str(layer)]["top3_share_of_prototype_score"] for layer in layers])},
        "massive activations at the adapted modules' inputs (user tokens)", None, ylim=(0, 1))

    # 2. per-token Arrow decisions by token kind (template / user / generated).
    router = am.ArrowRouter(top_k=1)
    composed = am.compose(model, library, router, adapters=list(SUITE))
    kinds = {k: {} for k in ("template", "user", "generated")}
    for start in range(0, len(prompts), 20):
        chunk = prompts[start:start + 20]
        chunk_own = own[start:start + 20]
        holder = {}
        generate(composed, tokenizer, [p for _, p in chunk], max_new_tokens=8, batch_size=20,
                 after_batch=lambda inputs, new: holder.update(inputs=inputs, trace=am.routing_trace(composed)))
        inputs, trace = holder["inputs"], holder["trace"]
        B, L = inputs.input_ids.shape
        users = user_token_mask(inputs.input_ids, inputs.attention_mask, tokenizer).reshape(-1)
        attended = inputs.attention_mask.bool().reshape(-1)
        for s, step in enumerate(trace.steps):
            for module, routing in step.items():
                layer = int(LAYER.search(module).group(1))
                choice = routing.indices[:, 0].cpu()
                if s == 0:
                    target = chunk_own.repeat_interleave(L)
                    for kind, mask in (("template", attended & ~users), ("user", users)):
                        kinds[kind].setdefault(layer, []).append(
                            (float((choice[mask] == target[mask]).sum()), int(mask.sum())))
                else:
                    kinds["generated"].setdefault(layer, []).append(
                        (float((choice == chunk_own).sum()), len(chunk_own)))
    am.unload(composed)
    result["arrow_token_accuracy_by_kind"] = {
        kind: {str(layer): round(sum(a for a, _ in v[layer]) / max(1, sum(b for _, b in v[layer])), 4)
               for layer in sorted(v)} for kind, v in kinds.items()}
    result["arrow_token_accuracy_by_kind_mean"] = {
        kind: round(sum(v.values()) / len(v), 4) for kind, v in result["arrow_token_accuracy_by_kind"].items()}
    line_chart(out_png / "token_kinds.png",
               {kind: ([int(k) for k in values], list(values.values()))
                for kind, values in result["arrow_token_accuracy_by_kind"].items()},
               "per-token Arrow (top-1) decisions by token kind, train split", "top-1 = own adapter", chance=True)

    best = {key: max(v.values()) for key, v in result["sequence_accuracy_by_layer"].items()}
    result["sequence_accuracy_best_layer"] = best
    path = ROOT / "benchmarks" / "results" / "routing_diagnosis.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("prototype_abs_cos", "arrow_token_accuracy_by_kind_mean",
                                              "sequence_accuracy_best_layer")}, indent=2))
    print(f"wrote {path} and {out_png}")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})
