"""Zero-shot routing on the example library (SmolLM2-135M-Instruct, one PEFT LoRA per task): exact match on
held-out prompts and routing accuracy, per method, in-library and on unseen tasks.

    python benchmarks/evaluate_routing.py                       # config: conf/evaluate.yaml
    python benchmarks/evaluate_routing.py per_task=5 methods=[base,retrieval] unseen_methods=[]
    python benchmarks/evaluate_routing.py methods=[retrieval_lexical] unseen_methods=[] merge=true   # add to it
    python benchmarks/evaluate_routing.py config=evaluate_shared_seed     # adapters from one shared seed

Methods: base (no adapter); oracle (the task's own adapter); uniform (every adapter, equal weights);
arrow_top1/2/4 (ours); peft_arrow_top1/2/4 (PEFT's create_arrow_model on the same checkpoints, the
anchor); retrieval (prompt embedding -> nearest adapter); retrieval_lexical (the same plus the TF-IDF
word-bigram cosine, routers/lexical.py); moe_gate (a per-layer linear gate trained on
<= 16 examples per task); token_level (context-embedding similarity, every 2 tokens); seq_* and hybrid:
sequence-level routing from the adapters' weights (routers/sequence_arrow.py; settings in conf/evaluate.yaml,
chosen on the train split, docs/ROUTING.md).

Routing accuracy (in-library tasks, our routers): at every (token, layer) the adapter with the largest
routing weight summed over the layer's modules is one decision, over the prompt's tokens (padding left
out) and the generated answer. `routing_accuracy`: share of prompts whose majority decision is the task's
own adapter; `token_routing_accuracy`: share of all decisions that are. PEFT's Arrow exposes no routing,
so its routing accuracy is null.

Writes <out_dir>/summary.json, table.md, accuracy.png and routing.png (task x adapter share of decisions).
merge=true adds this run's methods to an existing summary.json (same prompts, tasks and adapters) instead of
replacing it; the added methods' routing heatmaps go to routing_added.png.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_routing import prototype_overlap  # noqa: E402
from machine import machine  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.cli import load_config  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.suite import ADAPTERS, answer_example, score_task, suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, UNSEEN  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINED: dict = {}   # routers trained in this run (the MoE gate), by method


def routed_model(method: str, library, tokenizer, cfg, train_examples):
    """(model, before_batch) for one of our routers; None for methods that are not ours."""
    model = load_smollm2()[0].eval()
    routers = {
        "uniform": lambda: am.FixedRouter({name: 1.0 / len(SUITE) for name in SUITE}),
        "retrieval": lambda: am.RetrievalRouter(**cfg.retrieval),
        "retrieval_lexical": lambda: am.RetrievalRouter(**cfg.retrieval_lexical),
        "token_level": lambda: am.TokenLevelRouter(**cfg.token_level),
        "moe_gate": lambda: am.MoEGateRouter(top_k=cfg.moe_gate.top_k, load_balance=cfg.moe_gate.load_balance),
    }
    if method in cfg.sequence_routers:
        router = am.SequenceArrowRouter(top_k=1, temperature=0.1, **cfg.sequence_routers[method])
    elif method.startswith("arrow_top"):
        router = am.ArrowRouter(top_k=int(method.removeprefix("arrow_top")), temperature=cfg.arrow_temperature)
    elif method == "moe_gate" and method in TRAINED:      # the unseen split reuses the gate trained once
        router = TRAINED[method]
    else:
        router = routers[method]()
    model = am.compose(model, library, router, adapters=list(SUITE), tokenizer=tokenizer)
    if method == "moe_gate" and method not in TRAINED:
        TRAINED[method] = router
        torch.manual_seed(cfg.seed)
        am.train_router(model, train_examples, steps=cfg.moe_gate.steps, batch_size=cfg.moe_gate.batch_size,
                        lr=cfg.moe_gate.lr, seed=cfg.seed, pad_id=tokenizer.pad_token_id)
    before = lambda chunk: am.set_prompts(model, chunk)  # noqa: E731  (text routers read the instruction)
    return model, before


def adapters_dir(cfg) -> Path:
    """The PEFT checkpoints of the library: the committed example adapters unless cfg.adapters names others."""
    if cfg.adapters is None:
        return ADAPTERS
    return Path(cfg.adapters) if Path(cfg.adapters).is_absolute() else ROOT / cfg.adapters


def peft_arrow(k: int, cfg):
    from peft import ArrowConfig, create_arrow_model

    base = load_smollm2()[0]
    return create_arrow_model(base, [str(adapters_dir(cfg) / name) for name in SUITE],
                              ArrowConfig(top_k=k, router_temperature=cfg.arrow_temperature)).eval()


def moe_examples(tokenizer, per_task: int):
    """Teacher-forced examples from the train split, loss on the answer (and end of turn) only."""
    return [answer_example(tokenizer, *pair) for name in SUITE for pair in TASKS[name].examples("train", per_task)]


def run_method(method, names, library, tokenizer, cfg, train_examples):
    """{task: exact match}, {task: similarity}, per-prompt decision counts (prompts, N + 1) or None, seconds."""
    start = time.perf_counter()
    counts = None
    if method == "base":
        model, before = load_smollm2()[0].eval(), None
    elif method.startswith("peft_arrow_top"):
        model, before = peft_arrow(int(method.removeprefix("peft_arrow_top")), cfg), None
    elif method == "oracle":
        model, before = None, None
    else:
        model, before = routed_model(method, library, tokenizer, cfg, train_examples)
        if method != "uniform":                 # fixed equal weights: no decision to score
            counts = []
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scores, similar = {}, {}
    for name in tqdm(names, desc=method, leave=False):
        if method == "oracle":
            model = am.compose(load_smollm2()[0].eval(), library, am.FixedRouter({name: 1.0}), adapters=[name])
        after = None
        if counts is not None:
            after = lambda inputs, new: counts.append(  # noqa: E731
                am.routing_trace(model).decision_counts(inputs.attention_mask, new, eos))
        scores[name], similar[name] = score_task(model, tokenizer, name, cfg.per_task,
                                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                                 before_batch=before, after_batch=after)
    return scores, similar, None if counts is None else torch.cat(counts), time.perf_counter() - start


def summarise(scores, similar, counts, names, in_library: bool):
    entry = {"accuracy": round(sum(scores.values()) / len(scores), 4), "routing_accuracy": None,
             "similarity": round(sum(similar.values()) / len(similar), 4),
             "per_task": {k: round(v, 4) for k, v in scores.items()}}
    if counts is not None:                                                    # (prompts, N + 1)
        per_task = len(counts) // len(names)
        if in_library:
            own = torch.tensor([SUITE.index(n) for n in names]).repeat_interleave(per_task)
            entry["routing_accuracy"] = round(float((counts.argmax(1) == own).float().mean()), 4)
            entry["token_routing_accuracy"] = round(float(counts[torch.arange(len(own)), own].sum() / counts.sum()), 4)
        top = counts.view(len(names), per_task, -1).sum(1)
        entry["routed_to"] = {n: (SUITE + ("none",))[int(row.argmax())] for n, row in zip(names, top)}
        entry["_shares"] = (top / top.sum(1, keepdim=True).clamp_min(1)).tolist()
    return entry


def charts(summary, out: Path, routing_file: str = "routing.png"):
    """accuracy.png: in-library exact match (and the unseen tasks' exact match, nearly all 0) above, the
    unseen tasks' string similarity below; routing_file: the task x adapter heatmaps of this run's routers."""
    methods = list(summary["in_library"])
    unseen = bool(summary["unseen"])
    fig, axes = plt.subplots(1 + unseen, 1, figsize=(11, 3.5 + 3.5 * unseen), sharex=True, squeeze=False)
    top, bottom = axes[0][0], axes[-1][0]
    width = 0.4
    for offset, (split, color) in enumerate((("in_library", "tab:blue"), ("unseen", "tab:orange"))):
        values = [summary[split].get(m, {}).get("accuracy", float("nan")) for m in methods]
        top.bar([i + (offset - 0.5) * width for i in range(len(methods))], values, width, label=split, color=color)
    top.axhline(summary["in_library"].get("oracle", {}).get("accuracy", float("nan")), color="gray", ls="--", lw=1,
                label="oracle (in-library)")
    top.set_ylabel("exact match")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if unseen:
        similarity = [summary["unseen"].get(m, {}).get("similarity", float("nan")) for m in methods]
        bottom.bar(range(len(methods)), similarity, 0.6, color="tab:orange")
        bottom.set_ylabel("unseen tasks: similarity")
        bottom.set_ylim(0, 1)
    bottom.set_xticks(range(len(methods)), methods, rotation=40, ha="right")
    added = "".join(f", + {a['date']}" for a in summary.get("merged", []))
    top.set_title(f"Zero-shot routing on SmolLM2-135M ({len(SUITE)} adapters) - {summary['date']}{added}")
    fig.savefig(out / "accuracy.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    routed = [(m, e) for m, e in summary["in_library"].items() if "_shares" in e]
    if routed:
        fig, axes = plt.subplots(1, len(routed), figsize=(4.2 * len(routed), 4.6), squeeze=False)
        for ax, (method, entry) in zip(axes[0], routed):
            ax.imshow(torch.tensor(entry["_shares"])[:, :len(SUITE)].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(method)
            ax.set_xticks(range(len(SUITE)), SUITE, rotation=90, fontsize=7)
            ax.set_yticks(range(len(SUITE)), SUITE, fontsize=7)
        axes[0][0].set_ylabel("task of the prompt")
        fig.suptitle("share of (token, layer) decisions going to each adapter")
        fig.savefig(out / routing_file, dpi=110, bbox_inches="tight")
        plt.close(fig)


def table(summary) -> str:
    lines = [f"Exact match on held-out prompts ({summary['per_task']} per task); {summary['machine_line']}, "
             f"{summary['date']}.", "",
             "| method | in-library exact match | routing accuracy (prompt / token) | unseen exact match | "
             "unseen similarity |", "| --- | --- | --- | --- | --- |"]
    for added in summary.get("merged", []):
        lines.insert(1, f"Added with merge=true on {added['date']} ({added['machine']}): "
                        f"{', '.join(added['methods'])}; unseen: {', '.join(added['unseen_methods']) or 'none'}.")
    for method, entry in summary["in_library"].items():
        routing = "n/a" if entry["routing_accuracy"] is None else \
            f"{entry['routing_accuracy']:.2f} / {entry.get('token_routing_accuracy', float('nan')):.2f}"
        unseen = summary["unseen"].get(method)
        tail = "- | -" if unseen is None else f"{unseen['accuracy']:.3f} | {unseen['similarity']:.3f}"
        lines.append(f"| {method} | {entry['accuracy']:.3f} | {routing} | {tail} |")
    return "\n".join(lines) + "\n"


def previous_summary(out: Path, cfg) -> dict:
    """The summary.json this run adds to (merge=true): same prompts per task, tasks and adapters."""
    path = out / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"merge=true adds methods to {path}, which does not exist; run without merge first")
    earlier = json.loads(path.read_text())
    for key in ("per_task", "tasks", "unseen_tasks"):
        now = cfg.per_task if key == "per_task" else list(SUITE if key == "tasks" else UNSEEN)
        if earlier[key] != now:
            raise ValueError(f"merge=true: {path} was made with {key}={earlier[key]}, this run has {now}")
    if earlier["config"].get("adapters") != cfg.adapters:
        raise ValueError(f"merge=true: {path} evaluated adapters={earlier['config'].get('adapters')}, "
                         f"this run adapters={cfg.adapters}")
    return earlier


def merged(earlier: dict, summary: dict) -> dict:
    """The earlier summary with this run's methods added or replaced (each marked with the date it was run
    on); only this run's entries carry routing shares, so their heatmaps go to routing_added.png."""
    for split in ("in_library", "unseen"):
        for method, entry in summary[split].items():
            earlier[split][method] = dict(entry, date=summary["date"])
    earlier["seconds"].update({k: v for k, v in summary["seconds"].items() if k != "total"})
    earlier.setdefault("prototype_abs_cos", summary["prototype_abs_cos"])
    earlier["config"] = dict(earlier["config"], **{k: v for k, v in summary["config"].items()
                                                   if k not in ("methods", "unseen_methods", "merge")})
    earlier["merged"] = earlier.get("merged", []) + [
        {"date": summary["date"], "methods": list(summary["in_library"]), "unseen_methods": list(summary["unseen"]),
         "machine": summary["machine_line"]}]
    return earlier


