"""Scratch memory of the LoRA-mixture op: the peak of what one call allocates besides its result, over a grid
of tokens T, adapters N and slots k, and whether it grows the ways the issue forbids.

    python benchmarks/kernel_memory.py               # CPU: fp32, d = 576, r = 8 (torch profiler's memory events)
    python benchmarks/kernel_memory.py device=cuda   # GPU: bf16, d = 4096, r = 16 (torch.cuda.max_memory_allocated)

Issue 3's memory target: nothing allocated in proportion to N·T, nor to T·k·d_out beyond the output itself.
Each method's peak scratch S(T, N, k) is measured (forward: lora_mixture(..., out=y) into a y allocated
beforehand, so everything it allocates is scratch; backward: torch.autograd.grad of a base= call, less its
results dx and d(weights)), then two mixed differences isolate the forbidden terms:

    per token·adapter = [S(T1, N1) - S(T1, N0) - S(T0, N1) + S(T0, N0)] / ((T1 - T0)(N1 - N0))     at k = 2
    per token·slot    = [S(T1, k1) - S(T1, k0) - S(T0, k1) + S(T0, k0)] / ((T1 - T0)(k1 - k0))     at N = N1

in bytes, with T0, T1 the two largest token counts (both >= every N: the prefill regime; with fewer tokens
than adapters, bounded per-adapter padding, such as the grouped GEMM's min(N, T) partial blocks, would read
as a T·N term) and N0, N1 / k0, k1 the smallest and largest. Terms in T alone (output-sized buffers), N
alone (factor stacks, per-adapter counts) or T·k·r (rank activations, indices) leave the first at 0 and the
second at a few float32 rank vectors (r·4 bytes each); a (T, N) mask of bools puts the first at >= 1 byte,
a (T, k, d_out) buffer in a 16-bit dtype the second at >= 2·d_out bytes. A method meets the target when
the first is below 1 byte and the second below d·itemsize / 2 (half an output row per token·slot: no
(T, k, d) buffer of a 16- or 32-bit dtype hides under that, while up to d / (2·r) rank vectors fit).
`max_scratch_over_result` is the largest scratch at the largest T, in output sizes (T·d_out·itemsize).
The contrast methods show the measure can fail: dense_two_gemm (x @ A_cat.T, a (T, N·r) product: N·T) and
gather_einsum (the factors gathered per (token, slot): (T, k, r, d), what the issue bans from the torch path).

On the CPU the profiler sees what torch's allocator hands out; buffers that MKL or the cpu backend's native
kernel allocate themselves are not seen: the native kernel's are (2N + 1) int64 per thread and T·k int64
(its counting sort), by construction (kernels/cpu_mixture.cpp).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

try:
    from tqdm import tqdm
except ImportError:          # a lent GPU machine runs this with its own python3 (benchmarks/gpu_check.sh)
    def tqdm(iterable, **_):
        return iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_mixture import problem  # noqa: E402
from machine import machine  # noqa: E402

from adaptermix.kernels import configs, lora_mixture  # noqa: E402

GRIDS = {
    "cpu": dict(dtype=torch.float32, d=576, r=8, tokens=(64, 1024, 4096), adapters=(4, 64, 512), slots=(1, 2, 8),
                sequences=16),
    "cuda": dict(dtype=torch.bfloat16, d=4096, r=16, tokens=(256, 1024, 8192), adapters=(4, 128, 1024),
                 slots=(1, 2, 8), sequences=32),
}


def cpu_peak_bytes(fn) -> int:
    """Peak bytes live during fn() beyond those live before it, from the profiler's allocation events."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def forward_methods(x, A, B, scales, idx, weights, device):
    """name -> fn() returning the result it allocates (None when it writes into y allocated beforehand)."""
    T, d_out = x.shape[0], B.shape[1]
    N, r = A.shape[0], A.shape[1]
    y = torch.zeros(T, d_out, dtype=x.dtype, device=device)

    def ours(backend, torch_pin=None, triton_pin=None):
        def run():
            with configs.pin_torch_strategy(torch_pin), configs.pin_triton_strategy(triton_pin):
                lora_mixture(x, A, B, scales, idx, weights, out=y, backend=backend, validate=False)
        return run

    def dense_two_gemm():
        gate = torch.zeros(T, N, device=device, dtype=torch.float32).scatter_add_(1, idx, weights.float())
        gate = (gate * scales[None, :]).to(x.dtype).repeat_interleave(r, dim=1)              # (T, N·r)
        return ((x @ A.reshape(N * r, -1).T) * gate) @ B.permute(0, 2, 1).reshape(N * r, -1)

    def gather_einsum():
        coef = (weights * scales[idx]).to(x.dtype)                                           # (T, k)
        h = torch.einsum("td,tkrd->tkr", x, A[idx]) * coef[:, :, None]
        return torch.einsum("tkr,tkor->to", h, B[idx])

    methods = {"ours[auto]": ours("auto"), "ours[torch]": ours("torch")}
    for pin in ("sparse", "sorted") if device == "cpu" else ("sorted",):      # the sparse pass is CPU-only
        methods[f"ours[torch:{pin}]"] = ours("torch", torch_pin=pin)
    if device != "cpu":
        fused, cluster = configs.fused_fits(N * r), configs.cluster_fits(N, r)
        for pin in ["plan"] + ["fused"] * fused + ["cluster"] * cluster + ["bgmv"] * (T <= 1024):
            methods[f"ours[triton:{pin}]"] = ours("triton", triton_pin=pin)
    methods["dense_two_gemm"] = dense_two_gemm
    methods["gather_einsum"] = gather_einsum
    return methods


