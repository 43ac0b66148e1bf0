"""The `large` routing condition: zero-shot routing as the library grows from the 12 example adapters to 40
with near neighbours (adaptermix.trained_sets: 22 more tasks of the same families, a second seed of six
tasks), on held-out test prompts of the tasks in the library, asked in the template of their example prompts.

    python benchmarks/evaluate_large.py           # this section alone, added to summary.json (merge=true)
    python benchmarks/evaluate_routing.py         # every condition of conf/evaluate.yaml, this one included

Writes the section into <out_dir>/summary.json (and table.md, accuracy.png) like every condition, and on its
own: <out_dir>/large.json and large.png (accuracy against library size, `growth_chart`).

Per library size (`stages`, default 12 -> 24 -> 40) and method: exact match of the greedy answer and
prompt-level routing accuracy, where a prompt is routed right when its adapter was trained on the prompt's
task (a second seed of the task counts). Every method decides one adapter per prompt (or none), so decisions
come from one signal pass per stage and answers from one generation per distinct (prompt, adapter) pair
(benchmarks/routing_signals.py). Router settings are conf/evaluate.yaml's, chosen on the train split of the
12-adapter suite: nothing is tuned on these libraries or prompts.

The section of summary.json has the shape of the other conditions ({method: entry}, the entry of the largest
library), each entry with `stages` ({size: entry}); `growth_chart` draws accuracy against library size.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_signals import answers, calibration_of, router_picks, signals  # noqa: E402

from adaptermix.library import AdapterLibrary  # noqa: E402
from adaptermix.library.owned import publish_folder, remove_owned  # noqa: E402
from adaptermix.suite import ADAPTERS  # noqa: E402
from adaptermix.tasks import SUITE, TASKS  # noqa: E402
from adaptermix.trained_sets import LARGE_ADAPTERS, LARGE_STAGES, cache_dir, require, task_of  # noqa: E402

__all__ = ["large_library", "run_large", "growth_chart", "DECIDED"]

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_ORDER = SUITE + LARGE_ADAPTERS          # growth order: a stage of size s holds the first s
PURPOSE = "large example library"               # the cached library's ownership marker
DECIDED = ("base", "oracle", "retrieval", "retrieval_lexical")   # + conf/evaluate.yaml's sequence_routers


def large_library(size: int = len(ADAPTER_ORDER)) -> AdapterLibrary:
    """The library of the first `size` adapters of ADAPTER_ORDER (the committed example adapters, then the
    cached large set), built once into the cache and rebuilt when an adapter's checkpoint changed."""
    from adaptermix.cli import main as cli
    from adaptermix.library.peft_format import load_peft_adapter
    from adaptermix.models import smollm2_path

    names = list(ADAPTER_ORDER[:size])
    folder = require("large", first=max(0, size - len(SUITE)))
    checkpoints = [ADAPTERS / name if name in SUITE else folder / name for name in names]
    path = cache_dir() / ("large-library" if size == len(ADAPTER_ORDER) else f"large-library-{size}")
    expected = [load_peft_adapter(checkpoint).content_hash() for checkpoint in checkpoints]
    if (path / "catalog.sqlite").is_file():
        with AdapterLibrary.open(path) as library:
            if sorted(library.names()) == sorted(names) and library.content_hashes(names) == expected:
                return AdapterLibrary.open(path)
        remove_owned(path, PURPOSE)

    def build(staging: Path) -> None:
        if cli(["build", str(staging), *map(str, checkpoints), f"base_model={smollm2_path()}"]):
            raise RuntimeError("`adaptermix build` of the large library failed")

    print(f"building the large library ({size} adapters) at {path}")
    publish_folder(path, build, PURPOSE)
    return AdapterLibrary.open(path)


def entry_of(picks: list[int], adapters: list[str], items: list, table: dict, counted: bool) -> dict:
    """Exact match, similarity and routing accuracy of one method's picks (adapter index, -1: none)."""
    scores, similar, right = {}, {}, []
    for task in dict.fromkeys(t for t, _, _ in items):
        rows = [i for i, (t, _, _) in enumerate(items) if t == task]
        got = [table[(items[i][1], -1 if picks[i] < 0 else ADAPTER_ORDER.index(adapters[picks[i]]))] for i in rows]
        scores[task] = sum(TASKS[task].score(g, items[i][2]) for g, i in zip(got, rows)) / len(rows)
        similar[task] = sum(TASKS[task].similarity(g, items[i][2]) for g, i in zip(got, rows)) / len(rows)
        right += [picks[i] >= 0 and task_of(adapters[picks[i]]) == task for i in rows]
    return {"accuracy": round(sum(scores.values()) / len(scores), 4),
            "routing_accuracy": round(sum(right) / len(right), 4) if counted else None,
            "similarity": round(sum(similar.values()) / len(similar), 4),
            "declined": round(picks.count(-1) / len(picks), 4),
            "per_task": {k: round(v, 4) for k, v in scores.items()}}


