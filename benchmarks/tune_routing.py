"""Choose the routers' settings on the train split only: prompts in the library's template and in the train
phrasings of adaptermix.paraphrase (never the held-out phrasings), on the library with its text and on the
same adapters without it. Nothing here reads the test split.

One probe pass per prompt and calibration collects the raw signals (the calibrated weight scores, the
retrieval cosines, the TF-IDF cosines; benchmarks/routing_signals.py); every combination is then scored
offline, by the router's own `combined_scores`, by prompt-level routing accuracy.

    python benchmarks/tune_routing.py                   # writes benchmarks/results/routing_tuning.json
    python benchmarks/tune_routing.py per_task=4        # quicker
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402
from routing_signals import signals  # noqa: E402

from adaptermix.paraphrase import paraphrased  # noqa: E402
from adaptermix.routers.sequence_arrow import _margin, _zscore  # noqa: E402
from adaptermix.suite import _cache, bare_adapters, suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, UNSEEN  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def prompt_sets(per_task: int) -> dict[str, list[tuple[str, str]]]:
    """{condition: [(task, prompt)]} from the train split; unseen tasks for the decline threshold."""
    return {"template": [(t, p) for t in SUITE for p, _ in TASKS[t].examples("train", per_task)],
            "paraphrase": [(t, p) for t in SUITE for p, _ in paraphrased(t, "train", per_task)],
            "unseen_paraphrase": [(t, p) for t in UNSEEN for p, _ in paraphrased(t, "train", per_task)]}


def accuracy(scores: torch.Tensor, tasks: list[str]) -> float:
    own = torch.tensor([SUITE.index(t) for t in tasks])
    return round(float((scores.argmax(1) == own).float().mean()), 4)


def restricted(scores: torch.Tensor, similarity: torch.Tensor, candidates: int | None) -> torch.Tensor:
    """The scores with all but retrieval's top `candidates` adapters per prompt masked (None: all kept)."""
    if candidates is None:
        return scores
    near = similarity.topk(candidates, dim=1).indices
    return scores.masked_fill(~torch.zeros_like(scores, dtype=torch.bool).scatter_(1, near, True), float("-inf"))


def combinations(text: dict, weights: dict) -> dict[str, torch.Tensor]:
    """Every candidate router's (prompts, N) scores from the signals."""
    out = {"retrieval": text["dense"], "retrieval_lexical": text["dense"] + text["lexical"]}
    for calibration, w in weights.items():
        out[f"weights_{calibration}"] = w
    for calibration in ("library", "generic"):
        w = weights[calibration]
        for lexical in (0.0, 0.5, 1.0):
            similarity = text["dense"] + lexical * text["lexical"]
            centred = similarity - similarity.mean(1, keepdim=True)
            for rw in (0.5, 1.0, 2.0, 4.0):
                out[f"sum_{calibration}_rw{rw}_lex{lexical}"] = w + rw * centred / centred.std(1, keepdim=True)
                wz, sz = _zscore(w), _zscore(similarity)
                for candidates in (None, 4, 6):
                    out[f"confidence_{calibration}_rw{rw}_lex{lexical}_cand{candidates}"] = restricted(
                        _margin(wz) * wz + rw * _margin(sz) * sz, similarity, candidates)
    return out


def main(per_task: str = "10", out: str = str(ROOT / "benchmarks" / "results" / "routing_tuning.json")):
    torch.set_grad_enabled(False)
    sets = prompt_sets(int(per_task))
    library, bare = suite_library(), suite_library(adapters=bare_adapters())
    results = {"per_task": int(per_task), "split": "train", "machine": machine(), "accuracy": {}}
    raw: dict[str, dict] = {}
    cache = _cache() / "routing_signals.pt"                                   # reused by a rerun (not committed)
    stored = torch.load(cache) if cache.is_file() else {}                     # tensors only (weights_only load)
    for condition in ("template", "paraphrase"):
        tasks, prompts = [t for t, _ in sets[condition]], [p for _, p in sets[condition]]
        if stored.get(condition, {}).get("prompts") != prompts:
            with_text = signals(library, prompts, calibration="library", text=True)
            stored[condition] = {"prompts": prompts, "text": with_text,
                                 "generic": signals(bare, prompts, calibration="generic", text=False)["weights"],
                                 "raw": signals(bare, prompts, calibration="raw", text=False)["weights"]}
            torch.save(stored, cache)
        with_text = stored[condition]["text"]
        weights = {"library": with_text["weights"], "generic": stored[condition]["generic"],
                   "raw": stored[condition]["raw"]}
        raw[condition] = dict(with_text, tasks=tasks)
        scored = combinations(with_text, weights)
        results["accuracy"][condition] = {name: accuracy(s, tasks) for name, s in scored.items()}
    both = {name: (results["accuracy"]["template"][name] + results["accuracy"]["paraphrase"][name]) / 2
            for name in results["accuracy"]["template"]}
    results["mean_of_conditions"] = dict(sorted(both.items(), key=lambda kv: -kv[1]))
    # decline threshold: the best retrieval cosine that keeps 99% of in-library train prompts (paraphrased)
    in_library = raw["paraphrase"]["dense"].max(1).values
    unseen = signals(library, [p for _, p in sets["unseen_paraphrase"]], calibration="generic",
                     text=True)["dense"].max(1).values
    threshold = round(float(torch.quantile(in_library, 0.01)), 3)
    results["min_similarity"] = {"rule": "1% quantile of the best retrieval cosine over in-library train prompts",
                                 "value": threshold,
                                 "unseen_declined": round(float((unseen < threshold).float().mean()), 3),
                                 "in_library_declined": round(float((in_library < threshold).float().mean()), 3)}
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    for name, value in list(results["mean_of_conditions"].items())[:12]:
        print(f"{name:40s} template {results['accuracy']['template'][name]:.3f}  "
              f"paraphrase {results['accuracy']['paraphrase'][name]:.3f}  mean {value:.3f}")
    for name in ("retrieval", "retrieval_lexical", "weights_library", "weights_generic", "weights_raw"):
        print(f"{name:40s} template {results['accuracy']['template'][name]:.3f}  "
              f"paraphrase {results['accuracy']['paraphrase'][name]:.3f}")
    print(results["min_similarity"])


if __name__ == "__main__":
    main(**dict(a.split("=", 1) for a in sys.argv[1:]))
