"""What each router costs per decode step and per prefill on the example library (SmolLM2-135M-Instruct, 12
adapters on 150 modules), batch 8, CPU, all side by side in one run; and what one routing decision costs over
a synthetic library of 1,000 adapters.

    python benchmarks/router_cost.py                  # writes benchmarks/results/router_cost_cpu.json
    python benchmarks/router_cost.py decisions_only=1 # only the 1,000-adapter decision (router_decision_cpu.json)
    python benchmarks/router_cost.py routers=default repeats=3 out=router_cost_default_cpu.json   # a subset

decode step = (time of generate(17 new tokens) - time of generate(1 new token)) / 16; prefill =
generate(1 new token); every measurement runs in turn each round, medians of 5 rounds (compose_forward.py).
Targets (routing issues): the default router's decode step at most 1.2x a fixed routing's (`fixed`: one
adapter per prompt, assigned by hand); one routing decision over 1,000 adapters at most 20 ms per prompt.

The decision benchmark binds the routers to a synthetic library with SmolLM2's 150 adapted modules (r = 4 on
q/k/v/o/down_proj, random factors' SVDs), one random description per adapter, the real sentence encoder,
and times what the router computes for one prompt of 16 user tokens given the probe pass's hidden states
(random; the cost does not depend on their values). The probe pass itself is one base-model forward of the
prompt, the same for any library size; it is timed beside it (`probe_forward_ms`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import median_high

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_forward import interleaved_times  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from machine import machine  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.models import load_smollm2  # noqa: E402
from adaptermix.suite import suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS, WORDS, chat_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

ROUTERS = {
    "base": None,
    "fixed": lambda: am.PerSequenceRouter(),
    "arrow_top2": lambda: am.ArrowRouter(top_k=2),
    "retrieval": lambda: am.RetrievalRouter(top_k=1),
    "retrieval_lexical": lambda: am.RetrievalRouter(top_k=1, lexical_weight=1.0),
    "token_level": lambda: am.TokenLevelRouter(top_k=1),
    "seq_subspace": lambda: am.SequenceArrowRouter(top_k=1, score="subspace", aggregate="global", calibrate=True),
    "hybrid": lambda: am.SequenceArrowRouter(top_k=1, score="subspace", aggregate="global", calibrate=True,
                                             retrieval_weight=2.0),
    "hybrid_lexical": lambda: am.SequenceArrowRouter(top_k=1, score="subspace", aggregate="global", calibrate=True,
                                                     retrieval_weight=2.0, lexical_weight=1.0),
    "default": lambda: am.HybridRouter(**DEFAULT),
}
DEFAULT_CONFIG = ROOT / "conf" / "router" / "hybrid_confidence.yaml"     # the default router (conf/demo.yaml)
DEFAULT = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG)).items() if k != "_target_"}


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


def main(repeats: int = 5, routers: str = ",".join(ROUTERS), out: str = "router_cost_cpu.json"):
    """routers: a comma-separated subset of ROUTERS (fixed and arrow_top2 are always run: the ratios' bases)."""
    torch.set_grad_enabled(False)
    library = suite_library()
    prompts = [TASKS[name].examples("train", 1)[0][0] for name in SUITE[:8]]
    chosen = {name: ROUTERS[name] for name in ROUTERS if name in set(routers.split(",")) | {"fixed", "arrow_top2"}}
    methods = {}
    for name, make in chosen.items():
        model, tokenizer = load_smollm2()
        model.eval()
        if make is not None:
            router = make()
            model = am.compose(model, library, router, adapters=list(SUITE), tokenizer=tokenizer, trace=False)
            if name == "fixed":
                router.assign(list(SUITE[:len(prompts)]))
        for n in (1, 17):
            methods[f"{name}/{n}"] = generation(model, tokenizer, prompts, n, make is not None)
    times = {name: median_high(t) for name, t in interleaved_times(methods, repeats).items()}   # warms up first
    rows = {}
    for name in chosen:
        prefill, full = times[f"{name}/1"], times[f"{name}/17"]
        rows[name] = {"prefill_s": round(prefill, 4), "decode_step_s": round((full - prefill) / 16, 5)}
        print(name, rows[name], flush=True)
    arrow, fixed = rows["arrow_top2"]["decode_step_s"], rows["fixed"]["decode_step_s"]
    for row in rows.values():
        row["decode_vs_arrow"] = round(row["decode_step_s"] / arrow, 3)
        row["decode_vs_fixed"] = round(row["decode_step_s"] / fixed, 3)
    result = {"benchmark": "router_cost", "machine": machine(), "batch": 8, "adapters": len(SUITE),
              "repeats": repeats, "default_router": DEFAULT, "rows": rows}
    path = Path(__file__).resolve().parent / "results" / out
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


class SyntheticLibrary:
    """What a router's bind() reads from a library, for n random adapters on SmolLM2's modules."""

    def __init__(self, n: int, modules: dict[str, int], rank: int = 4, seed: int = 0):
        from adaptermix.library import default_encoder
        from adaptermix.library.derived import adapter_texts

        generator = torch.Generator().manual_seed(seed)
        self.names = [f"adapter_{i:04d}" for i in range(n)]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.factors = {m: (torch.linalg.qr(torch.randn(n, d_in, rank, generator=generator)).Q.transpose(1, 2),
                            torch.rand(n, rank, generator=generator).sort(dim=1, descending=True).values)
                        for m, d_in in modules.items()}                                      # (n, r, d_in), (n, r)
        rng = __import__("random").Random(seed)
        self.descriptions = {name: " ".join(rng.sample(WORDS, 6)) for name in self.names}
        self.encoder = default_encoder()
        self.vectors = self.encoder.encode(["\n".join(adapter_texts(n, d, [])) for n, d in self.descriptions.items()])

    def prototypes(self, name, modules=None):
        i = self.index[name]
        return {m: (vectors[i], values[i]) for m, (vectors, values) in self.factors.items()}

    def record(self, name):
        from types import SimpleNamespace
        return SimpleNamespace(name=name, description=self.descriptions[name], examples=())

    def text_embeddings(self, names):
        return list(names), self.vectors[[self.index[n] for n in names]]


def per_module_scores(router, hidden: dict, context) -> torch.Tensor:
    """The probe scoring before it was batched (one module at a time): the reference the batched path is timed
    against (tests/test_router_fast_path.py checks they agree)."""
    total = 0
    for module, x in hidden.items():
        per_sequence = router._sequence_scores(module, x, context)
        finite = torch.isfinite(per_sequence)
        centred = per_sequence - per_sequence.where(finite, 0).sum(1, keepdim=True) / finite.sum(1, keepdim=True)
        spread = centred.where(finite, 0).pow(2).sum(1, keepdim=True).div(finite.sum(1, keepdim=True)).sqrt()
        total = total + torch.where(finite, centred / spread.clamp_min(1e-6), 0.0)
    return router._choose(total / len(hidden), context)


def decision_times(n: int = 1000, user_tokens: int = 16, repeats: int = 20) -> dict:
    """Median ms of one routing decision (one prompt) over n synthetic adapters, per router, every router in
    turn each round; the default router's parts (retrieval's encoder + TF-IDF, the batched weight scores) and
    the per-module scoring it replaced timed beside it."""
    import time

    from adaptermix.routers.routing import RoutingContext

    model, tokenizer = load_smollm2()
    modules = {name: module.in_features for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")}
    library = SyntheticLibrary(n, modules)
    available = {m: torch.ones(n, dtype=torch.bool) for m in modules}
    prompt = "Could you express the date 2021-03-09 in the form day/month/year?"
    hidden = {m: torch.randn(user_tokens, d) for m, d in modules.items()}
    retrieval = am.RetrievalRouter(top_k=1, lexical_weight=1.0)
    retrieval.bind(library, library.names, available)
    default = am.HybridRouter(**DEFAULT)              # one binding (1.8 GB of stacked directions at n = 1000)
    default.bind(library, library.names, available)
    default.stats = {m: (torch.zeros(d), torch.zeros(n), torch.ones(n)) for m, d in modules.items()}

    def context():
        return RoutingContext(batch_size=1, seq_len=user_tokens, past_len=0,
                              sequence_ids=torch.zeros(user_tokens, dtype=torch.long),
                              input_ids=torch.zeros(1, user_tokens, dtype=torch.long), prompts=[prompt])

    def decide(candidates):
        """The default router's decision, with retrieval proposing `candidates` adapters (None: all scored)."""
        def run():
            default.candidates = candidates
            ctx = context()
            default.begin_probe(ctx.state, "route")
            for module, x in hidden.items():
                default.observe(module, x, ctx)
            default.end_probe(ctx)
        return run

    calls = {"retrieval_lexical": lambda: retrieval.routing_for_texts([prompt]), "default": decide(None),
             "default_candidates16": decide(16), "default_candidates32": decide(32),
             "default/retrieval_signals": lambda: default._similarity([prompt]),        # encoder + TF-IDF
             "default/per_module_reference": lambda: (setattr(default, "candidates", None),
                                                      per_module_scores(default, hidden, context()))}
    times = {name: [] for name in calls}
    for round_ in range(repeats + 2):
        for name, call in calls.items():
            if name == "default/per_module_reference" and round_ >= 7:        # slow: 5 timed rounds are enough
                continue
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    results = {name: round(1000 * median_high(t[2:]), 2) for name, t in times.items()}
    inputs = tokenizer([chat_prompt(tokenizer, prompt)], return_tensors="pt", add_special_tokens=False)
    forward = []
    with torch.no_grad():
        for _ in range(7):
            start = time.perf_counter()
            model(**inputs)
            forward.append(time.perf_counter() - start)
    return {"adapters": n, "user_tokens": user_tokens, "modules": len(modules), "decision_ms": results,
            "probe_forward_ms": round(1000 * median_high(forward[2:]), 2), "threads": torch.get_num_threads(),
            "machine": machine(), "default_router": DEFAULT}


if __name__ == "__main__":
    arguments = {k: (v if k in ("routers", "out") else int(v)) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
    torch.set_grad_enabled(False)
    decisions = decision_times()
    print(json.dumps(decisions, indent=2))
    path = Path(__file__).resolve().parent / "results" / "router_decision_cpu.json"
    path.write_text(json.dumps(decisions, indent=2) + "\n")
    if not arguments.pop("decisions_only", 0):
        main(**arguments)
