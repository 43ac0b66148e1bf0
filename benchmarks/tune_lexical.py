"""Choose the lexical term of retrieval on the train split only: for each TF-IDF analyser and weight, the
share of train prompts whose best adapter (embedding cosine + weight x TF-IDF cosine) is their own.

    python benchmarks/tune_lexical.py        # writes benchmarks/results/lexical_tuning.json

No model runs: routing decisions only (the held-out split is never read here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from adaptermix.routers.lexical import adapter_documents  # noqa: E402
from adaptermix.suite import suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS  # noqa: E402

ANALYSERS = {"words 1-2 (the router's)": dict(ngram_range=(1, 2), sublinear_tf=True),
             "words 1": dict(ngram_range=(1, 1), sublinear_tf=True),
             "chars 2-4": dict(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)}
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 100.0)


def main(per_task: int = 40):
    library = suite_library()
    names = list(SUITE)
    _, embeddings = library.text_embeddings(names)
    documents = adapter_documents([library.record(n) for n in names])
    prompts = [(i, p) for i, name in enumerate(names) for p, _ in TASKS[name].examples("train", per_task)]
    labels = np.array([i for i, _ in prompts])
    dense = library.encoder.encode([p for _, p in prompts]) @ embeddings.T
    rows = []
    for analyser, settings in ANALYSERS.items():
        vectorizer = TfidfVectorizer(**settings).fit(documents)
        lexical = (vectorizer.transform([p for _, p in prompts]) @ vectorizer.transform(documents).T).toarray()
        for weight in WEIGHTS:
            chosen = (dense + weight * lexical).argmax(1)
            per_task_share = {n: round(float((chosen[labels == i] == i).mean()), 3) for i, n in enumerate(names)}
            rows.append(dict(analyser=analyser, weight=weight, routed_right=round(float((chosen == labels).mean()), 4),
                             below_100=({n: v for n, v in per_task_share.items() if v < 1.0})))
            print(f"{analyser:26s} weight {weight:6.2f}: {rows[-1]['routed_right']:.3f} {rows[-1]['below_100']}")
    out = Path(__file__).resolve().parent / "results" / "lexical_tuning.json"
    out.write_text(json.dumps(dict(benchmark="tune_lexical", split="train", per_task=per_task, machine=machine(),
                                   rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})
