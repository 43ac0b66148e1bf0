"""The LoRA-mixture layer's backward (adapters frozen: dx and d(weights), what training a router needs),
side by side in one run, on the CPU shapes of benchmarks/kernel_mixture.py.

Every number is a ratio: (base backward + mixture backward) time / base backward time, the base backward
being dx = dy @ W. Methods run in turn each round; a ratio is taken within each round and the median over
rounds is kept. Before timing, every method's dx and d(weights) are checked against autograd through the
float64 definition (the script exits 1 if one is wrong).
  ours[cpu]            the cpu backend's backward (native kernels)
  ours[torch:sparse]   the torch backend's sparse pass (sampled products on the CSR routing, dx as an embedding bag)
  ours[torch:sorted]   the torch backend's per-slot sorted backward (what it ran on a CPU before the sparse pass)
  reference            autograd through the float definition

    python benchmarks/kernel_backward.py [out=path] [threads=n]     (default: torch's threads, every core)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptermix.kernels import configs, lora_mixture_reference  # noqa: E402
from adaptermix.kernels.mixture import mixture_backward  # noqa: E402
from kernel_mixture import SHAPES, TOLERANCE, interleaved_ms, median, problem, set_threads  # noqa: E402
from machine import machine  # noqa: E402


def methods(x, W, A, B, scales, idx, weights, grad) -> dict:
    ranks = torch.full((A.shape[0],), A.shape[1], dtype=torch.int32)

    def ours(backend, pin=None):
        def run():
            dx = grad @ W
            with configs.pin_torch_strategy(pin):
                mix_dx, dweights = mixture_backward(grad, x, A, B, scales, idx, weights, ranks, backend, True, True)
            return dx + mix_dx, dweights
        return run

    def reference():
        x_, w_ = x.detach().requires_grad_(), weights.detach().requires_grad_()
        y = lora_mixture_reference(x_, A, B, scales, idx, w_, base=x_ @ W.T)
        return torch.autograd.grad(y, (x_, w_), grad)

    return {"base": lambda: grad @ W, "ours[cpu]": ours("cpu"), "ours[torch:sparse]": ours("torch", "sparse"),
            "ours[torch:sorted]": ours("torch", "sorted"), "reference": reference}


def check(found: dict, x, W, A, B, scales, idx, weights, grad) -> dict[str, float]:
    """Largest relative error of dx and d(weights) per method against autograd in float64."""
    x64, w64 = x.double().requires_grad_(), weights.double().requires_grad_()
    y = lora_mixture_reference(x64, A.double(), B.double(), scales.double(), idx, w64, base=x64 @ W.double().T)
    expected = torch.autograd.grad(y, (x64, w64), grad.double())
    errors = {}
    for name, fn in found.items():
        if name != "base":
            errors[name] = max(float((got.double() - want).abs().max() / want.abs().max())
                               for got, want in zip(fn(), expected))
    return errors


def main(out: str | None = None, threads: str | None = None) -> dict:
    cfg = SHAPES["cpu"]
    suffix = set_threads(threads)
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / f"kernel_backward_cpu{suffix}.json"
    rows, wrong = [], 0
    for per_sequence in (False, True):
        for T in cfg["tokens"]:
            for N in cfg["adapters"]:
                x, W, A, B, scales, idx, weights = problem(T, N, cfg, "cpu", per_sequence)
                grad = torch.randn(T, cfg["d"], generator=torch.Generator().manual_seed(1))
                found = methods(x, W, A, B, scales, idx, weights, grad)
                errors = check(found, x, W, A, B, scales, idx, weights, grad)
                samples = interleaved_ms(found, cfg["min_run_time"])
                case = "per_sequence" if per_sequence else f"top{cfg['k']}"
                for name, values in samples.items():
                    row = dict(case=case, T=T, N=N, method=name, ms=round(median(values), 4),
                               ratio=round(median(v / b for v, b in zip(values, samples["base"])), 3))
                    if name in errors:
                        row.update(max_rel_error=float(f"{errors[name]:.3g}"),
                                   correct=errors[name] <= TOLERANCE[cfg["dtype"]])
                        wrong += not row["correct"]
                    rows.append(row)
                print(f"{case:12s} T={T:5d} N={N:3d}  base={median(samples['base']):.3f}ms  " + "  ".join(
                    f"{r['method']}={r['ratio']:.2f}x" + ("" if r.get("correct", True) else "(WRONG)")
                    for r in rows[-len(samples):] if r["method"] != "base"), flush=True)
    result = dict(benchmark="kernel_backward", device="cpu", machine=machine(), threads=torch.get_num_threads(),
                  dtype="float32", d=cfg["d"], r=cfg["r"], k=cfg["k"], wrong_outputs=wrong, rows=rows)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    sys.exit(1 if main(out=args.get("out"), threads=args.get("threads"))["wrong_outputs"] else 0)
