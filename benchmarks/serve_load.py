"""Load benchmark of the OpenAI-compatible server: SmolLM2-135M-Instruct with the example library, localhost.

A bounded load generator (asyncio + httpx): C clients (concurrency, default 1, 4, 16) share a fixed list of
max(min_requests, C x requests_per_client) chat requests (prompts of the example suite's test split,
round-robin over its 12 tasks, so requests route to different adapters), greedy, max_tokens 16, streamed
(time to first token = first SSE event). Rows, side by side in one run (every server a subprocess started
here and warmed up first; at each C the rows take turns, `rounds` times):
    auto      adaptermix embedded engine, model="auto": routed zero-shot, mixed adapters in each batch
    named     the same server, each request naming its task's adapter (mixed, no routing)
    single    the same server, every request on one adapter (the mixed-batch tax: auto / named vs single)
    serial    adaptermix with max_batch_size=1: one request at a time
    peft      PEFT's mixed batch (adapter_names=) behind the same HTTP layer (benchmarks/peft_engine.py),
              batch-at-a-time, routed by the same router (model="auto")
    vllm      adaptermix with engine=vllm (its own vLLM server, `make vllm`), model="auto": routed here, one LoRA
              per request in vLLM (not in the default rows: ask rows=...,vllm)
    <name>    any running OpenAI-compatible server given as url.<name>=http://host:port
ignore_eos=1 makes every answer exactly max_tokens tokens (an extension field, as vLLM's), so the rows do equal
work; otherwise answers end where the model ends them (a mismatched adapter answers longer).
Then a soak: C = 16 on the auto server for soak_s seconds, the server's RSS sampled every 5 s.
Writes benchmarks/results/<out>.json and docs/<out>.png (out=serve_load).

    nice -n 10 python benchmarks/serve_load.py [concurrency=1,4,16] [rows=auto,named,single,serial,peft]
        [soak_s=600] [threads=1] [rounds=2] [ignore_eos=0] [out=serve_load] [url.vllm=http://127.0.0.1:8001]
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402

from adaptermix.suite import ADAPTERS, suite_library  # noqa: E402
from adaptermix.tasks import SUITE, TASKS  # noqa: E402
from machine import machine  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"                # <out>.json
PLOTS = HERE.parent / "docs"              # <out>.png
SINGLE = "date_mdy"
DEFAULTS = {"concurrency": "1,4,16", "rows": "auto,named,single,serial,peft", "soak_s": "600", "threads": "1",
            "max_tokens": "16", "requests_per_client": "1", "min_requests": "4", "rounds": "2", "ignore_eos": "0",
            "out": "serve_load"}


# -- the servers -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(kind: str, library: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """This script in `server` mode in a subprocess; returns when /health answers."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = tempfile.NamedTemporaryFile(prefix=f"serve_load-{kind}-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-P", __file__, "server", f"kind={kind}", f"library={library}",
                                f"port={port}", *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {kind} server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"the {kind} server did not start in 600 s")


