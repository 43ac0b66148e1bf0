"""Concurrency under load: W writer and R reader processes on one library, writers SIGKILLed at random.

    results = run_stress(workdir, writers=4, readers=4, seconds=600, kill_every=(2.0, 6.0))

Writers loop over add / remove / rename / update of their own adapters (names `w<id>-<n>`), logging each
operation before it starts and after it returns (fsynced); a killed writer is restarted and logs the names
it finds. Readers loop over names / get / prototypes / search / a composed forward pass, and log every
error. Afterwards the library is reopened and must pass `verify(deep=True)` (no unreferenced file either);
every operation a writer saw return must be in it, at each restart and at the end (an operation a kill cut
may have happened or not: what the restarted writer finds settles it); and readers may have seen no error
but a clear busy error, or an adapter removed between listing and reading.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_stress"]

ALLOWED_READER_ERRORS = ("LibraryBusyError", "AdapterNotFoundError")


def _log(handle, **entry) -> None:
    handle.write(json.dumps(entry) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _writer(root: str, writer_id: int, log_path: str, seed: int) -> None:
    from adaptermix.reliability.crashtest import HashingEncoder, random_adapter
    from adaptermix.library.store import AdapterLibrary

    rng = random.Random(seed)
    library = AdapterLibrary.open(root, encoder=HashingEncoder())
    prefix = f"w{writer_id}-"
    counter = sum(1 for _ in open(log_path)) if os.path.exists(log_path) else 0
    with open(log_path, "a") as log:
        # what this writer finds on (re)start: settles whether the operation a kill cut was committed
        _log(log, status="start", names=sorted(n for n in library.names() if n.startswith(prefix)))
        while True:
            mine = [n for n in library.names() if n.startswith(prefix)]
            op = rng.choice(["add", "add", "remove", "rename", "update"] if mine else ["add"])
            counter += 1
            name = rng.choice(mine) if mine else None
            entry = {"op": op, "name": name, "n": counter}
            if op == "add":
                entry["name"] = f"{prefix}{counter}"
            elif op == "rename":
                entry["new"] = f"{prefix}{counter}"
            elif op == "update":
                entry["description"] = f"update {counter} of {name}"
            _log(log, status="begin", **entry)
            if op == "add":
                library.add(random_adapter(entry["name"], library.base_model, 1_000_000 * (writer_id + 1) + counter))
            elif op == "remove":
                library.remove(name)
            elif op == "rename":
                library.rename(name, entry["new"])
            else:
                library.update(name, description=entry["description"])
            _log(log, status="done", **entry)


def _reader(root: str, log_path: str, seed: int) -> None:
    import torch

    from adaptermix.reliability.crashtest import HashingEncoder
    from adaptermix.library.errors import AdaptermixError
    from adaptermix.library.store import AdapterLibrary

    rng = random.Random(seed)
    library = AdapterLibrary.open(root, encoder=HashingEncoder(), recover=False)
    model = _tiny_model()
    with open(log_path, "a") as log:
        while True:
            kind = rng.choice(["names", "get", "search", "compose", "prototypes"])
            try:
                names = library.names()
                if kind == "get" and names:
                    library.get(rng.choice(names))
                elif kind == "prototypes" and names:    # derived data from a file, checked on read
                    library.prototypes(rng.choice(names))
                elif kind == "search":
                    library.search("adapter task", k=3)
                elif kind == "compose" and names:
                    from adaptermix.composer import compose, unload
                    from adaptermix.routers import FixedRouter

                    chosen = rng.choice(names)
                    composed = compose(model, library, FixedRouter({chosen: 1.0}), adapters=[chosen])
                    with torch.no_grad():
                        composed(torch.tensor([[1, 2, 3]]))
                    unload(composed)
                _log(log, ok=kind)
            except AdaptermixError as exc:
                _log(log, error=type(exc).__name__, message=str(exc)[:300], kind=kind)
            except Exception as exc:  # noqa: BLE001 - an unclear error is exactly what this test hunts
                _log(log, error=type(exc).__name__, message=str(exc)[:300], kind=kind, unclear=True)


def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._name_or_path = "tiny-llama"
    return LlamaForCausalLM(config).eval()


def _spawn(role: str, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    errors = open(Path(args[-2]).with_suffix(".err"), "ab")   # a file, not a pipe: a full pipe would block
    return subprocess.Popen([sys.executable, "-P", "-m", "adaptermix.reliability.stresstest", role, *map(str, args)],
                            env=env, stdout=subprocess.DEVNULL, stderr=errors)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _expected_names(log_path: Path, prefix: str) -> tuple[set[str], dict | None, list[str]]:
    """Replay a writer's log: its names after every operation it saw return, the operation a kill may have
    cut at the end, and problems. At each restart the writer logged the names it found: they must be the
    names before the cut operation or after it (never a lost committed write), and they settle its outcome."""
    names, pending, problems = set(), None, []
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        if entry["status"] == "start":
            found = set(entry["names"])
            if found not in [names] + ([_apply(set(names), pending)] if pending else []):
                problems.append(f"{prefix} on restart found {sorted(found ^ names)[:5]} differing from the "
                                "operations it saw committed")
            names, pending = found, None
        elif entry["status"] == "begin":
            pending = entry
        else:
            pending = None
            _apply(names, entry)
    return names, pending, problems


def _apply(names: set[str], entry: dict) -> set[str]:
    if entry["op"] == "add":
        names.add(entry["name"])
    elif entry["op"] == "remove":
        names.discard(entry["name"])
    elif entry["op"] == "rename":
        names.discard(entry["name"])
        names.add(entry["new"])
    return names


def run_stress(workdir: Path, writers: int = 2, readers: int = 2, seconds: float = 20.0,
               kill_every: tuple[float, float] = (2.0, 5.0), seed: int = 0) -> dict:
    """Returns the counts and the problems found (`problems` must be empty)."""
    from adaptermix.library.base_model import BaseModelSpec
    from adaptermix.reliability.crashtest import HashingEncoder, _tiny_llama, random_adapter
    from adaptermix.library.store import AdapterLibrary

    workdir = Path(workdir)
    root = workdir / "library"
    library = AdapterLibrary.create(root, BaseModelSpec.from_model(_tiny_llama()), encoder=HashingEncoder())
    for i in range(3):
        library.add(random_adapter(f"seed{i}", library.base_model, i))
    library.close()
    rng = random.Random(seed)
    writer_logs = [workdir / f"writer{i}.jsonl" for i in range(writers)]
    reader_logs = [workdir / f"reader{i}.jsonl" for i in range(readers)]
    procs = {i: _spawn("writer", root, i, writer_logs[i], seed * 1000 + i) for i in range(writers)}
    spawned_at = {i: 0 for i in range(writers)}
    reader_procs = [_spawn("reader", root, reader_logs[i], seed * 1000 + 500 + i) for i in range(readers)]
    try:
        kills = _drive(procs, spawned_at, reader_procs, root, writer_logs, reader_logs, seconds, kill_every, rng, seed)
    finally:                                         # never leave a child running, whatever happened
        for proc in [*procs.values(), *reader_procs]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
    return _audit(root, writer_logs, reader_logs, kills, seconds)


def _drive(procs, spawned_at, reader_procs, root, writer_logs, reader_logs, seconds, kill_every, rng, seed) -> int:
    """Run for `seconds` once every process works, SIGKILLing a working writer every `kill_every` s."""
    writers = len(procs)
    deadline = time.monotonic() + 300
    while not all(_size(log) for log in [*writer_logs, *reader_logs]) and time.monotonic() < deadline:
        time.sleep(0.1)                                  # the clock starts once every process is working
    kills, started = 0, time.monotonic()
    next_kill = started + rng.uniform(*kill_every)
    while time.monotonic() - started < seconds:
        time.sleep(0.05)
        for i, proc in procs.items():
            if proc.poll() is not None:                   # a writer died on its own: that is a finding
                raise RuntimeError(f"writer {i} exited: {writer_logs[i].with_suffix('.err').read_text()[-2000:]}")
        working = [i for i in procs if _size(writer_logs[i]) > spawned_at[i]]   # past its start-up
        if time.monotonic() >= next_kill and working:
            victim = rng.choice(working)
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            kills += 1
            spawned_at[victim] = _size(writer_logs[victim])
            procs[victim] = _spawn("writer", root, victim, writer_logs[victim], seed * 1000 + victim + 17 * kills)
            next_kill = time.monotonic() + rng.uniform(*kill_every)
    return kills


def _audit(root: Path, writer_logs: list[Path], reader_logs: list[Path], kills: int, seconds: float) -> dict:
    from adaptermix.reliability.crashtest import HashingEncoder
    from adaptermix.library.store import AdapterLibrary

    library = AdapterLibrary.open(root, encoder=HashingEncoder())
    problems = list(library.verify(deep=True))
    names = set(library.names())
    writes = 0
    for i, log_path in enumerate(writer_logs):
        if not log_path.exists():
            continue
        expected, pending, found = _expected_names(log_path, f"w{i}-")
        problems += found
        writes += sum(1 for line in log_path.read_text().splitlines() if '"done"' in line)
        have = {n for n in names if n.startswith(f"w{i}-")}
        allowed = [expected] + ([_apply(set(expected), pending)] if pending else [])
        if have not in allowed:
            problems.append(f"writer {i}: library has {sorted(have ^ expected)[:5]} differing from the "
                            "operations it saw committed")
    reads, reader_errors = 0, {}
    for log_path in reader_logs:
        for line in log_path.read_text().splitlines() if log_path.exists() else []:
            entry = json.loads(line)
            reads += 1
            if "error" in entry:
                reader_errors[entry["error"]] = reader_errors.get(entry["error"], 0) + 1
                if entry["error"] not in ALLOWED_READER_ERRORS:
                    problems.append(f"reader saw {entry['error']}: {entry['message']}")
    library.close()
    return {"writers": len(writer_logs), "readers": len(reader_logs), "seconds": seconds, "kills": kills,
            "committed_writes": writes, "reads": reads, "reader_errors": reader_errors,
            "adapters_at_end": len(names), "problems": problems[:50]}


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "writer":
        _writer(args[0], int(args[1]), args[2], int(args[3]))
    else:
        _reader(args[0], args[1], int(args[2]))
