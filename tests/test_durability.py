"""Interrupted and concurrent writes never corrupt a library."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

import adaptermix as am

# The child patches one step of `add` to announce itself and hang there; the parent then SIGKILLs it.
CHILD = textwrap.dedent("""
    import os, sys, time
    import adaptermix as am
    from adaptermix.library import catalog, derived_store

    root, checkpoint, stage = sys.argv[1:4]

    def hang():
        print("READY", flush=True)
        time.sleep(120)

    if stage == "temp_written":
        real = derived_store.write_temp
        def patched(folder, data, suffix=".tmp"):
            path = real(folder, data, suffix)
            hang()
        derived_store.write_temp = patched
    elif stage == "file_in_place":
        real_replace = os.replace
        def patched(src, dst):
            real_replace(src, dst)
            if "adapters" in str(dst):
                hang()
        derived_store.os.replace = patched
    elif stage == "rows_uncommitted":
        real_bump = catalog.Catalog.bump_generation
        def patched(self):
            real_bump(self)
            hang()
        catalog.Catalog.bump_generation = patched

    lib = am.AdapterLibrary.open(root)
    lib.add(checkpoint, name="victim")
    print("FINISHED", flush=True)
""")


@pytest.mark.parametrize("stage", ["temp_written", "file_in_place", "rows_uncommitted"])
def test_killed_mid_add_leaves_library_unchanged(library, checkpoints, stage, h):
    library.add(checkpoints["reverse"])
    library.search("warm the index", k=1)
    before = h.snapshot(library.root)
    child = subprocess.Popen([sys.executable, "-P", "-c", CHILD, str(library.root), str(checkpoints["celsius"]), stage],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()
        assert line == "READY", (line, child.stderr.read())
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    left_behind = {p.name for p in (library.root / "tmp").iterdir()} | {p.name for p in (library.root / "adapters").iterdir()}
    assert len(left_behind) > 1  # the kill really did interrupt a write in progress

    reopened = am.AdapterLibrary.open(library.root)
    assert reopened.verify(deep=True) == []
    assert h.snapshot(library.root) == before
    assert reopened.names() == ["reverse"]
    assert [hit.name for hit in reopened.search("celsius", k=5)] == ["reverse"]
    reopened.add(checkpoints["celsius"], name="victim")  # and the library still takes the same adapter
    assert reopened.verify() == []


ADDER = textwrap.dedent("""
    import os, sys, time
    import adaptermix as am
    root, folder, go = sys.argv[1:4]
    lib = am.AdapterLibrary.open(root)
    lib.encoder.dim  # load the encoder before the race starts
    while not os.path.exists(go):
        time.sleep(0.01)
    added = lib.add_many(folder, progress=False, chunk_size=1)
    print(len(added), flush=True)
""")


def test_two_processes_adding_at_once_both_succeed(library, tmp_path, h):
    folders = []
    for j, side in enumerate(("left", "right")):
        for i in range(3):
            h.make_peft_checkpoint(h.tiny_llama, tmp_path / side / f"{side}{i}", seed=100 * j + i)
        folders.append(tmp_path / side)
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-P", "-c", ADDER, str(library.root), str(f), str(go)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in folders]
    go.write_text("go")
    results = [c.communicate(timeout=300) for c in children]
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err
        assert out.strip() == "3"
    reopened = am.AdapterLibrary.open(library.root)
    assert sorted(reopened.names()) == sorted(f"{s}{i}" for s in ("left", "right") for i in range(3))
    assert reopened.verify(deep=True) == []
    assert reopened.search("left2", k=1)[0].name == "left2"


def test_a_busy_library_gives_a_clear_error_and_stays_unchanged(library, checkpoints, h):
    library.add(checkpoints["reverse"])
    before = h.snapshot(library.root)
    holder = sqlite3.connect(str(library.root / "catalog.sqlite"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        impatient = am.AdapterLibrary.open(library.root, config=am.LibraryConfig(busy_timeout=0.2))
        with pytest.raises(am.LibraryBusyError, match="another process"):
            impatient.add(checkpoints["celsius"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert h.snapshot(library.root) == before and library.verify() == []
