"""Reliability figures of the library store -> benchmarks/results/reliability.json (docs/RELIABILITY.md).

    python benchmarks/reliability.py                          # every section at full size (~1 h on 2 cores)
    python benchmarks/reliability.py sections=checksum,crash  # some sections; the others stay as they were
    python benchmarks/reliability.py sections=stress writers=4 readers=4 seconds=600
    python benchmarks/reliability.py sections=fuzz fuzz_scale=1.0    # >= 100,000 cases at scale 1
    python benchmarks/reliability.py sections=fuzz fuzz_targets=cli  # one target; the others' counts are kept

Sections:
    crash     reliability/crashtest.py: SIGKILL at every step of every write operation
    stress    reliability/stresstest.py: W writers x R readers, writers SIGKILLed every 2-6 s
    fuzz      reliability/fuzz.py: hypothesis over the safetensors reader, the PEFT loader, hostile libraries,
              the CLI's arguments
    checksum  cost of the content check on read, against the load it guards (side by side, same process)
    overhead  cost of a fault point with no hook set; cost of the composer's router-output check
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"


def crash(args: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="am-crash-") as work:
        child = subprocess.run([sys.executable, "-P", "-m", "adaptermix.reliability.crashtest", work, "1"],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if child.returncode:
        raise RuntimeError(child.stderr[-3000:])
    results = json.loads(child.stdout.strip().splitlines()[-1])
    return {"operations": results, "kills": sum(r["kills"] for r in results.values()),
            "steps": sum(r["steps"] for r in results.values()),
            "failures": sum(len(r["failures"]) for r in results.values())}


def stress(args: dict) -> dict:
    from adaptermix.reliability.stresstest import run_stress

    with tempfile.TemporaryDirectory(prefix="am-stress-") as work:
        return run_stress(Path(work), writers=int(args.get("writers", 4)), readers=int(args.get("readers", 4)),
                          seconds=float(args.get("seconds", 600)), kill_every=(2.0, 6.0))


def fuzz(args: dict) -> dict:
    """Every target, or those in `fuzz_targets` (e.g. fuzz_targets=cli): their counts replace the earlier
    run's, the other targets' counts are kept from reliability.json."""
    from adaptermix.reliability.fuzz import run_fuzz

    scale = float(args.get("fuzz_scale", 1.0))
    examples = {"safetensors": 90_000, "peft_config": 4_000, "peft_weights": 4_000, "library": 2_000, "cli": 3_000}
    targets = args.get("fuzz_targets", "safetensors,peft,library,cli").split(",")
    chosen = {k for k in examples if k in targets or (k.startswith("peft_") and "peft" in targets)}
    examples = {k: max(10, int(v * scale)) for k, v in examples.items() if k in chosen}
    before = json.loads(RESULTS.read_text()).get("fuzz", {}) if RESULTS.exists() else {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="am-fuzz-") as work:
        counts = run_fuzz(Path(work), examples)
    runs = dict(before.get("runs", {}))
    if not runs and "seconds" in before:        # a result written before runs were kept per target
        targets_then = sorted(k for k in before["cases"] if k != "outside_touched")
        runs[",".join(targets_then)] = {"seconds": before["seconds"], "args": before.get("args", {})}
    for key in [k for k in runs if set(k.split(",")) & chosen]:
        kept = ",".join(t for t in key.split(",") if t not in chosen)   # the targets rerun now leave it
        run = runs.pop(key)
        if kept:
            runs[kept] = {**run, "note": f"seconds of the run that also covered {key}"}
    runs[",".join(sorted(chosen))] = {"seconds": round(time.perf_counter() - started, 1),
                                      "args": {k: v for k, v in args.items() if k != "sections"}}
    merged = {**before.get("cases", {}), **counts}
    merged["outside_touched"] = merged.get("outside_touched", 0) + merged.pop("cli_outside_touched", 0)
    return {"cases": merged, "total": sum(v for k, v in merged.items() if k != "outside_touched"),
            "crashes": 0, "runs": runs}


def checksum(args: dict) -> dict:
    """The content check's cost, against the load it guards, on an adapter of the example library's size
    (150 modules of 576x576, rank 8, float32: 5.6 MB). Two loads, each with and without the check, all
    interleaved in one process: read+parse (`read_adapter_file`), and what a user pays, `Library.get()`
    end to end (catalog row, path checks, read, parse, the adapter object). sha256 beside them."""
    import contextlib
    import hashlib
    import timeit

    import torch

    from adaptermix.library import files
    from adaptermix.library.base_model import BaseModelSpec
    from adaptermix.library.store import AdapterLibrary
    from adaptermix.library.tensor_file import content_check
    from adaptermix.reliability.crashtest import HashingEncoder, random_adapter

    torch.set_num_threads(1)
    spec = BaseModelSpec("bench", {f"model.layers.{i}.{m}": (576, 576) for i in range(30)
                                   for m in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")})
    adapter = random_adapter("bench", spec, 0, modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
                             rank=8)
    data = files.adapter_file_bytes(adapter)
    checked_read = files.read_checked

    @contextlib.contextmanager
    def unchecked():            # get() exactly as it runs, but its read skips the check
        files.read_checked = lambda path, *_: checked_read(path)
        try:
            yield
        finally:
            files.read_checked = checked_read

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "a.safetensors"
        path.write_bytes(data)
        library = AdapterLibrary.create(Path(work) / "lib", spec, encoder=HashingEncoder())
        library.add(adapter)
        check, sha = content_check(data), hashlib.sha256(data).hexdigest()

        def get_unchecked():
            with unchecked():
                library.get("bench")

        runs = {"read_parse_unchecked": lambda: files.read_adapter_file(path, name="bench"),
                "read_parse_checked": lambda: files.read_adapter_file(path, name="bench", expected_check=check),
                "read_parse_sha256": lambda: files.read_adapter_file(path, name="bench", expected_sha256=sha),
                "get_unchecked": get_unchecked,
                "get_checked": lambda: library.get("bench")}
        timings, order = {label: [] for label in runs}, list(runs)
        for repeat in range(int(args.get("repeats", 300))):
            random.Random(repeat).shuffle(order)    # no variant always follows another (allocator, caches)
            for label in order:
                run = runs[label]
                started = time.perf_counter()
                run()
                timings[label].append(time.perf_counter() - started)
        library.close()
    median = {k: statistics.median(v) * 1e3 for k, v in timings.items()}
    quartiles = {k: [round(q * 1e3, 4) for q in statistics.quantiles(v, n=4)] for k, v in timings.items()}
    writable = bytearray(data)                  # as read_checked holds it (the torch path)
    alone = min(timeit.repeat(lambda: content_check(writable), number=20, repeat=5)) / 20 * 1e3
    median["content_check_alone"] = alone

    def paired(checked: str, unchecked: str) -> float:
        """Median over turns of (checked - unchecked), both timed within one turn, / the unchecked median:
        robust to the machine's slow phases (other jobs), which hit both loads of a turn alike."""
        return statistics.median(a - b for a, b in zip(timings[checked], timings[unchecked])) * 1e3 / median[unchecked]

    return {"file_bytes": len(data), "repeats": len(timings["get_checked"]),
            "median_ms": {k: round(v, 4) for k, v in median.items()}, "quartiles_ms": quartiles,
            "check_cost_fraction": {  # ratio of medians - 1
                "read_parse": round(median["read_parse_checked"] / median["read_parse_unchecked"] - 1, 4),
                "get": round(median["get_checked"] / median["get_unchecked"] - 1, 4),
                "read_parse_sha256": round(median["read_parse_sha256"] / median["read_parse_unchecked"] - 1, 4)},
            "check_cost_fraction_paired": {
                "read_parse": round(paired("read_parse_checked", "read_parse_unchecked"), 4),
                "get": round(paired("get_checked", "get_unchecked"), 4),
                "read_parse_sha256": round(paired("read_parse_sha256", "read_parse_unchecked"), 4)},
            "check_alone_fraction_of_load": {"read_parse": round(alone / median["read_parse_unchecked"], 4),
                                             "get": round(alone / median["get_unchecked"], 4)},
            "method": "size, then a torch int64 word sum over each 8 MiB block right after it is read",
            "torch": torch.__version__}


