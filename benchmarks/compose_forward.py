"""A composed SmolLM2-135M-Instruct forward pass against the base model's, side by side in one run.

16 random rank-8 LoRA adapters on every attention and MLP linear (q, k, v, o, gate, up, down; 30 layers),
a batch of 8 x 128 tokens, no grad. The methods run in turn each round; a ratio to the base forward is taken
within each round and the median over rounds kept (seconds: medians over rounds). Methods:
  ours_arrow_top2       adaptermix.compose(..., ArrowRouter(top_k=2)) (backend 'auto': the cpu kernels on a CPU)
  ours_arrow_top2[torch]  the same with backend="torch" (T = 1024, 16 rank-8 adapters: its sparse pass)
  ours_arrow_top2[torch:dense]  the same with the torch backend's dense path pinned (what it ran before)
  ours_per_sequence     adaptermix.compose(..., PerSequenceRouter()), one adapter per sequence
  ours_per_sequence[torch]  the same with backend="torch" (its runs pass: each sequence's rows as they lie)
  peft_arrow_top2       peft.create_arrow_model (dense einsum over all 16 adapters)
  peft_mixed_batch      PeftModel with the 16 adapters, adapter_names= one per sequence
Target (issue 4): ours_arrow_top2 <= 1.5x on CPU. Writes benchmarks/results/compose_forward_<device>.json.

    python benchmarks/compose_forward.py [device=cpu] [adapters=16] [repeats=5]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median_high as median

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptermix as am  # noqa: E402
from adaptermix.kernels import configs  # noqa: E402
from adaptermix.models import load_smollm2, smollm2_path  # noqa: E402
from machine import machine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def interleaved_times(methods: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each method in each round, the methods run in turn each round (a shared machine
    drifts: timing one method after another would fold the drift into their ratios)."""
    for fn in methods.values():
        fn()                                                     # warm up
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def write_checkpoints(base, folder: Path, count: int, rank: int = 8) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    paths = []
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                            init_lora_weights=False))
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        model.save_pretrained(folder / f"task{i:02d}")
        paths.append(folder / f"task{i:02d}")
    model.unload()
    return paths


def main(device: str = "cpu", adapters: int = 16, repeats: int = 5, out: str | None = None) -> dict:
    from peft import ArrowConfig, PeftModel, create_arrow_model

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    base, tokenizer = load_smollm2()
    path = str(smollm2_path())
    work = Path(tempfile.mkdtemp(prefix="am-compose-"))
    checkpoints = write_checkpoints(load_smollm2()[0], work / "ckpt", adapters)
    library = am.AdapterLibrary.create(work / "lib", base_model=path)
    library.add_many(checkpoints)
    names = library.names()
    inputs = torch.randint(0, tokenizer.vocab_size, (8, 128), device=device)
    base = base.to(device)
    methods = {"base": lambda: base(inputs)}

    ours = am.compose(load_smollm2()[0].to(device), library, am.ArrowRouter(top_k=2), trace=False)
    methods["ours_arrow_top2"] = lambda: ours(inputs)
    ours_torch = am.compose(load_smollm2()[0].to(device), library, am.ArrowRouter(top_k=2), trace=False,
                            backend="torch")
    methods["ours_arrow_top2[torch]"] = lambda: ours_torch(inputs)

    def ours_torch_dense():
        with configs.pin_torch_strategy("dense"):
            return ours_torch(inputs)
    methods["ours_arrow_top2[torch:dense]"] = ours_torch_dense
    router = am.PerSequenceRouter()
    per_sequence = am.compose(load_smollm2()[0].to(device), library, router, trace=False)
    router.assign(names[:8])
    methods["ours_per_sequence"] = lambda: per_sequence(inputs)
    router_torch = am.PerSequenceRouter()
    per_sequence_torch = am.compose(load_smollm2()[0].to(device), library, router_torch, trace=False,
                                    backend="torch")
    router_torch.assign(names[:8])
    methods["ours_per_sequence[torch]"] = lambda: per_sequence_torch(inputs)

    peft_arrow = create_arrow_model(load_smollm2()[0], [str(c) for c in checkpoints],
                                    ArrowConfig(top_k=2, router_temperature=1.0)).to(device).eval()
    methods["peft_arrow_top2"] = lambda: peft_arrow(inputs)
    mixed = PeftModel.from_pretrained(load_smollm2()[0], str(checkpoints[0]), adapter_name=names[0])
    for name, checkpoint in zip(names[1:], checkpoints[1:]):
        mixed.load_adapter(str(checkpoint), adapter_name=name)
    mixed = mixed.to(device).eval()
    methods["peft_mixed_batch"] = lambda: mixed(inputs, adapter_names=names[:8])
    times = interleaved_times(methods, repeats)

    # the ratio within each round, then the median over rounds: drift of the machine cancels round by round
    result = {"benchmark": "compose_forward", "model": "SmolLM2-135M-Instruct", "device": device,
              "machine": machine(), "batch": list(inputs.shape), "adapters": adapters, "rank": 8,
              "targets": TARGETS, "seconds": {k: round(median(v), 4) for k, v in times.items()},
              "ratio_to_base": {k: round(median(t / b for t, b in zip(v, times["base"])), 3)
                                for k, v in times.items()},
              "target": "ours_arrow_top2 <= 1.5x base on CPU"}
    result["meets_target"] = result["ratio_to_base"]["ours_arrow_top2"] <= 1.5
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / f"compose_forward_{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    main(device=args.get("device", "cpu"), adapters=int(args.get("adapters", 16)),
         repeats=int(args.get("repeats", 5)), out=args.get("out"))
