"""The LoRA-mixture layer against the base GEMM and the formulations others use, side by side in one run.

Every number is a ratio: (base GEMM + mixture) time / base GEMM time. Each case times its methods in turn,
round after round (torch.utils.benchmark, which synchronises CUDA); a method's ratio is taken within each
round against that round's base time and the median over rounds is kept, so drift of a shared machine
cancels round by round. Before timing, every method's output is checked against the float64 definition
(max_rel_error, correct; the script exits 1 if one is wrong), and the JSON is rewritten after each case.
Methods:
  base              y = x @ W.T alone (the denominator)
  ours[cpu]         y = x @ W.T, then lora_mixture(..., out=y, backend="cpu")  (the fused native kernel)
  ours[torch]       the same with the torch backend (segmented matmuls)
  ours[triton]      the same with the Triton grouped-GEMM kernels (GPU only)
  reference         the float definition (gathers (T, k, r, d)); CPU only
  loop_masks        MixLoRA-style: for every adapter, select its tokens, two matmuls, index_add
  dense_two_gemm    all adapters concatenated: (x @ A_cat.T) * routing mask, then @ B_cat
  peft_mixed_batch  PEFT's LoRA Linear with adapter_names= (per-sequence case only)
  memory_floor      base time + (bytes a separate mixture pass must move) / measured copy bandwidth
  *[graph]          (GPU) the same captured in a CUDA graph, as a server replays decode steps; its ratio is
                    taken against base[graph]
  ours[triton:S]    (GPU) the Triton path forced to strategy S (configs.triton_strategy): plan (grouped GEMM),
                    fused (one token-major launch; N·r <= configs.FUSED_MAX_COLUMNS), cluster (tokens ordered
                    by adapter, two launches; N <= configs.CLUSTER_MAX_ADAPTERS) and bgmv (per-entry kernels;
                    T <= 1024), wherever more than one of them can run

    python benchmarks/kernel_mixture.py                 # CPU shapes, fp32
    python benchmarks/kernel_mixture.py device=cuda     # GPU shapes, bf16 (needs a CUDA GPU)
    python benchmarks/kernel_mixture.py dtype=bfloat16  # the CPU shapes in bf16 (the cpu backend sits out)
    python benchmarks/kernel_mixture.py threads=1       # on one CPU thread (default: torch's, every core)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptermix.kernels import configs, lora_mixture, lora_mixture_reference  # noqa: E402
from adaptermix.kernels.mixture import CPU_DTYPES  # noqa: E402
from machine import machine  # noqa: E402

SHAPES = {
    "cpu": dict(dtype=torch.float32, d=576, r=8, k=2, adapters=(4, 16, 64), tokens=(1024, 64), sequences=16,
                backends=("cpu", "torch"), min_run_time=0.3),
    "cuda": dict(dtype=torch.bfloat16, d=4096, r=16, k=2, adapters=(4, 8, 32, 128, 1024), tokens=(8192, 256),
                 sequences=32, backends=("torch", "triton"), min_run_time=0.3),
}
TARGETS = {"cpu": {1024: 1.3, 64: 1.8}, "cuda": {8192: 1.25, 256: 1.6}}


ROUNDS = 7


def make_timer(fn) -> Timer:
    """A Timer for fn() on all of torch's threads: torch.utils.benchmark.Timer runs single-threaded unless
    told otherwise (num_threads=1), which is not how a layer runs on a CPU (on the 2-core AMD EPYC of
    2026-12-02 the T = 1024 base GEMM takes ~4 ms on both threads, ~7.5 ms on one)."""
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def median_ms(fn, min_run_time: float) -> float:
    fn()  # warm up (Triton compiles here)
    return make_timer(fn).blocked_autorange(min_run_time=min_run_time).median * 1e3


def interleaved_ms(methods: dict, min_run_time: float, rounds: int = ROUNDS) -> dict[str, list[float]]:
    """Time per call (ms) of each method in each of `rounds` rounds; within a round the methods run in
    turn, ~min_run_time / rounds each, so a ratio taken within one round sees the machine in one state."""
    timers, numbers = {}, {}
    for name, fn in methods.items():
        fn()  # warm up (Triton compiles here)
        timers[name] = make_timer(fn)
        per_call = timers[name].timeit(3).median
        numbers[name] = max(1, int(min_run_time / rounds / max(per_call, 1e-7)))
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(numbers[name]).median * 1e3)
    return samples


def median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def check_outputs(found: dict, x, W, A, B, scales, idx, weights, rows: int = 256) -> dict[str, float]:
    """Each method's output on the first `rows` tokens against the float64 definition: max |error| / max
    |reference|. Graph replays and the reference itself are skipped."""
    want = F.linear(x[:rows].double(), W.double())
    want = lora_mixture_reference(x[:rows], A, B, scales, idx[:rows], weights[:rows], base=want, upcast=True)
    errors = {}
    for name, fn in found.items():
        if name in ("base", "reference") or "[graph]" in name:
            continue
        got = fn().reshape(x.shape[0], -1)[:rows].double()
        errors[name] = float((got - want).abs().max() / want.abs().max())
    return errors


# Largest relative error accepted per dtype (bf16 keeps 8 mantissa bits; the mixture adds to a rounded base).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def problem(T, N, cfg, device, per_sequence: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d, r, dtype = cfg["d"], cfg["r"], cfg["dtype"]
    x = torch.randn(T, d, generator=gen).to(device, dtype)
    W = (torch.randn(d, d, generator=gen) / d ** 0.5).to(device, dtype)
    A = (torch.randn(N, r, d, generator=gen) / d ** 0.5).to(device, dtype)
    # B as the composer stores it: rows (N, r, d_out), passed as the (N, d_out, r) transposed view
    B = (torch.randn(N, r, d, generator=gen) / r).to(device, dtype).transpose(1, 2)
    scales = torch.full((N,), 2.0, device=device)
    if per_sequence:
        S = cfg["sequences"]
        idx = (torch.arange(T) * S // T % N)[:, None].to(device)
        weights = torch.ones(T, 1, device=device, dtype=dtype)
    else:
        idx = torch.stack([torch.randperm(N, generator=gen)[:cfg["k"]] for _ in range(T)]).to(device)
        weights = torch.softmax(torch.randn(T, cfg["k"], generator=gen), -1).to(device, dtype)
    return x, W, A, B, scales, idx, weights


def methods(x, W, A, B, scales, idx, weights, cfg, device, per_sequence):
    N, r = A.shape[0], A.shape[1]
    T = x.shape[0]
    A_cat, B_cat = A.reshape(N * r, -1), B.permute(0, 2, 1).reshape(N * r, -1)

    def ours(backend, pin=None):
        """pin = 'fused' / 'bgmv' / 'plan' forces the Triton strategy; None lets it choose."""
        def run():
            y = F.linear(x, W)
            with configs.pin_triton_strategy(pin):
                lora_mixture(x, A, B, scales, idx, weights, out=y, backend=backend, validate=False)
            return y
        return run

    def loop_masks():
        y = F.linear(x, W)
        for e in range(N):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                coef = (weights[tok, slot] * scales[e]).to(x.dtype)[:, None]
                y.index_add_(0, tok, coef * ((x[tok] @ A[e].T) @ B[e].T))
        return y

    def dense_two_gemm():
        gate = torch.zeros(T, N, device=device, dtype=torch.float32)
        gate.scatter_add_(1, idx, weights.float())
        gate = (gate * scales[None, :]).to(x.dtype).repeat_interleave(r, dim=1)   # (T, N*r)
        return F.linear(x, W) + ((x @ A_cat.T) * gate) @ B_cat

    out = {"base": lambda: F.linear(x, W)}
    out.update({f"ours[{b}]": ours(b) for b in cfg["backends"]})
    if device == "cpu":
        out["reference"] = lambda: lora_mixture_reference(x, A, B, scales, idx, weights, base=F.linear(x, W))
    out["loop_masks"] = loop_masks
    if T * N * r <= 2 ** 28:
        out["dense_two_gemm"] = dense_two_gemm
    if per_sequence and (device == "cpu" or N <= 128):   # PEFT adds adapters one by one: minutes at N = 1024
        out["peft_mixed_batch"] = peft_mixed_batch(x, W, A, B, scales, idx, cfg)
    if device != "cpu":
        out["base[graph]"] = graphed(out["base"])
        out["ours[triton][graph]"] = graphed(ours("triton"))
        # the strategy thresholds' evidence: each strategy that can run here, forced, side by side
        fused = configs.fused_fits(N * r)
        cluster = configs.cluster_fits(N, r)
        pins = ["plan"] + ["fused"] * fused + ["cluster"] * cluster + ["bgmv"] * (T <= 1024)
        for pin in pins if len(pins) > 1 else ():
            if fused or cluster:                 # the one-launch kernels: eager too (Python costs little)
                out[f"ours[triton:{pin}]"] = ours("triton", pin)
            out[f"ours[triton:{pin}][graph]"] = graphed(ours("triton", pin))
    return out


def graphed(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, so Triton compiles outside it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peft_mixed_batch(x, W, A, B, scales, idx, cfg):
    """PEFT's own LoRA Linear holding all N adapters, called with one adapter name per sequence."""
    from peft import LoraConfig, get_peft_model

    N, r, d = A.shape
    base = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False)).to(x.device, x.dtype)
    base[0].weight.data.copy_(W)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]), adapter_name="a0")
    for e in range(1, N):
        model.add_adapter(f"a{e}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for e in range(N):
            layer.lora_A[f"a{e}"].weight.copy_(A[e])
            layer.lora_B[f"a{e}"].weight.copy_(B[e])
    S = cfg["sequences"]
    xs = x.view(S, x.shape[0] // S, d)
    names = [f"a{int(idx[s * (x.shape[0] // S), 0])}" for s in range(S)]
    return lambda: layer(xs, adapter_names=names)


def bandwidth_gb_s(device, dtype) -> float:
    src = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 0.3)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def floor_ms(x, A, idx, bandwidth):
    """A separate mixture pass must read x, each used adapter's A and B, and read + write y."""
    used = torch.unique(idx[idx >= 0]).numel()
    item = x.element_size()
    T, d = x.shape
    r = A.shape[1]
    moved = item * (T * d + 2 * T * d + used * r * 2 * d)
    return moved / (bandwidth * 1e9) * 1e3


def markdown(rows) -> str:
    """The README's table: one line per (case, T, N), one column per method, ratios to the base GEMM."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "base"]
    cases = list(dict.fromkeys((r["case"], r["T"], r["N"]) for r in rows))
    ratio = {(r["case"], r["T"], r["N"], r["method"]): r["ratio"] for r in rows}
    lines = ["| case | T | N | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for case in cases:
        cells = [f"{ratio[(*case, m)]:.2f}×" if (*case, m) in ratio else "" for m in methods]
        lines.append(f"| {case[0]} | {case[1]} | {case[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def set_threads(threads: str | None) -> str:
    """torch's CPU threads for the run (None: torch's default, every core) and the result file's suffix:
    '' at the default, '_<n>thread' otherwise."""
    if threads is None or int(threads) == torch.get_num_threads():
        return ""
    torch.set_num_threads(int(threads))
    return f"_{int(threads)}thread"


def main(device: str = "cpu", out: str | None = None, dtype: str | None = None, threads: str | None = None):
    cfg = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    suffix = set_threads(threads)
    if dtype is not None and getattr(torch, dtype) != cfg["dtype"]:   # the same shapes in another dtype
        cfg = dict(cfg, dtype=getattr(torch, dtype))
        cfg["backends"] = tuple(b for b in cfg["backends"] if b != "cpu" or cfg["dtype"] in CPU_DTYPES)
        suffix = f"_{dtype}{suffix}"
    torch.set_grad_enabled(False)
    bandwidth = bandwidth_gb_s(device, cfg["dtype"])
    target = TARGETS["cuda" if device.startswith("cuda") else "cpu"]
    path = Path(out) if out else (Path(__file__).resolve().parent / "results"
                                  / f"kernel_mixture_{device.split(':')[0]}{suffix}.json")
    rows, wrong = [], 0

    def write(complete: bool) -> dict:
        """The JSON so far: rewritten after every case, so a run cut short (a device lease's time limit)
        still leaves every case it finished."""
        checks = [dict(case=r["case"], T=r["T"], N=r["N"], method=r["method"], ratio=r["ratio"],
                       target=target[r["T"]], met=r["ratio"] <= target[r["T"]])
                  for r in rows if r["method"].startswith("ours") and ":" not in r["method"]]
        result = dict(benchmark="kernel_mixture", device=device, machine=machine(), threads=torch.get_num_threads(),
                      dtype=str(cfg["dtype"]).replace("torch.", ""), d=cfg["d"], r=cfg["r"], k=cfg["k"],
                      copy_bandwidth_gb_s=round(bandwidth, 1), complete=complete, wrong_outputs=wrong, rows=rows,
                      targets=checks)
        path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    for per_sequence in (False, True):
        for T in cfg["tokens"]:
            for N in cfg["adapters"]:
                x, W, A, B, scales, idx, weights = problem(T, N, cfg, device, per_sequence)
                found = methods(x, W, A, B, scales, idx, weights, cfg, device, per_sequence)
                errors = check_outputs(found, x, W, A, B, scales, idx, weights)
                samples = interleaved_ms(found, cfg["min_run_time"])
                case = "per_sequence" if per_sequence else f"top{cfg['k']}"
                floor = floor_ms(x, A, idx, bandwidth)
                samples["memory_floor"] = [ms + floor for ms in samples["base"]]
                for name, values in samples.items():
                    # the ratio within each round, then the median over rounds: drift cancels round by round
                    base = samples["base[graph]" if "[graph]" in name else "base"]
                    ratio = median(v / b for v, b in zip(values, base))
                    row = dict(case=case, T=T, N=N, method=name, ms=round(median(values), 4), ratio=round(ratio, 3))
                    if name in errors:
                        row["max_rel_error"] = float(f"{errors[name]:.3g}")
                        row["correct"] = errors[name] <= TOLERANCE[cfg["dtype"]]
                        wrong += not row["correct"]
                    rows.append(row)
                print(f"{case:12s} T={T:5d} N={N:5d}  base={median(samples['base']):.3f}ms  " + "  ".join(
                    f"{r['method']}={r['ratio']:.2f}x" + ("" if r.get("correct", True) else "(WRONG)")
                    for r in rows[-len(samples):] if r["method"] != "base"), flush=True)
                write(complete=False)
    result = write(complete=True)
    print(markdown(rows))
    print(f"wrote {path}")
    if wrong:
        print(f"{wrong} method(s) gave a wrong output (max_rel_error above {TOLERANCE[cfg['dtype']]}): see the JSON")
    return result


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    sys.exit(1 if main(device=args.get("device", "cpu"), out=args.get("out"), dtype=args.get("dtype"),
                       threads=args.get("threads"))["wrong_outputs"] else 0)
