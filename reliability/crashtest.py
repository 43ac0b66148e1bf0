"""Crash testing of the write protocol: kill a writer at every step of every operation, then check.

    results = run_crash_matrix(workdir)          # in a fresh process (it forks), e.g. through `main`

For each operation (add, add with replace, add_many in chunks, remove, rename, update, derived-data
computation, index save) on a small library: a reference run learns the operation's steps (faults.py)
and the states it may leave (before, after each committed chunk, after). Then for every step N a forked
child opens a copy of the library and runs the operation with SIGKILL at step N. The library is reopened
(recovery runs), and must pass `verify(deep=True)`, equal one of the allowed states exactly (every
catalog row but timestamps, every file but the index cache, by hash), and answer a search correctly.

Forking keeps each kill at ~0.1 s: the parent imports torch once and never starts threads (one torch
thread, a hashing text encoder instead of a sentence model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adaptermix.library import faults

__all__ = ["HashingEncoder", "run_crash_matrix", "library_state", "OPERATIONS"]


class HashingEncoder:
    """A deterministic bag-of-words text encoder (no model): for tests and crash runs only."""

    config = {"name": "hashing", "dim": 64}
    dim = 64

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def random_adapter(name: str, spec, seed: int, modules=("q_proj", "v_proj"), rank: int = 2):
    from adaptermix.library.adapter import LoraAdapter, LoraModule

    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for module_name, (d_out, d_in) in sorted(spec.modules.items()):
        if module_name.rsplit(".", 1)[-1] in modules:
            chosen[module_name] = LoraModule(torch.randn(rank, d_in, generator=generator) * 0.1,
                                             torch.randn(d_out, rank, generator=generator) * 0.1, 2.0 * rank)
    return LoraAdapter(name=name, base_model=spec.name, modules=chosen,
                       description=f"adapter {name} for task {seed}", examples=(f"example prompt {name}",))


def library_state(root: Path) -> dict:
    """Everything a library is, but timestamps and the index cache: catalog rows and file hashes."""
    conn = sqlite3.connect(f"file:{root / 'catalog.sqlite'}?mode=ro", uri=True)
    tables = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"):
        cursor = conn.execute(f"SELECT * FROM {table}")
        columns = [c[0] for c in cursor.description]
        keep = [i for i, c in enumerate(columns) if c not in ("created", "updated")]
        tables[table] = sorted(repr(tuple(row[i] for i in keep)) for row in cursor)
    conn.close()
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in root.rglob("*") if p.is_file() and not p.name.startswith("catalog.sqlite")
             and p.parent.name != "index"}
    return {"tables": tables, "files": files}


def _digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


# Each operation: (run(library, spec), the prefixes of it whose results are allowed states, the name a
# search for "task 7" must find afterwards, or None). Chunked operations list one prefix per chunk.
def _add(lib, spec):
    lib.add(random_adapter("new", spec, 7))


def _replace(lib, spec):
    lib.add(random_adapter("a0", spec, 7), replace=True)


def _add_many(lib, spec, count=3):
    lib.add_many([random_adapter(f"m{i}", spec, 10 + i) for i in range(count)], chunk_size=1, progress=False)


def _remove(lib, spec):
    lib.remove("a0")


def _rename(lib, spec):
    lib.rename("a0", "renamed")


def _update(lib, spec):
    lib.update("a1", description="a new description of the second adapter", tags=["changed"])


def _derive(lib, spec):
    lib.ensure_derived(kinds=("sketch",), progress=False)


def _index_save(lib, spec):
    lib.search("task", k=1)
    lib.close()


OPERATIONS = {
    "add": (_add, None), "add_replace": (_replace, None),
    "add_many": (_add_many, [lambda lib, spec, c=c: _add_many(lib, spec, c) for c in (1, 2)]),
    "remove": (_remove, None), "rename": (_rename, None), "update": (_update, None),
    "derive": (_derive, None), "index_save": (_index_save, None),
}


def _open(root: Path, operation: str):
    from adaptermix.library.store import AdapterLibrary, LibraryConfig

    config = LibraryConfig(sketch_dim=8) if operation == "derive" else LibraryConfig()
    return AdapterLibrary.open(root, encoder=HashingEncoder(), config=config)


def _make_before(root: Path, spec) -> None:
    from adaptermix.library.store import AdapterLibrary

    library = AdapterLibrary.create(root, spec, encoder=HashingEncoder())
    for i in range(2):
        library.add(random_adapter(f"a{i}", spec, i))
    library.search("task", k=1)
    library.close()


def _reference(before: Path, work: Path, operation: str, run, spec) -> tuple[dict, int, list[str]]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(before, work)
    faults.hook = lambda name: None              # as in the child: SQL statements are points
    library = _open(work, operation)
    steps: list[str] = []
    faults.count_points(steps)
    try:
        run(library, spec)
    finally:
        faults.hook = None
    library.close()
    return library_state(work), len(steps), steps


def _child(before: Path, work: Path, operation: str, step: int, spec) -> None:
    """In the forked child: open a fresh copy, run the operation, die at `step`. Never returns."""
    try:
        shutil.copytree(before, work)
        faults.hook = lambda name: None          # SQL statements become points from the connection's start
        library = _open(work, operation)
        faults.kill_at(step)
        OPERATIONS[operation][0](library, spec)
        library.close()
        os._exit(0)                              # ran past its last step: the operation completed
    except BaseException as exc:  # noqa: BLE001 - report, never unwind into the parent's code
        print(f"child {operation}@{step}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(3)


def _check(work: Path, operation: str, allowed: dict[str, str]) -> str | None:
    """None when the killed library is sound and in an allowed state, else what is wrong. Opened with the
    default config: a kill during `derive` may leave the new config's data missing, which is not damage."""
    library = _open(work, "check")
    try:
        problems = library.verify(deep=True)
        if problems:
            return f"verify: {problems[:3]}"
        state = _digest(library_state(work))
        if state not in allowed:
            return "the library is in a state that is neither before nor after (nor a committed chunk)"
        names = library.names()
        expected = {n: library.text_embeddings([n])[1][0] for n in names}
        for name, vector in expected.items():
            if library.search(vector, k=1)[0].name != name:
                return f"search for {name}'s own embedding does not find it"
        return None
    finally:
        library.close()