def stage_picks(adapters: list[str], items: list, library, methods: list[str], cfg) -> dict[str, list[int]]:
    """{method: each prompt's adapter index in `adapters` (-1: none)} from one signal pass."""
    prompts = [prompt for _, prompt, _ in items]
    passes = {}
    for method in methods:
        calibration = calibration_of(cfg.sequence_routers.get(method, {}))
        if method in cfg.sequence_routers and calibration not in passes:
            passes[calibration] = signals(library, prompts, calibration=calibration, text=True, adapters=adapters)
    text = next(iter(passes.values()), None) or signals(library, prompts, calibration="generic", text=True,
                                                        adapters=adapters)
    first_seed = {task_of(name): i for i, name in reversed(list(enumerate(adapters)))}
    picks = {}
    for method in methods:
        if method == "base":
            picks[method] = [-1] * len(items)
        elif method == "oracle":
            picks[method] = [first_seed[task] for task, _, _ in items]
        else:
            picks[method] = router_picks(method, passes, text, cfg)
    return picks


def run_large(name: str, condition, cfg, summary: dict) -> None:
    """Fill summary[name] with the `large` condition: {method: entry of the largest stage + 'stages'}."""
    unknown = [m for m in condition.methods if m not in DECIDED and m not in cfg.sequence_routers]
    if unknown:
        raise ValueError(f"condition {name}: methods {unknown} do not pick one adapter per prompt; the large "
                         f"condition runs {list(DECIDED)} and conf's sequence_routers")
    stages = [int(s) for s in condition.get("stages", LARGE_STAGES)]
    if stages != sorted(stages) or stages[0] < 1 or stages[-1] > len(ADAPTER_ORDER):
        raise ValueError(f"condition {name}: stages must grow within 1..{len(ADAPTER_ORDER)}, got {stages}")
    library = large_library(stages[-1])
    started = time.perf_counter()
    decided = {}
    for size in stages:
        adapters = list(ADAPTER_ORDER[:size])
        tasks = list(dict.fromkeys(task_of(a) for a in adapters))
        items = [(task, prompt, answer) for task in tasks for prompt, answer in TASKS[task].examples("test", cfg.per_task)]
        decided[size] = (adapters, items, stage_picks(adapters, items, library, list(condition.methods), cfg))
    pairs = {(items[i][1], -1 if pick < 0 else ADAPTER_ORDER.index(adapters[pick]))
             for adapters, items, picks in decided.values() for chosen in picks.values()
             for i, pick in enumerate(chosen)}
    table = answers(library, pairs, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                    adapters=list(ADAPTER_ORDER[:stages[-1]]))
    section = summary.setdefault(name, {})
    for method in condition.methods:
        per_stage = {}
        for size, (adapters, items, picks) in decided.items():
            per_stage[str(size)] = entry_of(picks[method], adapters, items, table,
                                            counted=method not in ("base", "oracle"))
            print(f"{name:10s} {size:3d} adapters {method:20s} accuracy={per_stage[str(size)]['accuracy']:.3f} "
                  f"routing={per_stage[str(size)]['routing_accuracy']}", flush=True)
        section[method] = dict(per_stage[str(stages[-1])], stages=per_stage)
    summary.setdefault("seconds", {})[f"{name}/decided"] = round(time.perf_counter() - started, 1)
    library_info = {"stages": stages, "adapters": list(ADAPTER_ORDER[:stages[-1]]),
                    "tasks": list(dict.fromkeys(task_of(a) for a in ADAPTER_ORDER[:stages[-1]])),
                    "training": training_record(stages[-1])}
    out = Path(cfg.out_dir) if Path(cfg.out_dir).is_absolute() else ROOT / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(
        {"condition": name, "date": summary.get("date"), "machine": summary.get("machine_line"),
         "per_task": cfg.per_task, "library": library_info, "methods": section}, indent=2) + "\n")
    growth_chart(section, out / f"{name}.png", f"Routing as the library grows, {cfg.per_task} held-out prompts per "
                                                f"task - {summary.get('date')}")


def training_record(size: int) -> dict:
    """How the large set's adapters in a library of `size` were trained (the set's manifest.json): settings,
    validation exact match, seconds."""
    extra = LARGE_ADAPTERS[:max(0, size - len(SUITE))]
    manifest = json.loads((require("large", first=len(extra)) / "manifest.json").read_text())
    adapters = manifest["adapters"]
    return {"settings": adapters[extra[0]]["settings"] if extra else None, "machine": manifest.get("machine"),
            "validation_exact_match": {name: adapters[name]["check_exact_match"] for name in extra},
            "train_seconds": round(sum(adapters[name]["train_seconds"] for name in extra), 1)}


def growth_chart(section: dict, path: Path, title: str = "") -> Path:
    """Exact match (solid) and prompt-level routing accuracy (dashed) against library size, per method."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (method, entry) in enumerate(section.items()):
        sizes = [int(s) for s in entry["stages"]]
        color = f"C{i}"
        ax.plot(sizes, [e["accuracy"] for e in entry["stages"].values()], "-o", color=color, label=f"{method}")
        routed = [e["routing_accuracy"] for e in entry["stages"].values()]
        if all(r is not None for r in routed):
            ax.plot(sizes, routed, "--x", color=color, alpha=0.8)
    ax.set_xlabel("adapters in the library")
    ax.set_ylabel("exact match (solid) / routing accuracy (dashed)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(sorted({int(s) for e in section.values() for s in e["stages"]}))
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "Routing as the library grows (held-out prompts)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    import evaluate_routing
    from omegaconf import OmegaConf

    others = [c for c in OmegaConf.load(ROOT / "conf" / "evaluate.yaml").conditions if c != "large"]
    evaluate_routing.main([*(f"conditions.{c}=null" for c in others), "merge=true", *sys.argv[1:]])