def serve(options: dict) -> None:
    """Server mode: the embedded engine (adaptermix serve) or PEFT's mixed batch behind the same app."""
    import uvicorn

    from adaptermix.serving.cli import build_app, load_serve_config, open_library

    kind, port = options["kind"], int(options["port"])
    overrides = [f"max_batch_size={options.get('max_batch_size', 16)}", "log_level=warning"]
    cfg, label = load_serve_config([*overrides, "engine=vllm"] if kind == "vllm" else overrides)
    if kind in ("embedded", "vllm"):
        app = build_app(options["library"], cfg, label)
    else:
        from peft_engine import PeftEngine

        from adaptermix.serving.app import create_app
        from adaptermix.serving.cli import _router
        from adaptermix.models import load_smollm2

        model, tokenizer = load_smollm2()
        engine = PeftEngine(model, tokenizer, open_library(options["library"], cfg), _router(cfg), ADAPTERS,
                            router_label=label, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms)
        app = create_app(engine)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(l for l in status if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


# -- the load ----------------------------------------------------------------------------------------------

def workload(n: int, how: str, max_tokens: int, ignore_eos: bool = False) -> list[dict]:
    """n chat requests, round-robin over the suite's tasks (test split prompts); ignore_eos: every answer
    exactly max_tokens long (rows compare equal work)."""
    per_task = -(-n // len(SUITE))
    prompts = {task: [p for p, _ in TASKS[task].examples("test", per_task)] for task in SUITE}
    bodies = []
    for i in range(n):
        task = SUITE[i % len(SUITE)]
        model = {"auto": "auto", "named": task, "single": SINGLE}[how]
        bodies.append({"model": model, "messages": [{"role": "user", "content": prompts[task][i // len(SUITE)]}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": ignore_eos,
                       "stream_options": {"include_usage": True}})
    return bodies


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    ttft, tokens, adapters = None, 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                return {"ok": False, "error": f"{reply.status_code}: {(await reply.aread())[:200]!r}"}
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ttft = ttft if ttft is not None else time.perf_counter() - start
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return {"ok": False, "error": event["error"]["message"]}
                adapters = event.get("adaptermix", {}).get("adapters", adapters)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens, "adapters": adapters}


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """C clients take the requests in turn until none are left: (per-request results, wall seconds)."""
    queue = list(reversed(bodies))
    results = []

    async def client_loop(client):
        while queue:
            results.append(await one_request(client, queue.pop()))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(client) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    return results, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(results: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["ok"]]
    out = {"concurrency": concurrency, "requests": len(results), "failures": len(results) - len(ok),
           "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], "wall_s": round(wall, 3),
           "requests_per_s": round(len(ok) / wall, 4),
           "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 3),
           "distinct_adapters": len({tuple(r["adapters"] or ()) for r in ok})}
    for name in ("ttft", "latency"):
        values = [r[name] for r in ok]
        out[f"p50_{name}_s"] = round(median(values), 4) if values else None
        out[f"p95_{name}_s"] = round(percentile(values, 0.95), 4) if values else None
    return out


# -- the runs ----------------------------------------------------------------------------------------------

def measure(servers: dict[str, tuple[str, str]], levels: list[int], options: dict) -> list[dict]:
    """Every row at every concurrency; at each C the rows take turns, round after round (a shared machine's
    load drifts: running one row after another would fold the drift into their ratios). A row's figures pool
    its rounds (requests over summed wall time)."""
    max_tokens, rounds, fixed = int(options["max_tokens"]), int(options["rounds"]), options["ignore_eos"] == "1"
    for url, how in servers.values():
        asyncio.run(load(url, workload(2, how, max_tokens, fixed), 2))                 # warm up
    rows = []
    for c in levels:
        n = max(int(options["min_requests"]), c * int(options["requests_per_client"]))
        pooled = {label: ([], 0.0) for label in servers}
        for _ in range(rounds):
            for label, (url, how) in servers.items():
                results, wall = asyncio.run(load(url, workload(n, how, max_tokens, fixed), c))
                pooled[label] = (pooled[label][0] + results, pooled[label][1] + wall)
        for label, (results, wall) in pooled.items():
            row = summarise(results, wall, c) | {"row": label}
            print(f"  {label:8s} C={c:<3d} {row['requests_per_s']:.3f} req/s {row['output_tokens_per_s']:.2f} tok/s "
                  f"p50 ttft {row['p50_ttft_s']} latency {row['p50_latency_s']} failures {row['failures']}", flush=True)
            rows.append(row)
    return rows


async def soak(url: str, pid: int, seconds: float, options: dict) -> dict:
    """C = 16 on the auto server for `seconds`: per-minute windows of p95 latency, RSS every 5 s."""
    deadline = time.monotonic() + seconds
    results, samples, start = [], [], time.monotonic()
    bodies = workload(len(SUITE) * 8, "auto", int(options["max_tokens"]), options["ignore_eos"] == "1")

    async def client_loop(client, k):
        i = k
        while time.monotonic() < deadline:
            result = await one_request(client, bodies[i % len(bodies)])
            results.append(result | {"at": time.monotonic() - start})
            i += 16

    async def sampler():
        while time.monotonic() < deadline:
            samples.append((round(time.monotonic() - start, 1), round(rss_mib(pid), 1)))
            await asyncio.sleep(5)

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as client:
        await asyncio.gather(sampler(), *[client_loop(client, k) for k in range(16)])
    wall = time.monotonic() - start
    windows = {}
    for r in results:
        if r["ok"]:
            windows.setdefault(int(r["at"] // 60), []).append(r["latency"])
    settled = [rss for at, rss in samples if at >= min(60, seconds / 4)] or [s[1] for s in samples]
    return {"seconds": round(wall, 1), **summarise(results, wall, 16), "rss_mib": samples,
            "rss_growth_pct_after_warmup": round(100 * (settled[-1] - settled[0]) / settled[0], 2),
            "p95_latency_by_minute_s": {m: round(percentile(v, 0.95), 3) for m, v in sorted(windows.items())}}


def plot(rows: list[dict], path: Path) -> Path:
    """Output tokens/s against concurrency, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["row"] for r in rows):
        points = [(r["concurrency"], r["output_tokens_per_s"]) for r in rows if r["row"] == label]
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients C")
    ax.set_ylabel("output tokens / s")
    ax.set_title("adaptermix serve, SmolLM2-135M + 12 adapters (CPU)")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(options: dict) -> None:
    levels = [int(c) for c in options["concurrency"].split(",")]
    wanted = options["rows"].split(",")
    threads = int(options["threads"])
    library = suite_library().root
    processes, servers = {}, {}
    launch = {"batched": ("embedded", ["max_batch_size=16"]), "serial": ("embedded", ["max_batch_size=1"]),
              "peft": ("peft", ["max_batch_size=16"]), "vllm": ("vllm", [])}
    needs = {"auto": "batched", "named": "batched", "single": "batched", "serial": "serial", "peft": "peft",
             "vllm": "vllm"}
    soak_result = None
    try:
        for name in dict.fromkeys(needs[row] for row in wanted):
            print(f"starting the {name} server", flush=True)
            processes[name] = start_server(*launch[name][:1], library, threads, launch[name][1])
        for row in wanted:
            servers[row] = (processes[needs[row]][1], row if row in ("named", "single") else "auto")
        servers |= {key[len("url."):]: (url, "auto") for key, url in options.items() if key.startswith("url.")}
        rows = measure(servers, levels, options)
        if "batched" in processes and float(options["soak_s"]) > 0:
            for name in [n for n in processes if n != "batched"]:
                processes.pop(name)[0].terminate()
            print(f"soak: C=16 for {options['soak_s']} s", flush=True)
            process, url = processes["batched"]
            soak_result = asyncio.run(soak(url, process.pid, float(options["soak_s"]), options))
            print(f"  soak: {soak_result['requests']} requests, {soak_result['failures']} failures, RSS growth "
                  f"{soak_result['rss_growth_pct_after_warmup']}%", flush=True)
    finally:
        for process, _ in processes.values():
            process.terminate()
            process.wait(timeout=60)
    result = {"machine": machine(), "options": options, "threads_per_server": threads, "rows": rows,
              "soak": soak_result, "targets": targets(rows, max(levels))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{options['out']}.json").write_text(json.dumps(result, indent=1))
    plot(rows, PLOTS / f"{options['out']}.png")
    print(table(rows))
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {RESULTS / options['out']}.json and {PLOTS / options['out']}.png")


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (docs/SERVING.md)."""
    lines = ["| row | C | req/s | output tok/s | p50 / p95 TTFT (s) | p50 / p95 latency (s) | failures |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['concurrency']} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.2f} | "
              f"{r['p50_ttft_s']:.2f} / {r['p95_ttft_s']:.2f} | {r['p50_latency_s']:.2f} / {r['p95_latency_s']:.2f} | "
              f"{r['failures']} |" for r in rows]
    return "\n".join(lines)


def targets(rows: list[dict], c: int) -> dict:
    """The issue's targets, at the highest concurrency measured."""
    at = {r["row"]: r for r in rows if r["concurrency"] == c}
    out = {"concurrency": c}

    def ratio(a, b, key="output_tokens_per_s"):
        return round(at[a][key] / at[b][key], 3) if a in at and b in at and at[b][key] else None

    out["auto_over_serial_throughput"] = ratio("auto", "serial")          # target >= 4
    out["auto_over_single_throughput"] = ratio("auto", "single")          # target >= 0.8
    out["named_over_single_throughput"] = ratio("named", "single")
    out["auto_over_peft_throughput"] = ratio("auto", "peft")              # target > 1
    out["auto_over_named_p50_latency"] = ratio("auto", "named", "p50_latency_s")   # target <= 1.15
    out["failures"] = sum(r["failures"] for r in rows)                    # target 0
    return out


if __name__ == "__main__":
    args = dict(DEFAULTS)
    mode = "bench"
    for arg in sys.argv[1:]:
        if "=" not in arg:
            mode = arg
            continue
        key, value = arg.split("=", 1)
        args[key] = value
    serve(args) if mode == "server" else main(args)
