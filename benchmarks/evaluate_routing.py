"""Zero-shot routing on the example library (SmolLM2-135M-Instruct, one PEFT LoRA per task): exact match on
held-out prompts and routing accuracy, per method, under each condition of conf/evaluate.yaml:

    template     the library's tasks asked in the template of its example prompts (the test split)
    paraphrase   the same test items asked in the held-out phrasings of adaptermix.paraphrase
    bare         the paraphrase prompts on the same adapters without descriptions or example prompts
                 (text routers are refused by name: their entries record the error)
    unseen       tasks without an adapter of their own (exact match and string similarity)
    large        a library grown from 12 to 40 adapters with near neighbours (benchmarks/evaluate_large.py)
    multi_skill  prompts that need two library skills in sequence (benchmarks/evaluate_multi_skill.py)

    python benchmarks/evaluate_routing.py                       # config: conf/evaluate.yaml
    python benchmarks/evaluate_routing.py per_task=5 'conditions.template.methods=[base,retrieval]'
    python benchmarks/evaluate_routing.py 'conditions={paraphrase:{...}}' merge=true   # add to a summary
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

A method listed under a condition's `same_as` is not run again: the adapters and prompts are those of the
named condition and the method reads no text (e.g. the oracle and PEFT's Arrow on `bare` = on `paraphrase`).

Writes <out_dir>/summary.json (one section per condition, each {method: entry}), table.md, accuracy.png
(`charts`: exact match and routing accuracy per condition) and routing.png (task x adapter share of decisions).
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
from evaluate_large import run_large  # noqa: E402
from evaluate_multi_skill import multi_skill_table, run_multi_skill  # noqa: E402
from machine import machine  # noqa: E402
from routing_signals import answers, calibration_of, router_picks, signals  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.cli import load_config  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.library.errors import AdapterTextMissingError  # noqa: E402
from adaptermix.paraphrase import paraphrased  # noqa: E402
from adaptermix.suite import ADAPTERS, answer_example, bare_adapters, score_task, suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, UNSEEN  # noqa: E402
from adaptermix.trained_sets import require as require_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINED: dict = {}   # routers trained in this run (the MoE gate), by method
TEXT_METHODS = ("retrieval", "retrieval_lexical", "token_level")     # plus sequence routers with retrieval


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
    """The PEFT checkpoints of the library: the committed example adapters unless cfg.adapters names others
    (a folder, or set:NAME for a set trained on demand into the cache, adaptermix.trained_sets)."""
    if cfg.adapters is None:
        return ADAPTERS
    if str(cfg.adapters).startswith("set:"):
        return require_set(str(cfg.adapters).removeprefix("set:"))
    return Path(cfg.adapters) if Path(cfg.adapters).is_absolute() else ROOT / cfg.adapters


def peft_arrow(k: int, cfg):
    from peft import ArrowConfig, create_arrow_model

    base = load_smollm2()[0]
    return create_arrow_model(base, [str(adapters_dir(cfg) / name) for name in SUITE],
                              ArrowConfig(top_k=k, router_temperature=cfg.arrow_temperature)).eval()


def moe_examples(tokenizer, per_task: int):
    """Teacher-forced examples from the train split, loss on the answer (and end of turn) only."""
    return [answer_example(tokenizer, *pair) for name in SUITE for pair in TASKS[name].examples("train", per_task)]


def prompts_for(condition, name: str, cfg) -> list[tuple[str, str]]:
    """The (instruction, answer) pairs of one task under a condition: template or paraphrased test items."""
    if condition.prompts == "paraphrase":
        return paraphrased(name, "test", cfg.per_task)
    return TASKS[name].examples("test", cfg.per_task)


def run_method(method, names, library, tokenizer, cfg, train_examples, condition):
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
                                                 before_batch=before, after_batch=after,
                                                 pairs=prompts_for(condition, name, cfg))
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


def charts(summary, out: Path, routing_file: str = "routing.png") -> Path:
    """accuracy.png: exact match (bars) and prompt-level routing accuracy (dots) of every method under each
    condition, the condition's oracle dashed; routing_file: the task x adapter heatmaps of one condition's
    routers. Returns the path of accuracy.png."""
    conditions = [c for c in summary["conditions"] if summary[c]]
    methods = list(dict.fromkeys(m for c in conditions for m in summary[c]))
    fig, axes = plt.subplots(len(conditions), 1, figsize=(max(8.0, 0.6 * len(methods) + 3), 2.8 * len(conditions)),
                             sharex=True, squeeze=False)
    for ax, condition in zip(axes[:, 0], conditions):
        entries = summary[condition]
        exact = [entries.get(m, {}).get("accuracy", float("nan")) for m in methods]
        routed = [entries.get(m, {}).get("routing_accuracy") for m in methods]
        ax.bar(range(len(methods)), [float("nan") if v is None else v for v in exact], 0.6, color="tab:blue",
               label="exact match")
        ax.plot(range(len(methods)), [float("nan") if v is None else v for v in routed], "o", color="tab:red",
                label="routing accuracy (prompts)")
        for i, m in enumerate(methods):
            if "refused" in entries.get(m, {}):
                ax.text(i, 0.05, "refused", rotation=90, ha="center", va="bottom", fontsize=7)
        if "oracle" in entries:
            ax.axhline(entries["oracle"]["accuracy"], color="gray", ls="--", lw=1, label="oracle")
        ax.set_ylabel(condition)
        ax.set_ylim(0, 1)
    axes[0][0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1][0].set_xticks(range(len(methods)), methods, rotation=40, ha="right")
    added = "".join(f", + {a['date']}" for a in summary.get("merged", []))
    axes[0][0].set_title(f"Zero-shot routing on SmolLM2-135M ({len(SUITE)} adapters), exact match by condition - "
                         f"{summary['date']}{added}")
    path = out / "accuracy.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

    for condition in conditions:
        routed = [(m, e) for m, e in summary[condition].items()
                  if "_shares" in e and e.get("routing_accuracy") is not None]
        if not routed:
            continue
        fig, axes = plt.subplots(1, len(routed), figsize=(4.2 * len(routed), 4.6), squeeze=False)
        for ax, (method, entry) in zip(axes[0], routed):
            ax.imshow(torch.tensor(entry["_shares"])[:, :len(SUITE)].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(method)
            ax.set_xticks(range(len(SUITE)), SUITE, rotation=90, fontsize=7)
            ax.set_yticks(range(len(SUITE)), SUITE, fontsize=7)
        axes[0][0].set_ylabel("task of the prompt")
        fig.suptitle(f"{condition}: share of (token, layer) decisions going to each adapter")
        fig.savefig(out / routing_file.replace(".png", f"_{condition}.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
    return path


def table(summary) -> str:
    """One row per method, one column pair per condition: exact match / prompt routing accuracy (unseen:
    exact match / similarity)."""
    conditions = [c for c in summary["conditions"] if summary[c]]
    methods = list(dict.fromkeys(m for c in conditions for m in summary[c]))
    lines = [f"Exact match on held-out prompts ({summary['per_task']} per task); {summary['machine_line']}, "
             f"{summary['date']}. Cells: exact match / prompts routed to their own adapter (unseen: exact match / "
             f"string similarity; multi_skill: exact match / share of decisions going to one of the prompt's two "
             f"skills); '-': not run; refused: the router needs text the library lacks.", "",
             "| method | " + " | ".join(conditions) + " |", "|---" * (len(conditions) + 1) + "|"]
    for added in summary.get("merged", []):
        lines.insert(1, f"Added with merge=true on {added['date']} ({added['machine']}): {added['methods']}.")
    for method in methods:
        cells = []
        for condition in conditions:
            entry = summary[condition].get(method)
            if entry is None:
                cells.append("-")
            elif "refused" in entry:
                cells.append("refused")
            else:
                second = (entry["similarity"] if condition == "unseen" else entry.get("pair_share")
                          if condition == "multi_skill" else entry["routing_accuracy"])
                cells.append(f"{entry['accuracy']:.3f} / " + ("n/a" if second is None else f"{second:.2f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def previous_summary(out: Path, cfg) -> dict:
    """The summary.json this run adds to (merge=true): same prompts per task, tasks and adapters."""
    path = out / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"merge=true adds methods to {path}, which does not exist; run without merge first")
    earlier = json.loads(path.read_text())
    for key, now in (("per_task", cfg.per_task), ("tasks", list(SUITE)), ("unseen_tasks", list(UNSEEN))):
        if earlier[key] != now:
            raise ValueError(f"merge=true: {path} was made with {key}={earlier[key]}, this run has {now}")
    if earlier["config"].get("adapters") != cfg.adapters:
        raise ValueError(f"merge=true: {path} evaluated adapters={earlier['config'].get('adapters')}, "
                         f"this run adapters={cfg.adapters}")
    return earlier


def merged(earlier: dict, summary: dict) -> dict:
    """The earlier summary with this run's methods added or replaced (each marked with the date it was run
    on); only this run's entries carry routing shares, so their heatmaps go to routing_added_*.png."""
    for condition in summary["conditions"]:
        earlier.setdefault(condition, {})
        for method, entry in summary[condition].items():
            earlier[condition][method] = dict(entry, date=summary["date"])
    earlier["conditions"] = list(dict.fromkeys(earlier["conditions"] + summary["conditions"]))
    earlier["seconds"].update({k: v for k, v in summary["seconds"].items() if k != "total"})
    earlier["config"] = dict(earlier["config"], **{k: v for k, v in summary["config"].items()
                                                   if k not in ("conditions", "merge")})
    earlier["merged"] = earlier.get("merged", []) + [
        {"date": summary["date"], "machine": summary["machine_line"],
         "methods": {c: list(summary[c]) for c in summary["conditions"]}}]
    return earlier


