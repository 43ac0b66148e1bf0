"""`make demo`, the main job: zero-shot routing on the example library over SmolLM2-135M-Instruct.

1. Opens the cached example library, or builds it with the `adaptermix build` command from the committed
   PEFT checkpoints in examples/suite_adapters (one LoRA per task of adaptermix.tasks.SUITE). The first
   run also converts the base model from its GGUF once (both are cached under ~/.cache/adaptermix).
2. Answers a handful of prompts with the base model, then composes the library onto it with the router of
   conf/demo.yaml (default: hybrid_confidence, the adapters' calibrated weight scores and dense + TF-IDF
   retrieval, each trusted by its margin: the best router across the conditions of docs/ROUTING.md) and
   answers again, every token routed through the LoRA-mixture kernel.
3. Prints, per prompt, the adapters chosen (share of (token, layer) decisions, and the first / middle / last
   layer's choice) and both answers; writes demo_out/routing.png (prompts x adapters).

    python examples/demo.py                          # conf/demo.yaml
    python examples/demo.py library_path=~/my-lib 'prompts=[Summarise: the meeting moved to Friday.]'
    python examples/demo.py router=arrow router.top_k=2 'prompts=[Rewrite the date 2020-01-31 as day/month/year.]'
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import adaptermix as am  # noqa: E402
from adaptermix.cli import load_config  # noqa: E402
from adaptermix.models import load_model, load_smollm2  # noqa: E402
from adaptermix.suite import generate, suite_library  # noqa: E402

def by_thirds(per_layer: torch.Tensor, names: list[str]) -> str:
    """The leading adapter of the early, middle and late thirds of the layers, for one prompt."""
    parts = []
    for label, chunk in zip(("early", "middle", "late"), per_layer.chunk(3)):
        total = chunk.sum(0)
        parts.append(f"{label} {names[int(total.argmax())]}")
    return ", ".join(parts)


def main(overrides: list[str]) -> None:
    cfg = load_config(overrides, config_name="demo")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if cfg.library_path:  # the user's own library, on its own base model
        library = am.AdapterLibrary.open(Path(cfg.library_path).expanduser())
        model, tokenizer = load_model(cfg.base_model or library.base_model.name)
    else:
        library = suite_library()
        model, tokenizer = load_model(cfg.base_model) if cfg.base_model else load_smollm2()
    model.eval()
    prompts = list(cfg.prompts)
    print(f"library: {len(library)} adapters at {library.root} ({time.perf_counter() - start:.0f} s)")

    plain = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, progress="base model")

    router_cfg = OmegaConf.to_container(cfg.router, resolve=True)
    if "min_similarity" in router_cfg and router_cfg["min_similarity"] is None:
        router_cfg["min_similarity"] = cfg.min_similarity
    router = instantiate(router_cfg)
    model = am.compose(model, library, router, tokenizer=tokenizer)
    eos = tokenizer.eos_token_id  # SmolLM2-Instruct: <|im_end|>
    seen = {}

    def remember(inputs, new):
        trace = am.routing_trace(model)
        seen.update(counts=trace.decision_counts(inputs.attention_mask, new, eos, per_layer=True), notes=trace.notes,
                    trace=trace, new=new)

    routed = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=len(prompts),
                      before_batch=lambda chunk: am.set_prompts(model, chunk), after_batch=remember,
                      progress=f"routed ({router_cfg['_target_'].rsplit('.', 1)[-1]})")
    composed_names = am.routing_trace(model).adapter_names
    per_layer = seen["counts"]                                    # (prompts, layers, N + 1)
    counts = per_layer.sum(1)
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1)
    for row, prompt in enumerate(prompts):
        top = sorted(((float(shares[row, i]), n) for i, n in enumerate(composed_names + ["none"])), reverse=True)
        summary = ", ".join(f"{n} {s:.0%}" for s, n in top[:3] if s > 0)
        print(f"\n> {prompt}\n  adapters: {summary}  (layers: {by_thirds(per_layer[row], composed_names + ['none'])})"
              f"\n  base:   {plain[row].strip()!r}\n  routed: {routed[row].strip()!r}")
    for note in seen["notes"]:
        print(f"  note: {note}")

    seen["trace"].plot_prompts(out / "routing.png", labels=prompts, generated=seen["new"], eos_id=eos)
    am.unload(model)
    print(f"\nwrote {out / 'routing.png'}; {len(library)} adapters; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