def main(overrides: list[str]):
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("config=")]
    cfg = load_config([o for o in overrides if not o.startswith("config=")],
                      config_name=names[-1] if names else "evaluate")
    torch.manual_seed(cfg.seed)
    torch.set_grad_enabled(False)
    out = Path(cfg.out_dir)
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    library = suite_library(cfg.library, adapters_dir(cfg))
    _, tokenizer = load_smollm2()
    started = time.perf_counter()
    train_examples = moe_examples(tokenizer, cfg.moe_gate.examples_per_task)
    summary = {"in_library": {}, "unseen": {}, "machine": "", "date": datetime.date.today().isoformat(),
               "per_task": cfg.per_task, "tasks": list(SUITE), "unseen_tasks": list(UNSEEN),
               "config": OmegaConf.to_container(cfg), "seconds": {}}
    summary["prototype_abs_cos"] = prototype_overlap(library)[0]   # how alike the adapters' prototypes are
    earlier = previous_summary(out, cfg) if cfg.merge else None
    info = machine()
    summary["machine"] = f"{info['cpu']}, {info['cores']} cores" + (f", {info['gpu']}" if info["gpu"] else "")
    summary["machine_line"] = summary["machine"] + f", torch {info['torch']}"
    for split, names, methods in (("in_library", SUITE, cfg.methods), ("unseen", UNSEEN, cfg.unseen_methods)):
        for method in tqdm(list(methods), desc=f"methods ({split})"):
            with torch.enable_grad() if method == "moe_gate" else torch.no_grad():
                scores, similar, counts, seconds = run_method(method, names, library, tokenizer, cfg, train_examples)
            summary[split][method] = summarise(scores, similar, counts, list(names), split == "in_library")
            summary["seconds"][f"{split}/{method}"] = round(seconds, 1)
            print(f"{split:10s} {method:16s} accuracy={summary[split][method]['accuracy']:.3f} "
                  f"routing={summary[split][method]['routing_accuracy']}  ({seconds:.0f} s)", flush=True)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 1)
    if earlier is not None:
        summary = merged(earlier, summary)
    charts(summary, out, "routing.png" if earlier is None else "routing_added.png")
    for split in ("in_library", "unseen"):
        for entry in summary[split].values():
            entry.pop("_shares", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table(summary))
    print(table(summary))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