def needs_text(method: str, cfg) -> bool:
    """Whether a method reads the adapters' descriptions / example prompts (refused on a bare library)."""
    if method in cfg.sequence_routers:
        options = cfg.sequence_routers[method]
        return bool(options.get("retrieval_weight") or options.get("candidates") is not None
                    or (options.get("calibrate", True) and options.get("calibration", "library") == "library"))
    return method in TEXT_METHODS


def refusal(method: str, library, cfg) -> str | None:
    """The error a router that needs text raises on a library without it (None: it composes)."""
    try:
        routed_model(method, library, load_smollm2()[1], cfg, [])
    except AdapterTextMissingError as error:
        return f"{type(error).__name__}: {error}"
    return None


def decided(method: str, cfg) -> bool:
    """Methods that pick one adapter (or none) per prompt: scored from routing signals and shared answers."""
    return method in ("base", "oracle", "retrieval", "retrieval_lexical") or method in cfg.sequence_routers


def run_decided(name: str, condition, methods: list[str], library, cfg, summary) -> None:
    """Every per-prompt method of one condition: decisions from one signal pass per calibration, then one
    greedy answer per distinct (prompt, adapter) pair (benchmarks/routing_signals.py)."""
    tasks = list(SUITE if condition.tasks == "suite" else UNSEEN)
    items = [(task, prompt, answer) for task in tasks for prompt, answer in prompts_for(condition, task, cfg)]
    prompts = [prompt for _, prompt, _ in items]
    text = condition.library == "text"
    started = time.perf_counter()
    needed = {calibration_of(cfg.sequence_routers[m]) for m in methods if m in cfg.sequence_routers}
    passes = {c: signals(library, prompts, calibration=c, text=text) for c in sorted(needed or {"generic"})}
    text_signals = next(iter(passes.values())) if text else None
    picks = {}
    for method in methods:
        if method == "base":
            picks[method] = [-1] * len(items)
        elif method == "oracle":
            picks[method] = [SUITE.index(t) if t in SUITE else -1 for t, _, _ in items]
        else:
            picks[method] = router_picks(method, passes, text_signals, cfg)
    table = answers(library, {(p, c) for chosen in picks.values() for p, c in zip(prompts, chosen)},
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    seconds = time.perf_counter() - started
    for method, chosen in picks.items():
        scores, similar, counts = {}, {}, []
        for task in tasks:
            rows = [i for i, (t, _, _) in enumerate(items) if t == task]
            got = [table[(prompts[i], chosen[i])] for i in rows]
            scores[task] = sum(TASKS[task].score(g, items[i][2]) for g, i in zip(got, rows)) / len(rows)
            similar[task] = sum(TASKS[task].similarity(g, items[i][2]) for g, i in zip(got, rows)) / len(rows)
            counts += [torch.nn.functional.one_hot(torch.tensor(chosen[i] % (len(SUITE) + 1)), len(SUITE) + 1)
                       for i in rows]                                   # -1 (declined) -> the last column
        summary[name][method] = summarise(scores, similar, None if method in ("base", "oracle") else
                                          torch.stack(counts).float(), tasks, condition.tasks == "suite")
        summary[name][method]["declined"] = round(chosen.count(-1) / len(chosen), 4)
        print(f"{name:10s} {method:20s} accuracy={summary[name][method]['accuracy']:.3f} "
              f"routing={summary[name][method]['routing_accuracy']}", flush=True)
    summary["seconds"][f"{name}/decided"] = round(seconds, 1)


def run_condition(name: str, condition, libraries, tokenizer, cfg, train_examples, summary) -> None:
    if condition.library == "large":                         # a library of its own (benchmarks/evaluate_large.py)
        return run_large(name, condition, cfg, summary)
    tasks = SUITE if condition.tasks == "suite" else UNSEEN
    library = libraries[condition.library]
    refused = [m for m in condition.methods if condition.library == "bare" and needs_text(m, cfg)]
    batch = [m for m in condition.methods if decided(m, cfg) and m not in refused]
    if batch:
        run_decided(name, condition, batch, library, cfg, summary)
    for method in tqdm([m for m in condition.methods if m not in batch], desc=f"methods ({name})"):
        if condition.library == "bare" and needs_text(method, cfg):
            why = refusal(method, library, cfg)
            if why is None:
                raise AssertionError(f"{method} composed on a library without text; it should refuse")
            summary[name][method] = {"refused": why}
            continue
        with torch.enable_grad() if method == "moe_gate" else torch.no_grad():
            scores, similar, counts, seconds = run_method(method, tasks, library, tokenizer, cfg, train_examples,
                                                          condition)
        summary[name][method] = summarise(scores, similar, counts, list(tasks), condition.tasks == "suite")
        summary["seconds"][f"{name}/{method}"] = round(seconds, 1)
        print(f"{name:10s} {method:20s} accuracy={summary[name][method]['accuracy']:.3f} "
              f"routing={summary[name][method]['routing_accuracy']}  ({seconds:.0f} s)", flush=True)
    for method, other in (condition.get("same_as") or {}).items():
        if method not in summary[other]:
            raise ValueError(f"condition {name}: same_as {method} -> {other}, which this run did not evaluate")
        summary[name][method] = dict(summary[other][method], same_as=other)


def main(overrides: list[str]):
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("config=")]
    cfg = load_config([o for o in overrides if not o.startswith("config=")],
                      config_name=names[-1] if names else "evaluate")
    torch.manual_seed(cfg.seed)
    torch.set_grad_enabled(False)
    out = Path(cfg.out_dir)
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    libraries = {"text": suite_library(cfg.library, adapters_dir(cfg))}
    if any(c is not None and c.library == "bare" for c in cfg.conditions.values()):
        libraries["bare"] = suite_library(adapters=bare_adapters(adapters_dir(cfg)))
    _, tokenizer = load_smollm2()
    started = time.perf_counter()
    train_examples = moe_examples(tokenizer, cfg.moe_gate.examples_per_task)
    conditions = {name: c for name, c in cfg.conditions.items() if c is not None}     # null: dropped
    summary = {"conditions": list(conditions), "machine": "", "date": datetime.date.today().isoformat(),
               "per_task": cfg.per_task, "tasks": list(SUITE), "unseen_tasks": list(UNSEEN),
               "config": OmegaConf.to_container(cfg), "seconds": {}}
    summary.update({name: {} for name in conditions})
    summary["prototype_abs_cos"] = prototype_overlap(libraries["text"])[0]   # how alike the adapters' prototypes are
    earlier = previous_summary(out, cfg) if cfg.merge else None
    info = machine()
    summary["machine"] = f"{info['cpu']}, {info['cores']} cores" + (f", {info['gpu']}" if info["gpu"] else "")
    summary["machine_line"] = summary["machine"] + f", torch {info['torch']}"
    for name, condition in conditions.items():
        if condition.get("prompts") == "multi_skill":
            run_multi_skill(name, condition, libraries["text"], tokenizer, cfg, summary)
            continue
        run_condition(name, condition, libraries, tokenizer, cfg, train_examples, summary)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 1)
    if earlier is not None:
        summary = merged(earlier, summary)
    charts(summary, out, "routing.png" if earlier is None else "routing_added.png")
    for condition in summary["conditions"]:
        for entry in summary[condition].values():
            entry.pop("_shares", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table(summary) + multi_skill_table(summary))
    print(table(summary))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
