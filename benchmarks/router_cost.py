"""What each router costs per decode step and per prefill on the example library (SmolLM2-135M-Instruct, 12
adapters on 150 modules), batch 8, CPU, all side by side in one run.

    python benchmarks/router_cost.py          # writes benchmarks/results/router_cost_cpu.json

decode step = (time of generate(17 new tokens) - time of generate(1 new token)) / 16; prefill =
generate(1 new token); every measurement runs in turn each round, medians of 5 rounds (compose_forward.py).
Target (routing-quality issue): the chosen router's decode step at most 1.2x plain Arrow's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import median_high

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_forward import interleaved_times  # noqa: E402
from machine import machine  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.suite import suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, chat_prompt  # noqa: E402

ROUTERS = {
    "base": None,
    "arrow_top2": lambda: am.ArrowRouter(top_k=2),
    "retrieval": lambda: am.RetrievalRouter(top_k=1),
    "retrieval_lexical": lambda: am.RetrievalRouter(top_k=1, lexical_weight=1.0),
    "token_level": lambda: am.TokenLevelRouter(top_k=1),
    "seq_subspace": lambda: am.SequenceArrowRouter(top_k=1, score="subspace", aggregate="global", calibrate=True),
    "hybrid": lambda: am.SequenceArrowRouter(top_k=1, score="subspace", aggregate="global", calibrate=True,
                                             retrieval_weight=2.0),
    "hybrid_lexical": lambda: am.SequenceArrowRouter(top_k=1, score="subspace", aggregate="global", calibrate=True,
                                                     retrieval_weight=2.0, lexical_weight=1.0),
}


def generation(model, tokenizer, prompts, new_tokens: int, text_router: bool):
    """generate() of exactly new_tokens tokens (no early stop) for the batch of prompts."""
    tokenizer.padding_side = "left"
    inputs = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                       add_special_tokens=False)

    def call():
        if text_router:
            am.set_prompts(model, prompts)
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    return call


def main(repeats: int = 5):
    torch.set_grad_enabled(False)
    library = suite_library()
    prompts = [TASKS[name].examples("train", 1)[0][0] for name in SUITE[:8]]
    methods = {}
    for name, make in ROUTERS.items():
        model, tokenizer = load_smollm2()
        model.eval()
        if make is not None:
            model = am.compose(model, library, make(), adapters=list(SUITE), tokenizer=tokenizer, trace=False)
        for n in (1, 17):
            methods[f"{name}/{n}"] = generation(model, tokenizer, prompts, n, make is not None)
    times = {name: median_high(t) for name, t in interleaved_times(methods, repeats).items()}   # warms up first
    rows = {}
    for name in ROUTERS:
        prefill, full = times[f"{name}/1"], times[f"{name}/17"]
        rows[name] = {"prefill_s": round(prefill, 4), "decode_step_s": round((full - prefill) / 16, 5)}
        print(name, rows[name], flush=True)
    arrow = rows["arrow_top2"]["decode_step_s"]
    for row in rows.values():
        row["decode_vs_arrow"] = round(row["decode_step_s"] / arrow, 3)
    result = {"benchmark": "router_cost", "machine": machine(), "batch": 8, "adapters": len(SUITE),
              "repeats": repeats, "rows": rows}
    path = Path(__file__).resolve().parent / "results" / "router_cost_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})