def run_crash_matrix(workdir: Path, operations: list[str] | None = None, progress: bool = True,
                     stride: int = 1) -> dict:
    """Kill at every `stride`-th step of each operation (1: every step); returns per-operation steps, kills,
    and failures (must be none)."""
    from tqdm.auto import tqdm

    from adaptermix.library.base_model import BaseModelSpec

    torch.set_num_threads(1)
    workdir = Path(workdir)
    spec = BaseModelSpec.from_model(_tiny_llama())
    before = workdir / "before"
    _make_before(before, spec)
    results = {}
    for operation in operations or list(OPERATIONS):
        run, prefixes = OPERATIONS[operation]
        started = time.perf_counter()
        allowed = {_digest(library_state(before)): "before"}
        for position, prefix in enumerate(prefixes or []):
            allowed[_digest(_reference(before, workdir / "ref", operation, prefix, spec)[0])] = f"chunk {position + 1}"
        after, total, names = _reference(before, workdir / "ref", operation, run, spec)
        allowed[_digest(after)] = "after"
        failures, outcomes = [], {}
        kills = range(1, total + 1, stride)
        for step in tqdm(kills, desc=f"kill {operation}", disable=not progress, leave=False):
            work = workdir / f"{operation}-{step}"
            pid = os.fork()
            if pid == 0:
                _child(before, work, operation, step, spec)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            if not killed and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                failures.append(f"step {step} ({names[step - 1]}): the child failed before the kill")
            else:
                problem = _check(work, operation, allowed)
                if problem:
                    failures.append(f"step {step} ({names[step - 1]}): {problem}")
                else:
                    state = _digest(library_state(work))
                    outcomes[allowed[state]] = outcomes.get(allowed[state], 0) + 1
            shutil.rmtree(work, ignore_errors=True)
        results[operation] = {"steps": total, "kills": len(kills), "failures": failures, "outcomes": outcomes,
                              "step_kinds": sorted(set(names)), "seconds": round(time.perf_counter() - started, 1)}
    return results


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._name_or_path = "tiny-llama"
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    """python -m adaptermix.reliability.crashtest WORKDIR STRIDE [OPERATION ...]: prints the results as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    results = run_crash_matrix(Path(argv[0]), argv[2:] or None, progress=False, stride=int(argv[1]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
