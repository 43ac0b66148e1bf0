"""The `multi_skill` condition of benchmarks/evaluate_routing.py: prompts that need two library skills in
sequence (adaptermix.multi_skill), scored by exact match, for every kind of method:

    base                         no adapter
    first_skill / second_skill   the adapter of the composite's first / second skill alone
    best_single                  per composite the better of those two (on the same prompts: an upper bound)
    fused_linear / fused_ties    the pair fused into one adapter by the composer (weights: multi_skill.pair_weight)
    uniform                      every adapter, equal weights
    retrieval, retrieval_lexical, every name of `sequence_routers`: one adapter per prompt
                                 (benchmarks/routing_signals.py: one probe pass, then that adapter's answer)
    every name of `mixing_routers` (per-token routers, and sequence routers that mix the top k per prompt):
                                 the composed model generates; `pair_share` = share of its (token, layer)
                                 decisions that go to one of the composite's two adapters

Entries carry `accuracy` (exact match over all prompts), `per_task` (per composite), and for routers
`pair_share` (per-token: decisions; per-prompt: prompts routed to one of the pair) and `routed_to`.

    python benchmarks/evaluate_routing.py 'conditions={multi_skill:{prompts: multi_skill, methods: [base]}}'
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

import adaptermix as am
from adaptermix.models import load_smollm2
from adaptermix.multi_skill import COMPOSITES, MULTI_SKILL
from adaptermix.suite import compose_adapter, generate
from adaptermix.tasks import SUITE, normalise
from routing_signals import answers, calibration_of, router_picks, signals

__all__ = ["multi_items", "mixing_router", "run_multi_skill"]


def multi_items(split: str, per_composite: int) -> list[tuple[str, str, str]]:
    """[(composite, instruction, answer)] of one split, composite by composite."""
    return [(name, prompt, answer) for name in MULTI_SKILL for prompt, answer in
            COMPOSITES[name].examples(split, per_composite)]


def mixing_router(spec: dict):
    """A router from a `mixing_routers` entry: {router: arrow | token_level | sequence | uniform, **options}."""
    options = {k: v for k, v in spec.items() if k != "router"}
    kinds = {"arrow": am.ArrowRouter, "token_level": am.TokenLevelRouter, "sequence": am.SequenceArrowRouter,
             "uniform": lambda: am.FixedRouter({name: 1.0 / len(SUITE) for name in SUITE})}
    if spec["router"] not in kinds:
        raise ValueError(f"mixing router {spec['router']!r}: choose one of {sorted(kinds)}")
    return kinds[spec["router"]](**options)


def _scored(items, got) -> tuple[float, dict[str, float]]:
    per = {}
    for name in MULTI_SKILL:
        rows = [i for i, (c, _, _) in enumerate(items) if c == name]
        if rows:
            per[name] = round(sum(normalise(got[i]) == normalise(items[i][2]) for i in rows) / len(rows), 4)
    return round(sum(normalise(g) == normalise(a) for g, (_, _, a) in zip(got, items)) / len(items), 4), per


def _pair_indices(items) -> torch.Tensor:
    """(prompts, 2): the SUITE indices of each prompt's two skills."""
    return torch.tensor([[SUITE.index(s) for s in COMPOSITES[c].skills] for c, _, _ in items])


def generated(model, tokenizer, items, cfg, *, text: bool) -> tuple[list[str], torch.Tensor | None]:
    """Greedy answers of a composed model, and its (prompts, N + 1) decision counts when it routes."""
    counts = []
    before = (lambda chunk: am.set_prompts(model, chunk)) if text else None
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    after = None
    if am.routing_trace(model) is not None:
        after = lambda inputs, new: counts.append(  # noqa: E731
            am.routing_trace(model).decision_counts(inputs.attention_mask, new, eos))
    got = generate(model, tokenizer, [p for _, p, _ in items], max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size, before_batch=before, after_batch=after)
    return got, torch.cat(counts) if counts else None


def mixed_answers(spec, library, tokenizer, items, cfg):
    model = am.compose(load_smollm2()[0].eval(), library, mixing_router(dict(spec)), adapters=list(SUITE),
                       tokenizer=tokenizer)
    return generated(model, tokenizer, items, cfg, text=True)


def fused_answers(method: str, library, tokenizer, items, cfg) -> list[str]:
    """Each composite's prompts answered by its two adapters fused into one (composer.fuse)."""
    got = {}
    weight = float(cfg.multi_skill.pair_weight)
    for name in MULTI_SKILL:
        rows = [i for i, (c, _, _) in enumerate(items) if c == name]
        adapter = am.fuse(library, list(COMPOSITES[name].skills), [weight, weight], method=method,
                          density=cfg.multi_skill.ties_density)
        model = compose_adapter(adapter, library)
        got.update(zip(rows, generate(model, tokenizer, [items[i][1] for i in rows],
                                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)))
    return [got[i] for i in range(len(items))]


