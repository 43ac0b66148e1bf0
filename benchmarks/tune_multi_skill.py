"""Choose the `multi_skill` settings on the composites' train split only (adaptermix.multi_skill; never the
held-out prompts): the weight of each adapter in a fused pair, and one per-token mixing router (and one
sequence-level top-k mix) from a small grid, by exact match. Writes benchmarks/results/multi_skill_tuning.json;
the chosen settings are copied into conf/evaluate.yaml (the per-token pick into mixing_routers, where it was
token_level's own setting; seq_mix_tuned; multi_skill.pair_weight).

    python benchmarks/tune_multi_skill.py                 # 6 train prompts per composite
    python benchmarks/tune_multi_skill.py per_composite=2 # quicker
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_multi_skill import run_multi_skill  # noqa: E402
from machine import machine  # noqa: E402

from adaptermix.cli import load_config  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.suite import suite_library  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PER_TOKEN = {f"arrow_k{k}_t{t:g}": {"router": "arrow", "top_k": k, "temperature": t}
             for k, t in ((1, 1.0), (2, 0.1), (2, 0.5), (2, 1.0), (2, 2.0), (3, 1.0))}
PER_TOKEN.update({f"token_k{k}_e{e}_t{t:g}": {"router": "token_level", "top_k": k, "every": e, "temperature": t}
                  for k, e, t in ((1, 2, 0.05), (2, 1, 0.05), (2, 1, 0.2), (2, 2, 0.2), (2, 1, 1.0))})
SEQUENCE_MIX = {f"seq_k2_t{t:g}": {"router": "sequence", "top_k": 2, "temperature": t, "score": "subspace",
                                   "aggregate": "global", "calibrate": True} for t in (0.1, 0.5, 2.0)}


def main(overrides: list[str]):
    per = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("per_composite=")]
    cfg = load_config([o for o in overrides if not o.startswith("per_composite=")], config_name="evaluate")
    per_composite = per[-1] if per else cfg.multi_skill.train_per_composite
    torch.manual_seed(cfg.seed)
    torch.set_grad_enabled(False)
    library, tokenizer = suite_library(cfg.library), load_smollm2()[1]
    cfg.mixing_routers = OmegaConf.create({**PER_TOKEN, **SEQUENCE_MIX})
    results = {}
    for weight in (0.5, 1.0):
        cfg.multi_skill.pair_weight = weight
        summary = {"train": {}, "seconds": {}}
        condition = OmegaConf.create({"methods": ["base", "best_single", "fused_linear", "fused_ties"]})
        run_multi_skill("train", condition, library, tokenizer, cfg, summary, split="train",
                        per_composite=per_composite)
        results.update({f"{m}_w{weight:g}" if m.startswith("fused") else m: e for m, e in summary["train"].items()})
    summary = {"train": {}, "seconds": {}}
    condition = OmegaConf.create({"methods": list(PER_TOKEN) + list(SEQUENCE_MIX)})
    run_multi_skill("train", condition, library, tokenizer, cfg, summary, split="train", per_composite=per_composite)
    results.update(summary["train"])
    # exact match first; on a tie the larger share of decisions going to the prompt's two skills, then the first
    best = lambda names: max(names, key=lambda n: (results[n]["accuracy"], results[n].get("pair_share") or 0,  # noqa: E731
                                                   -list(results).index(n)))
    chosen = {"per_token_tuned": best(PER_TOKEN), "seq_mix_tuned": best(SEQUENCE_MIX),
              "pair_weight": float(best([n for n in results if n.startswith("fused_linear")]).rsplit("_w", 1)[1])}
    info = machine()
    out = {"split": "train", "per_composite": per_composite, "machine": f"{info['cpu']}, {info['cores']} cores",
           "chosen": chosen, "settings": {**PER_TOKEN, **SEQUENCE_MIX},
           "results": {n: {"accuracy": e["accuracy"], "pair_share": e.get("pair_share"), "per_task": e["per_task"]}
                       for n, e in results.items()}}
    path = ROOT / "benchmarks" / "results" / "multi_skill_tuning.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for n, e in results.items():
        print(f"{n:24s} {e['accuracy']:.3f}  pair_share={e.get('pair_share')}")
    print("chosen:", chosen, "\nwrote", path)


if __name__ == "__main__":
    main(sys.argv[1:])
