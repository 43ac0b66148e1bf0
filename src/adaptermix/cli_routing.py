"""The CLI's model commands: `route` (the routing decision per prompt, one prefill, no generation),
`generate` (greedy answers through the routed mixture, with their routing) and `fuse`.

    P = prompts, L = prompt tokens (padded), N = composed adapters (+1 column: no adapter)
"""

from __future__ import annotations

import json
import re
import time

import torch

from adaptermix.cli_library import check_names, open_library
from adaptermix.cli_options import UsageError

__all__ = ["route", "generate", "fuse", "routing_summaries"]

_SEQUENCE = re.compile(r"sequence (\d+)")


def _router(cfg):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(cfg.router, resolve=True)
    router = instantiate(settings)
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "_target_")
    return router, f"{type(router).__name__}({shown})"


def _inputs(tokenizer, prompts: list[str]):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None):
        from adaptermix.tasks import chat_prompt

        texts = [chat_prompt(tokenizer, p) for p in prompts]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _composed(args, cfg, lib):
    """(the base model with the library composed on it behind the configured router, tokenizer, router label)."""
    from transformers.utils import logging as hf_logging

    from adaptermix.composer import compose
    from adaptermix.models import load_model

    if not cfg.progress:                          # transformers' own "Loading weights" bar
        hf_logging.disable_progress_bar()
    model, tokenizer = load_model(cfg.base_model or lib.base_model.name)
    router, label = _router(cfg)
    return compose(model, lib, router, tokenizer=tokenizer), tokenizer, label


def _prefill_weights(trace, mask: torch.Tensor) -> torch.Tensor:
    """(P, N + 1) mean routing weight per adapter over each prompt's tokens and all modules, at the prefill."""
    N = len(trace.adapter_names)
    P, L = mask.shape
    total = torch.zeros(P, N + 1)
    for routing in trace.steps[0].values():
        idx, weights = routing.indices.cpu(), routing.weights.float().cpu()
        dense = torch.zeros(idx.shape[0], N + 1).scatter_add_(1, torch.where(idx >= 0, idx, N), weights)
        total += (dense.view(P, L, N + 1) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    return total / max(len(trace.steps[0]), 1)


def routing_summaries(trace, mask: torch.Tensor, router: str, groups: int, generated=None, eos_id=None) -> list[dict]:
    """Per prompt: the adapters by mean routing weight, the share of (token, layer) decisions each won,
    the leading adapter per group of layers, and the router's fallback notes."""
    names = list(trace.adapter_names) + ["none"]
    mask = mask.float().cpu()
    weights = _prefill_weights(trace, mask)
    per_layer = trace.decision_counts(mask, generated, eos_id, per_layer=True)    # (P, layers, N + 1)
    shares = per_layer.sum(1) / per_layer.sum((1, 2))[:, None].clamp_min(1)
    notes = {}
    for note in trace.notes:
        found = _SEQUENCE.search(note)
        notes.setdefault(int(found.group(1)) if found else None, []).append(note)
    summaries = []
    for row in range(mask.shape[0]):
        order = weights[row].argsort(descending=True).tolist()
        layers = per_layer.shape[1]
        chunks = torch.arange(layers).chunk(max(1, min(groups, layers)))
        summaries.append({
            "router": router,
            "adapters": [{"name": names[i], "weight": round(float(weights[row, i]), 4),
                          "decisions": round(float(shares[row, i]), 4)} for i in order if weights[row, i] > 0],
            "layers": [{"layers": f"{int(c[0])}-{int(c[-1])}" if len(c) > 1 else str(int(c[0])),
                        "adapter": names[int(per_layer[row, c].sum(0).argmax())]} for c in chunks],
            "notes": notes.get(row, []) + notes.get(None, []),
        })
    return summaries


def _print(prompt: str, summary: dict) -> None:
    print(f"> {prompt}")
    print(f"  router:   {summary['router']}")
    top = summary["adapters"][:4]
    if top:
        print("  adapters: " + ", ".join(f"{a['name']} {a['weight']:.2f}" for a in top) + "  (mean routing weight;"
              " decisions: " + ", ".join(f"{a['name']} {a['decisions']:.0%}" for a in top) + ")")
    else:
        print("  adapters: none (the base model answers)")
    print("  layers:   " + " | ".join(f"{g['layers']} {g['adapter']}" for g in summary["layers"]))
    for note in summary["notes"]:
        print(f"  note:     {note}")
    if "answer" in summary:
        print(f"  answer:   {summary['answer']!r}")


def _report(prompts: list[str], summaries: list[dict], as_json: bool) -> int:
    if as_json:
        print(json.dumps([{"prompt": p, **s} for p, s in zip(prompts, summaries)], indent=2))
    else:
        for prompt, summary in zip(prompts, summaries):
            _print(prompt, summary)
    return 0


@torch.no_grad()
def _run_prompts(args, cfg, max_new_tokens: int) -> int:
    """Compose, run the prompts (max_new_tokens 0: one forward, no answer; else greedy generation) and report
    each prompt's routing (and answer)."""
    from adaptermix.composer import routing_trace, set_prompts

    with open_library(args.library, cfg, writable=False) as lib:
        model, tokenizer, label = _composed(args, cfg, lib)
        inputs = _inputs(tokenizer, args.prompts)
        set_prompts(model, args.prompts)
        new = None
        if max_new_tokens:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            new = output[:, inputs.input_ids.shape[1]:]
        else:
            model(**inputs)
        answered = () if new is None else (new, tokenizer.eos_token_id)
        summaries = routing_summaries(routing_trace(model), inputs.attention_mask, label, cfg.route.layers, *answered)
    if new is not None:
        for summary, answer in zip(summaries, tokenizer.batch_decode(new, skip_special_tokens=True)):
            summary["answer"] = answer.strip()
    return _report(args.prompts, summaries, args.json)


def route(args, cfg) -> int:
    return _run_prompts(args, cfg, max_new_tokens=0)


def generate(args, cfg) -> int:
    return _run_prompts(args, cfg, max_new_tokens=cfg.generate.max_new_tokens)


def fuse(args, cfg) -> int:
    from omegaconf import OmegaConf

    from adaptermix.composer import fuse as fuse_adapters
    from adaptermix.composer.fusion import FUSION_METHODS

    settings = OmegaConf.to_container(cfg.fuse, resolve=True)
    if settings["method"] not in FUSION_METHODS:
        raise UsageError(f"unknown fusion method {settings['method']!r}; choose one of {', '.join(FUSION_METHODS)} "
                         "(--method NAME)")
    if settings["weights"] is not None and len(settings["weights"]) != len(args.adapters):
        raise UsageError(f"--weights takes one weight per adapter: {len(args.adapters)} adapter(s), "
                         f"{len(settings['weights'])} weight(s)")
    start = time.perf_counter()
    with open_library(args.library, cfg, writable=args.out is None) as lib:
        check_names(lib, list(args.adapters), args.library)
        adapter = fuse_adapters(lib, list(args.adapters), settings["weights"], method=settings["method"],
                                rank=settings["rank"], density=settings["density"], seed=settings["seed"],
                                name=args.name, progress=cfg.progress)
        if args.description:
            adapter = adapter.with_metadata(description=args.description)
        if args.out:
            where = adapter.save_peft(args.out)
        else:
            where = lib.root
            lib.add(adapter)
    print(f"{adapter.name}: {adapter.description}; rank <= {adapter.max_rank}, {len(adapter.modules)} modules, "
          f"{time.perf_counter() - start:.1f} s; {'wrote' if args.out else 'added to'} {where}")
    return 0