def overhead(args: dict) -> dict:
    import timeit

    import torch

    from adaptermix.composer.layer import check_routing
    from adaptermix.library import faults
    from adaptermix.routers.routing import Routing

    point = min(timeit.repeat(lambda: faults.point("write"), number=100_000, repeat=5)) / 100_000
    routing = Routing(torch.randint(0, 8, (8, 2)), torch.rand(8, 2))
    check = min(timeit.repeat(lambda: check_routing(routing, 8, "m", None), number=2000, repeat=5)) / 2000
    x, weight = torch.randn(8, 576), torch.randn(576, 576)
    linear = min(timeit.repeat(lambda: torch.nn.functional.linear(x, weight), number=2000, repeat=5)) / 2000
    return {"fault_point_off_ns": round(point * 1e9, 1), "route_check_us_T8": round(check * 1e6, 2),
            "base_linear_us_T8_576": round(linear * 1e6, 2)}


SECTIONS = {"checksum": checksum, "overhead": overhead, "crash": crash, "fuzz": fuzz, "stress": stress}


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared, noisy)"
    for name in args.get("sections", ",".join(SECTIONS)).split(","):
        started = time.perf_counter()
        results[name] = SECTIONS[name](args)
        results[name]["wall_seconds"] = round(time.perf_counter() - started, 1)
        results[name]["args"] = {k: v for k, v in args.items() if k != "sections"}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(results[name])[:400], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
