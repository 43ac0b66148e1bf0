"""Crash testing at every step of the write protocol, and concurrency under random kills (short runs;
benchmarks/reliability.py runs the long ones)."""

import json
import subprocess
import sys

from adaptermix.reliability.crashtest import OPERATIONS


def test_a_writer_killed_at_any_step_leaves_the_library_before_or_after(tmp_path):
    """Every third step of every operation (the benchmark kills at every step): SIGKILL, reopen,
    verify(deep=True) clean, state exactly before / after (or after a committed chunk), search right."""
    child = subprocess.run([sys.executable, "-P", "-m", "adaptermix.reliability.crashtest", str(tmp_path), "3"],
                           capture_output=True, text=True, timeout=900, env={"OMP_NUM_THREADS": "1", **_env()})
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    assert set(results) == set(OPERATIONS)
    for operation, result in results.items():
        assert result["failures"] == [], (operation, result["failures"][:3])
        assert result["kills"] >= 3 and sum(result["outcomes"].values()) == result["kills"]
    kinds = set().union(*(r["step_kinds"] for r in results.values()))
    assert {"write", "fsync", "rename", "sql BEGIN", "sql INSERT", "sql COMMIT", "unlink"} <= kinds
    assert results["add_many"]["outcomes"].get("chunk 1", 0) > 0     # a kill keeps the chunks committed


def test_writers_killed_at_random_beside_readers_lose_nothing(tmp_path):
    from adaptermix.reliability.stresstest import run_stress

    result = run_stress(tmp_path, writers=2, readers=2, seconds=20, kill_every=(2.0, 4.0))
    assert result["problems"] == []
    # kills land only on writers past their start-up (seconds on a loaded machine): at least one here
    assert result["kills"] >= 1 and result["committed_writes"] > 0 and result["reads"] > 0


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
