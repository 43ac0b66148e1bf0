"""Library learning on the example library (SmolLM2-135M-Instruct): MBC clustering and LoRAHub weights.

    python benchmarks/library_learning.py      # writes benchmarks/results/library_learning.json (~6 min, 2 cores)

1. MBC: cluster the 12 adapters by their parameter embeddings (k = 6), merge each cluster (exact mean dW),
   and compare routers on the clustered library against the unclustered one, on held-out prompts of the
   library's tasks (exact match).
2. LoRAHub: for each unseen task, search fusion weights over the 12 adapters on 5 train examples (CMA-ES,
   budget 40, L1 0.05), then score the fused adapter on the task's held-out prompts, beside uniform weights
   and the nearest adapter by retrieval.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.suite import answer_example, compose_adapter, score_task, suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, UNSEEN  # noqa: E402

PER_TASK = 10


def score(model, tokenizer, names, before=None):
    scored = {name: score_task(model, tokenizer, name, PER_TASK, batch_size=PER_TASK, before_batch=before)
              for name in names}
    return {"exact_match": round(sum(e for e, _ in scored.values()) / len(scored), 4),
            "similarity": round(sum(s for _, s in scored.values()) / len(scored), 4),
            "per_task": {name: e for name, (e, _) in scored.items()}}


def routed(library, router, tokenizer, names=None):
    model = am.compose(load_smollm2()[0].eval(), library, router, adapters=names, tokenizer=tokenizer)
    return model, (lambda chunk: am.set_prompts(model, chunk))


def main(k: int = 6):
    torch.set_grad_enabled(False)
    library = suite_library()
    _, tokenizer = load_smollm2()
    result = {"machine": machine(), "per_task": PER_TASK, "k": k}
    start = time.perf_counter()

    clustered, members = am.clustered_library(library, Path(tempfile.mkdtemp()) / "mbc", k, seed=0, progress=False)
    result["clusters"] = members
    routers = {"arrow_top2": lambda: am.ArrowRouter(top_k=2), "retrieval": lambda: am.RetrievalRouter(top_k=1),
               "seq_arrow": lambda: am.SequenceArrowRouter(top_k=1, score="prototype", calibrate=True)}
    mbc = {}
    for name, make in routers.items():
        for label, lib in (("unclustered", library), ("clustered", clustered)):
            model, before = routed(lib, make(), tokenizer)
            mbc[f"{name}/{label}"] = score(model, tokenizer, SUITE, before)
            print(name, label, mbc[f"{name}/{label}"]["exact_match"], flush=True)
    result["mbc"] = mbc

    lorahub = {}
    for task in UNSEEN:
        examples = [answer_example(tokenizer, *pair) for pair in TASKS[task].examples("train", 5)]
        weights, fused = am.search_fusion_weights(load_smollm2()[0].eval(), library, list(SUITE), examples,
                                                  budget=40, l1=0.05, pad_id=tokenizer.pad_token_id,
                                                  name=f"lorahub_{task}", progress=False)
        model = compose_adapter(fused, library)
        entry = {"weights": {n: round(w, 3) for n, w in weights.items()},
                 "lorahub": score(model, tokenizer, [task])}
        uniform, _ = routed(library, am.FixedRouter({n: 1 / len(SUITE) for n in SUITE}), tokenizer)
        entry["uniform"] = score(uniform, tokenizer, [task])
        nearest, before = routed(library, am.RetrievalRouter(top_k=1), tokenizer)
        entry["retrieval"] = score(nearest, tokenizer, [task], before)
        entry["base"] = score(load_smollm2()[0].eval(), tokenizer, [task])
        lorahub[task] = entry
        print(task, {m: entry[m]["exact_match"] for m in ("lorahub", "uniform", "retrieval", "base")},
              {m: entry[m]["similarity"] for m in ("lorahub", "uniform", "retrieval", "base")}, flush=True)
    result["lorahub"] = lorahub
    result["seconds"] = round(time.perf_counter() - start, 1)
    path = Path(__file__).resolve().parent / "results" / "library_learning.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})
