"""Per-prompt routing decisions without generating: the signals a SequenceArrowRouter reads (its calibrated
weight scores after the probe pass, the retrieval and TF-IDF cosines), collected once per prompt and
calibration, and every sequence router's choice computed from them by the router's own
`combined_scores`. Then each distinct (prompt, adapter) pair is answered once, by the base model with that
adapter (`answers`): a router that picks one adapter per prompt answers what that adapter answers.

This is how benchmarks/evaluate_routing.py and tune_routing.py afford several routers under several
conditions on a shared 2-core CPU: one base forward per prompt and calibration instead of one generation per
prompt and router.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

import adaptermix as am
from adaptermix.composer.compose import composer_state
from adaptermix.models import load_smollm2
from adaptermix.routers.sequence_arrow import combined_scores
from adaptermix.suite import generate
from adaptermix.tasks import SUITE, chat_prompt

__all__ = ["signals", "choices", "answers", "calibration_of", "router_picks"]


class _Decided(Exception):
    """Raised after the probe pass: the routing is decided, the routed forward is not needed."""


@torch.no_grad()
def signals(library, prompts: list[str], *, calibration: str, text: bool, batch_size: int = 20,
            adapters: list[str] | None = None) -> dict:
    """{'weights', and with text 'dense', 'lexical'}: (prompts, N) each, N = the adapters composed in order
    (default: the SUITE's). calibration: 'library' | 'generic' | 'raw' (uncalibrated)."""
    model, tokenizer = load_smollm2()
    options = dict(calibrate=calibration != "raw", calibration="generic" if calibration == "raw" else calibration)
    router = am.SequenceArrowRouter(**options, **(dict(retrieval_weight=1.0, lexical_weight=1.0) if text else {}))
    model = am.compose(model.eval(), library, router, adapters=list(adapters or SUITE), tokenizer=tokenizer,
                       trace=False)
    state = composer_state(model)

    def stop(*_):
        if not state.probing:
            raise _Decided
    hook = model.model.layers[0].register_forward_pre_hook(stop)
    tokenizer.padding_side = "left"
    collected: dict[str, list] = {}
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"signals ({calibration})", leave=False):
        chunk = prompts[start:start + batch_size]
        am.set_prompts(model, chunk)
        inputs = tokenizer([chat_prompt(tokenizer, p) for p in chunk], return_tensors="pt", padding=True,
                           add_special_tokens=False)
        try:
            model(**inputs)
        except _Decided:
            pass
        for key, value in router.last_signals.items():
            collected.setdefault(key, []).append(value.float().cpu())
    hook.remove()
    return {key: torch.cat(values) for key, values in collected.items()}


def choices(weights: torch.Tensor, text: dict | None, options: dict) -> list[int]:
    """Each prompt's adapter index (-1: declined, the base model) for a SequenceArrowRouter's options."""
    reads_text = bool(options.get("retrieval_weight") or options.get("candidates") is not None)
    scores, confidence = combined_scores(
        weights, text["dense"] if reads_text else None, text.get("lexical") if reads_text else None,
        retrieval_weight=options.get("retrieval_weight", 0.0), lexical_weight=options.get("lexical_weight", 0.0),
        combine=options.get("combine", "sum"), candidates=options.get("candidates"))
    chosen = scores.argmax(1)
    threshold = options.get("min_similarity")
    if threshold is not None:
        chosen = torch.where(confidence < threshold, -1, chosen)
    return chosen.tolist()


def calibration_of(options) -> str:
    """The signal pass a sequence router's options read: 'raw', 'library' or 'generic'."""
    return "raw" if not options.get("calibrate", True) else options.get("calibration", "library")


def router_picks(method: str, passes: dict, text: dict | None, cfg) -> list[int]:
    """Each prompt's adapter index for `retrieval`, `retrieval_lexical` or one of cfg.sequence_routers, from
    the signal passes by calibration (`passes`) and the text signals (`text`)."""
    if method in ("retrieval", "retrieval_lexical"):
        weight = cfg.retrieval_lexical.lexical_weight if method == "retrieval_lexical" else 0.0
        return (text["dense"] + weight * text["lexical"]).argmax(1).tolist()
    options = cfg.sequence_routers[method]
    return choices(passes[calibration_of(options)]["weights"], text, options)


@torch.no_grad()
def answers(library, pairs: set[tuple[str, int]], *, max_new_tokens: int, batch_size: int = 20,
            adapters: list[str] | None = None) -> dict:
    """{(prompt, adapter index): greedy answer} with that one adapter of `adapters` (default: the SUITE's;
    -1: the base model)."""
    adapters = list(adapters or SUITE)
    model, tokenizer = load_smollm2()
    router = am.PerSequenceRouter()
    model = am.compose(model.eval(), library, router, adapters=adapters, trace=False)
    ordered = sorted(pairs, key=lambda pair: (pair[1], len(pair[0])))
    out = {}
    for start in tqdm(range(0, len(ordered), batch_size), desc="answers", leave=False):
        chunk = ordered[start:start + batch_size]
        router.assign([am.BASE if index < 0 else adapters[index] for _, index in chunk])
        texts = generate(model, tokenizer, [p for p, _ in chunk], max_new_tokens=max_new_tokens,
                         batch_size=len(chunk))
        out.update(zip(chunk, texts))
    return out