def backward_methods(x, A, B, scales, idx, weights, device):
    """name -> fn() running one backward (dx and d(weights)) of a forward made beforehand."""
    base = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=device)
    grad = torch.randn_like(base)
    backends = ["auto", "torch"] if device == "cpu" else ["triton", "torch"]      # auto: cpu / triton
    methods = {}
    for backend in backends:
        xg, wg = x.detach().requires_grad_(), weights.detach().requires_grad_()
        y = lora_mixture(xg, A, B, scales, idx, wg, base=base, backend=backend)
        methods[f"ours[{backend}]"] = (lambda y=y, xg=xg, wg=wg: torch.autograd.grad(y, (xg, wg), grad,
                                                                                     retain_graph=True))
    return methods


def scratch_bytes(fn, peak_bytes, phase: str, x, weights) -> int:
    """Peak bytes one call allocates less its results (warmed up first: caches, Triton compiles, MKL handles)."""
    if phase == "forward":
        with torch.no_grad():
            fn()
            got = fn()
            peak = peak_bytes(fn)
        produced = 0 if got is None else got.numel() * got.element_size()
    else:
        fn()
        peak = peak_bytes(fn)
        produced = x.numel() * x.element_size() + weights.numel() * weights.element_size()
    return max(peak - produced, 0)


def mixed_difference(S: dict, a: tuple, b: tuple) -> float | None:
    """[S(a1, b1) - S(a1, b0) - S(a0, b1) + S(a0, b0)] / ((a1 - a0)(b1 - b0)); None if a corner is missing."""
    (a0, a1), (b0, b1) = a, b
    corners = [(a1, b1), (a1, b0), (a0, b1), (a0, b0)]
    if any(c not in S for c in corners):
        return None
    value = S[corners[0]] - S[corners[1]] - S[corners[2]] + S[corners[3]]
    return value / ((a1 - a0) * (b1 - b0))


