"""The Text-to-LoRA generator on the example library (SmolLM2-135M-Instruct): trained by reconstruction on
the 12 adapters, then asked for adapters from descriptions it never saw.

    python benchmarks/generator_eval.py      # writes benchmarks/results/generator_eval.json (~8 min, 2 cores)

In-library tasks: adapters generated from a held-out paraphrase of each task's description, beside the one
generated from the stored description and the original adapter. Unseen tasks (new formats and new
parameters of the parametric families): generated from their descriptions, beside the base model and the
nearest library adapter by retrieval. Exact match and string similarity on 10 held-out prompts per task.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.suite import compose_adapter, score_task, suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, UNSEEN  # noqa: E402

PER_TASK = 10
PARAPHRASES = {   # written for this benchmark; never seen in training
    "uppercase": "Rewrite the words using only capital letters",
    "acronym": "Form an abbreviation from the initial letter of each word",
    "extract_email": "Pull out the e-mail address that appears in the text",
    "extract_price": "Report how many dollars the item costs",
    "date_dmy": "Change a year-month-day date into day/month/year order",
    "date_mdy": "Change a year-month-day date into month/day/year order",
    "add": "Compute the sum of two numbers",
    "last_word": "Return the final word in the list",
    "max_number": "Find the biggest value among several numbers",
    "repeat_2": "Say a given word two times",
    "repeat_3": "Say a given word thrice",
    "snake_case": "Join lower-case words with underscores",
}


def score(model, tokenizer, task, before=None):
    exact, similar = score_task(model, tokenizer, task, PER_TASK, batch_size=PER_TASK, before_batch=before)
    return {"exact_match": round(exact, 4), "similarity": round(similar, 4)}


def main(steps: int = 1500):
    torch.manual_seed(0)
    library = suite_library()
    _, tokenizer = load_smollm2()
    start = time.perf_counter()
    generator = am.train_generator(library, steps=steps, lr=2e-3)
    train_seconds = time.perf_counter() - start
    torch.set_grad_enabled(False)
    result = {"machine": machine(), "per_task": PER_TASK, "steps": steps, "train_seconds": round(train_seconds, 1),
              "final_reconstruction_loss": round(generator.final_loss, 4), "in_library": {}, "unseen": {}}
    for task in SUITE:
        original = library.get(task)
        own = am.compose(load_smollm2()[0].eval(), library, am.FixedRouter({task: 1.0}), adapters=[task])
        entry = {"original": score(own, tokenizer, task)}
        for label, text in (("from_description", TASKS[task].description), ("from_paraphrase", PARAPHRASES[task])):
            adapter = am.generate_adapter(generator, text, name=label)
            entry[label] = score(compose_adapter(adapter, library), tokenizer, task)
            errors = [((adapter.modules[m].delta_weight() - f.delta_weight()).norm() / f.delta_weight().norm())
                      for m, f in original.modules.items()]
            entry[label]["relative_dw_error"] = round(float(torch.stack(errors).mean()), 4)
        result["in_library"][task] = entry
        print(task, {k: v["exact_match"] for k, v in entry.items()}, flush=True)
    for task in UNSEEN:
        adapter = am.generate_adapter(generator, TASKS[task].description, name="from_description")
        entry = {"generated": score(compose_adapter(adapter, library), tokenizer, task),
                 "base": score(load_smollm2()[0].eval(), tokenizer, task)}
        nearest = am.compose(load_smollm2()[0].eval(), library, am.RetrievalRouter(top_k=1), adapters=list(SUITE))
        entry["nearest_by_retrieval"] = score(nearest, tokenizer, task, lambda chunk: am.set_prompts(nearest, chunk))
        result["unseen"][task] = entry
        print(task, {k: (v["exact_match"], v["similarity"]) for k, v in entry.items()}, flush=True)
    for split in ("in_library", "unseen"):
        methods = next(iter(result[split].values())).keys()
        result[f"{split}_mean"] = {m: {k: round(sum(e[m][k] for e in result[split].values()) / len(result[split]), 4)
                                       for k in ("exact_match", "similarity")} for m in methods}
    path = Path(__file__).resolve().parent / "results" / "generator_eval.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("in_library_mean", "unseen_mean", "train_seconds")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})
