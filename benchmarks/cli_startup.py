"""Wall time of `adaptermix --help`, `list`, `show`, `verify` and `search` on a copy of the example library,
this checkout's CLI against another installation's (e.g. the code before the lazy imports), side by side:
each round runs every command of each in turn, medians over rounds.

    python benchmarks/cli_startup.py                                   # this checkout only
    python benchmarks/cli_startup.py before=/path/to/other/.venv/bin/adaptermix rounds=5
Wall and CPU seconds (the children's user + system time) and the load average before and after, so a
shared machine's contention shows. Writes benchmarks/results/cli_startup_cpu.json.
Targets (issue 22): --help, list, show, verify < 1 s; search < 3 s.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "cli_startup_cpu.json"
TARGETS = {"--help": 1.0, "list": 1.0, "show": 1.0, "verify": 1.0, "search": 3.0}


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def commands(library: str) -> dict[str, list[str]]:
    return {"--help": ["--help"], "list": ["list", library], "show": ["show", library, "acronym"],
            "verify": ["verify", library], "search": ["search", library, "write the acronym of a phrase"]}


def main(argv: list[str]) -> None:
    options = dict(a.split("=", 1) for a in argv)
    rounds = int(options.get("rounds", 5))
    ours = str(Path(sys.executable).with_name("adaptermix"))
    clis = {"this checkout": ours, **({"before": options["before"]} if "before" in options else {})}
    from adaptermix.suite import suite_library

    scratch = Path(tempfile.mkdtemp(prefix="am-startup-"))
    library = scratch / "lib"
    shutil.copytree(suite_library().root, library)   # a copy: the old CLI's open() may recover in place
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    times = {label: {name: [] for name in commands(str(library))} for label in clis}
    cpu = {label: {name: [] for name in commands(str(library))} for label in clis}
    load_before = os.getloadavg()
    for _ in range(rounds):
        for label, cli in clis.items():
            for name, args in commands(str(library)).items():
                start, used = time.perf_counter(), _children_cpu()
                done = subprocess.run([cli, *args], env=env, capture_output=True, text=True, cwd=scratch)
                times[label][name].append(time.perf_counter() - start)
                cpu[label][name].append(_children_cpu() - used)
                if done.returncode != 0:
                    raise SystemExit(f"{label} {name} failed: {done.stderr[-500:]}")
    shutil.rmtree(scratch)
    result = {"benchmark": "cli_startup", "machine": machine(), "rounds": rounds,
              "load_average": {"before": load_before, "after": os.getloadavg()}, "targets_s": TARGETS,
              "seconds_median": {label: {n: round(median(v), 2) for n, v in by.items()} for label, by in times.items()},
              "seconds_min": {label: {n: round(min(v), 2) for n, v in by.items()} for label, by in times.items()},
              "cpu_seconds_median": {label: {n: round(median(v), 2) for n, v in by.items()}
                                     for label, by in cpu.items()}}
    result["meets_targets_wall_median"] = {n: result["seconds_median"]["this checkout"][n] < t
                                           for n, t in TARGETS.items()}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("load_average", "seconds_median", "cpu_seconds_median")}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
