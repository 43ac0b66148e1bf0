"""Search latency of a 10,000-adapter library (target: < 50 ms per search), build throughput, lazy open.

Builds a library of N small random adapters with generated, distinct descriptions through the public
`add_many`, then times, side by side in one run:
  - opening the library and listing names (no adapter file is read);
  - faiss vector search, flat (exact) and IVF, p50 / p95 over many queries, and IVF recall@10 vs flat;
  - end-to-end text search (MiniLM query encoding + faiss), p50 / p95;
  - loading one adapter.
Writes benchmarks/results/library_search_cpu.json (or a path given as out=...).

    python benchmarks/library_search.py [n=10000] [queries=300] [out=...]
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptermix as am  # noqa: E402
from machine import machine  # noqa: E402

VERBS = ["Translate", "Summarise", "Classify", "Extract", "Rewrite", "Answer questions about", "Correct",
         "Generate", "Convert", "Explain"]
OBJECTS = ["legal contracts", "medical notes", "python code", "tweets", "recipes", "chess games", "poems",
           "financial reports", "emails", "product reviews", "sql queries", "math word problems",
           "news articles", "song lyrics", "scientific abstracts", "support tickets", "movie plots",
           "weather reports", "sports results", "job adverts"]
STYLES = ["into plain English", "for children", "as bullet points", "in French", "in German", "formally",
          "in one sentence", "as JSON", "with citations", "in the style of a pirate", "for experts",
          "as a table", "politely", "in Spanish", "as a haiku", "step by step", "briefly", "with examples",
          "in Japanese", "as a checklist", "for a lawyer", "for a tweet", "with emojis", "as YAML",
          "in Italian", "in Dutch", "for a doctor", "for a teacher", "as markdown", "in Portuguese",
          "for a beginner", "concisely", "as a story", "as a dialogue", "with a title", "in Korean",
          "in Chinese", "for managers", "as a quiz", "in the passive voice", "in the first person",
          "with warnings", "as CSV", "for radio", "in Polish", "in Swedish", "in Hindi", "in Arabic",
          "as a limerick", "for an email"]


def descriptions(n: int) -> list[str]:
    combos = list(itertools.product(VERBS, OBJECTS, STYLES))
    random.Random(0).shuffle(combos)
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} distinct descriptions")
    return [f"{v} {o} {s}" for v, o, s in combos[:n]]


def adapters(spec: am.BaseModelSpec, texts: list[str]):
    gen = torch.Generator().manual_seed(0)
    modules = list(spec.modules)
    for i, text in enumerate(texts):
        rank = 1 + i % 4
        factors = {m: am.LoraModule(torch.randn(rank, spec.modules[m][1], generator=gen),
                                    torch.randn(spec.modules[m][0], rank, generator=gen), alpha=2.0 * rank)
                   for m in modules}
        yield am.LoraAdapter(f"adapter_{i:05d}", spec.name, factors, description=text)


def percentiles(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "max_ms": round(float(ms.max()), 3)}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(n: int = 10_000, queries: int = 300, out: str | None = None) -> dict:
    spec = am.BaseModelSpec("bench-base", {"layers.0.q": (64, 64), "layers.0.v": (32, 64)})
    texts = descriptions(n)
    root = Path(tempfile.mkdtemp(prefix="am-bench-")) / "lib"
    library = am.AdapterLibrary.create(root, base_model=spec)
    start = time.perf_counter()
    library.add_many(adapters(spec, texts), chunk_size=500)
    build_s = time.perf_counter() - start
    library.close()

    start = time.perf_counter()
    library = am.AdapterLibrary.open(root)
    names = library.names()
    open_s = time.perf_counter() - start
    assert len(names) == n

    rng = random.Random(1)
    query_texts = [f"{t} please" for t in rng.sample(texts, queries)]
    query_vectors = library.encoder.encode(query_texts)

    flat = library._current_index()  # built on first use, then saved
    flat_ms = [t for q in query_vectors for t in timed(lambda q=q: flat.search(q, 10), 1)]
    _, exact = flat.search(query_vectors, 10)

    ivf_handle = am.AdapterLibrary.open(root, config=am.LibraryConfig(ivf_threshold=1000, nprobe=32))
    start = time.perf_counter()
    ivf = ivf_handle._current_index()
    ivf_build_s = time.perf_counter() - start
    ivf_ms = [t for q in query_vectors for t in timed(lambda q=q: ivf.search(q, 10), 1)]
    _, approx = ivf.search(query_vectors, 10)
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))

    end_to_end = [t for q in query_texts for t in timed(lambda q=q: library.search(q, k=10), 1)]
    top1 = np.mean([library.search(q, k=1)[0].name == f"adapter_{texts.index(q[:-7]):05d}" for q in query_texts[:100]])
    get_ms = timed(lambda: library.get(names[rng.randrange(n)]), 100)

    result = {
        "benchmark": "library_search", "machine": machine(), "adapters": n, "queries": queries,
        "build": {"seconds": round(build_s, 1), "adapters_per_s": round(n / build_s, 1)},
        "open_and_list_ms": round(open_s * 1e3, 1),
        "vector_search_flat": percentiles(flat_ms),
        "vector_search_ivf": {**percentiles(ivf_ms), "nprobe": 32, "recall_at_10_vs_flat": round(recall, 4),
                              "build_seconds": round(ivf_build_s, 2)},
        "text_search_end_to_end_flat": percentiles(end_to_end),
        "text_search_top1_is_source_adapter": float(top1),
        "get_one_adapter": percentiles(get_ms),
        "target": "search < 50 ms at 10,000 adapters",
        "meets_target": percentiles(end_to_end)["p95_ms"] < 50,
    }
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / "library_search_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    main(n=int(args.get("n", 10_000)), queries=int(args.get("queries", 300)), out=args.get("out"))