def summarize(rows, grid) -> list[dict]:
    """Per (method, phase): the two mixed differences, the largest scratch / result bytes, and the verdict."""
    T0, T1 = grid["tokens"][-2:]
    N0, N1 = grid["adapters"][0], grid["adapters"][-1]
    k0, k1 = grid["slots"][0], grid["slots"][-1]
    itemsize = torch.empty((), dtype=grid["dtype"]).element_size()
    slot_limit = grid["d"] * itemsize / 2
    out = []
    for method, phase in dict.fromkeys((r["method"], r["phase"]) for r in rows):
        mine = [r for r in rows if r["method"] == method and r["phase"] == phase and r["case"] == "topk"
                and "error" not in r]
        by_tn = {(r["T"], r["N"]): r["scratch_bytes"] for r in mine if r["k"] == 2}
        by_tk = {(r["T"], r["k"]): r["scratch_bytes"] for r in mine if r["N"] == N1}
        per_adapter = mixed_difference(by_tn, (T0, T1), (N0, N1))
        per_slot = mixed_difference(by_tk, (T0, T1), (k0, k1))
        row = dict(method=method, phase=phase,
                   bytes_per_token_adapter=None if per_adapter is None else round(per_adapter, 3),
                   bytes_per_token_slot=None if per_slot is None else round(per_slot, 1),
                   rank_vectors_per_token_slot=None if per_slot is None else round(per_slot / (4 * grid["r"]), 2),
                   limit_per_token_adapter=1.0, limit_per_token_slot=slot_limit,
                   max_scratch_over_result=max((r["scratch_over_result"] for r in mine if r["T"] == T1),
                                               default=None),
                   errors=sum("error" in r for r in rows if r["method"] == method and r["phase"] == phase))
        if row["errors"]:
            row["met"] = False
        elif per_adapter is not None and per_slot is not None:
            row["met"] = per_adapter < 1.0 and per_slot < slot_limit
        out.append(row)
    return out


def main(device: str = "cpu", out: str | None = None):
    kind = "cuda" if device.startswith("cuda") else "cpu"
    grid = GRIDS[kind]
    peak_bytes = cuda_peak_bytes if kind == "cuda" else cpu_peak_bytes
    torch.manual_seed(0)
    cases = [("topk", T, N, k) for T in grid["tokens"] for N in grid["adapters"] for k in grid["slots"] if k <= N]
    cases += [("per_sequence", T, N, 1) for T in grid["tokens"] for N in grid["adapters"]]
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / f"kernel_memory_{kind}.json"
    rows = []

    def write(complete: bool) -> dict:
        """The JSON so far: rewritten after every case, so a run cut short by a device lease keeps its rows."""
        summary = summarize(rows, grid) if complete else []
        ours_met = all(s.get("met", True) for s in summary if s["method"].startswith("ours")) if complete else None
        result = dict(benchmark="kernel_memory", device=device, machine=machine(), threads=torch.get_num_threads(),
                      dtype=str(grid["dtype"]).replace("torch.", ""), d=grid["d"], r=grid["r"],
                      tokens=grid["tokens"], adapters=grid["adapters"], slots=grid["slots"], complete=complete,
                      ours_met=ours_met, summary=summary, rows=rows)
        path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    for case, T, N, k in tqdm(cases, desc="kernel_memory"):
        cfg = dict(grid, k=k)
        x, _, A, B, scales, idx, weights = problem(T, N, cfg, device, per_sequence=case == "per_sequence")
        result_bytes = T * B.shape[1] * x.element_size()
        for phase in ("forward", "backward"):
            if phase == "forward":
                with torch.no_grad():
                    methods = forward_methods(x, A, B, scales, idx, weights, device)
            else:
                methods = backward_methods(x, A, B, scales, idx, weights, device)
            for name, fn in methods.items():
                row = dict(case=case, T=T, N=N, k=k, phase=phase, method=name, result_bytes=result_bytes)
                try:
                    scratch = scratch_bytes(fn, peak_bytes, phase, x, weights)
                except Exception as error:      # noqa: BLE001 (a pinned strategy a device refuses: recorded)
                    rows.append(dict(row, error=f"{type(error).__name__}: {error}"[:300]))
                    continue
                rows.append(dict(row, scratch_bytes=scratch, scratch_over_result=round(scratch / result_bytes, 3)))
            del methods
        write(complete=False)
    result = write(complete=True)
    print(table(result["summary"]))
    print(f"wrote {path}")
    return result


def table(summary) -> str:
    lines = ["| method | phase | bytes per token·adapter (< 1) | bytes per token·slot (< d·itemsize / 2) | "
             "fp32 rank vectors per token·slot | max scratch / output, largest T | met |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        met = {True: "yes", False: "**no**"}.get(s.get("met"), "")
        lines.append(f"| {s['method']} | {s['phase']} | {s['bytes_per_token_adapter']} | "
                     f"{s['bytes_per_token_slot']} | {s['rank_vectors_per_token_slot']} | "
                     f"{s['max_scratch_over_result']} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    sys.exit(0 if main(device=args.get("device", "cpu"), out=args.get("out"))["ours_met"] else 1)
