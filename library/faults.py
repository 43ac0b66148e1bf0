"""Fault points of the library's write protocol, for crash testing (reliability/crashtest.py).

Every step of a write calls `point(name)` just before it happens: each temp-file write and fsync, each
rename, each folder fsync, each unlink of garbage, and (through SQLite's trace callback, installed only
while a hook is set) each SQL statement, BEGIN and COMMIT included. With no hook set, a point is one
function call and one global read (~40 ns, against the milliseconds of the fsync it precedes).
"""

from __future__ import annotations

import os
import signal

__all__ = ["hook", "point", "sql_point", "kill_at", "count_points"]

hook = None  # callable(name) or None


def point(name: str) -> None:
    if hook is not None:
        hook(name)


def sql_point(statement: str) -> None:
    point("sql " + statement.split(None, 1)[0].upper())


def kill_at(n: int) -> None:
    """SIGKILL this process at the n-th point from now (1-based): no clean-up, no atexit, no flush."""
    global hook
    seen = [0]

    def die(name: str) -> None:
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    hook = die


def count_points(log: list) -> None:
    """Record every point passed from now on into `log` (to learn how many steps an operation has)."""
    global hook
    hook = log.append