def _entry(items, got, picked=None, counts=None) -> dict:
    accuracy, per = _scored(items, got)
    entry = {"accuracy": accuracy, "routing_accuracy": None, "per_task": per}
    pair = _pair_indices(items)
    if picked is not None:                                            # one adapter (or -1) per prompt
        chosen = torch.tensor(picked)
        entry["pair_share"] = round(float((chosen[:, None] == pair).any(1).float().mean()), 4)
        entry["declined"] = round(float((chosen < 0).float().mean()), 4)
        entry["routed_to"] = {name: _most(chosen[[c == name for c, _, _ in items]]) for name in MULTI_SKILL}
    if counts is not None:                                            # (prompts, N + 1) decisions
        entry["pair_share"] = round(float(counts.gather(1, pair).sum() / counts.sum()), 4)
        top = torch.stack([counts[[c == name for c, _, _ in items]].sum(0) for name in MULTI_SKILL])
        entry["routed_to"] = {name: (SUITE + ("none",))[int(row.argmax())] for name, row in zip(MULTI_SKILL, top)}
    return entry


def _most(chosen: torch.Tensor) -> str:
    index = int(torch.mode(chosen).values)
    return "none" if index < 0 else SUITE[index]


def run_multi_skill(name: str, condition, library, tokenizer, cfg, summary, *, split: str = "test",
                    per_composite: int | None = None) -> None:
    """Every method of the condition on the composites' `split` prompts, into summary[name]."""
    items = multi_items(split, per_composite or cfg.per_task)
    prompts = [p for _, p, _ in items]
    methods = list(condition.methods)
    started = time.perf_counter()
    single = {"base": [-1] * len(items), "first_skill": _pair_indices(items)[:, 0].tolist(),
              "second_skill": _pair_indices(items)[:, 1].tolist()}
    picks = {m: single[m] for m in methods if m in single}
    routed = [m for m in methods if m in ("retrieval", "retrieval_lexical") or m in cfg.sequence_routers]
    if routed:
        calibrations = {calibration_of(o) for m, o in cfg.sequence_routers.items() if m in routed}
        passes = {c: signals(library, prompts, calibration=c, text=True) for c in sorted(calibrations or {"generic"})}
        text = next(iter(passes.values()))
        for method in routed:
            picks[method] = router_picks(method, passes, text, cfg)
    if "best_single" in methods:
        picks.setdefault("first_skill", single["first_skill"])
        picks.setdefault("second_skill", single["second_skill"])
    table = answers(library, {(p, c) for chosen in picks.values() for p, c in zip(prompts, chosen)},
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    for method, chosen in picks.items():
        got = [table[(p, c)] for p, c in zip(prompts, chosen)]
        summary[name][method] = _entry(items, got, None if method in single else chosen)
    if "best_single" in methods:
        first, second = summary[name]["first_skill"], summary[name]["second_skill"]
        per = {c: max(first["per_task"][c], second["per_task"][c]) for c in first["per_task"]}
        summary[name]["best_single"] = {"accuracy": round(sum(per.values()) / len(per), 4),
                                        "routing_accuracy": None, "per_task": per,
                                        "note": "per composite the better of first_skill and second_skill"}
        for method in ("first_skill", "second_skill"):
            if method not in methods:
                del summary[name][method]
    summary["seconds"][f"{name}/decided"] = round(time.perf_counter() - started, 1)
    for method in tqdm([m for m in methods if m not in summary[name]], desc=f"methods ({name})"):
        started = time.perf_counter()
        if method in ("fused_linear", "fused_ties"):
            summary[name][method] = _entry(items, fused_answers(method.removeprefix("fused_"), library, tokenizer,
                                                                items, cfg))
        elif method in cfg.mixing_routers:
            got, counts = mixed_answers(cfg.mixing_routers[method], library, tokenizer, items, cfg)
            summary[name][method] = _entry(items, got, counts=counts)
        else:
            raise ValueError(f"multi_skill: unknown method {method!r} (not a sequence, mixing or fused method)")
        summary["seconds"][f"{name}/{method}"] = round(time.perf_counter() - started, 1)
    for method in methods:
        entry = summary[name][method]
        print(f"{name:10s} {method:20s} accuracy={entry['accuracy']:.3f} pair_share={entry.get('pair_share')}",
              flush=True)


def multi_skill_table(summary) -> str:
    """Exact match per composite (multi_skill) and per unseen task, one row per method; '' without them."""
    out = []
    for condition, what in (("multi_skill", "composite (first skill -> second skill)"), ("unseen", "unseen task")):
        entries = {m: e for m, e in summary.get(condition, {}).items() if "per_task" in e}
        if not entries:
            continue
        columns = list(dict.fromkeys(c for e in entries.values() for c in e["per_task"]))
        heads = [f"{c} ({' -> '.join(COMPOSITES[c].skills)})" if c in COMPOSITES else c for c in columns]
        out += ["", f"{condition}: exact match per {what}.", "",
                "| method | " + " | ".join(heads) + " | all |", "|---" * (len(columns) + 2) + "|"]
        for method, entry in entries.items():
            cells = [f"{entry['per_task'][c]:.2f}" if c in entry["per_task"] else "-" for c in columns]
            out.append(f"| {method} | " + " | ".join(cells) + f" | {entry['accuracy']:.3f} |")
    return "\n".join(out) + ("\n" if out else "")
