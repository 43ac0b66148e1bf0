"""Wall time of `adaptermix --help`, `list`, `show`, `verify` and `search` on a copy of the example library,
this checkout's CLI against another installation's (e.g. the code before the lazy imports), side by side:
each round runs every command of each in turn, medians over rounds.

    python benchmarks/cli_startup.py                                   # this checkout only
    python benchmarks/cli_startup.py before=/path/to/other/.venv/bin/adaptermix rounds=5
Writes benchmarks/results/cli_startup_cpu.json. Targets (issue 22): --help, list, show, verify < 1 s; search < 3 s.
"""

from __future__ import annotations

import json
import os
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
    for _ in range(rounds):
        for label, cli in clis.items():
            for name, args in commands(str(library)).items():
                start = time.perf_counter()
                done = subprocess.run([cli, *args], env=env, capture_output=True, text=True, cwd=scratch)
                times[label][name].append(time.perf_counter() - start)
                if done.returncode != 0:
                    raise SystemExit(f"{label} {name} failed: {done.stderr[-500:]}")
    shutil.rmtree(scratch)
    result = {"benchmark": "cli_startup", "machine": machine(), "rounds": rounds,
              "seconds_median": {label: {n: round(median(v), 2) for n, v in by.items()} for label, by in times.items()},
              "seconds_min": {label: {n: round(min(v), 2) for n, v in by.items()} for label, by in times.items()}}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds_median"], indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
