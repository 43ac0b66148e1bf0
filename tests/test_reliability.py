"""Reliability and security of the library store: nothing outside what adaptermix made is ever deleted,
hostile libraries are refused, corrupt content is caught on read, failures are whole or nothing."""

import json
import os
from pathlib import Path

import pytest

import adaptermix as am
from adaptermix.library.errors import FolderNotOwnedError
from adaptermix.library.owned import MARKER, check_replaceable, make_owned, remove_owned


# -- 1. only folders adaptermix created and marked are ever deleted -----------------------------------

def test_suite_library_leaves_a_users_folder_alone(tmp_path):
    from adaptermix.suite import suite_library

    mine = tmp_path / "my-lib"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FolderNotOwnedError, match="my-lib.*left untouched"):
        suite_library(mine)
    assert (mine / "notes.txt").read_text() == "precious"


def test_suite_library_leaves_a_users_own_library_alone(tmp_path, llama, checkpoints):
    from adaptermix.suite import suite_library

    users = am.AdapterLibrary.create(tmp_path / "users-lib", base_model=llama)
    users.add(checkpoints["reverse"])
    users.close()
    with pytest.raises(FolderNotOwnedError):
        suite_library(tmp_path / "users-lib")
    assert am.AdapterLibrary.open(tmp_path / "users-lib").names() == ["reverse"]


def test_remove_owned_deletes_only_what_it_marked_for_that_purpose(tmp_path):
    owned = make_owned(tmp_path / "cache", "example library")
    (owned / "data").write_text("x")
    other = make_owned(tmp_path / "other", "staging")
    plain = tmp_path / "plain"
    plain.mkdir()
    link = tmp_path / "link"
    link.symlink_to(owned)
    for folder in (other, plain, link):
        with pytest.raises(FolderNotOwnedError, match=str(folder.name)):
            remove_owned(folder, "example library")
    assert other.is_dir() and plain.is_dir() and (owned / "data").is_file()
    (plain / MARKER).write_text(json.dumps({"purpose": "staging"}))
    with pytest.raises(FolderNotOwnedError):
        remove_owned(plain, "example library")
    with pytest.raises(FolderNotOwnedError, match="not empty"):
        make_owned(plain, "example library")
    remove_owned(owned, "example library")
    assert not owned.exists() and not os.path.lexists(owned / "data")


def test_train_suite_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    for foreign in ("add.partial", "add"):     # a user's folder at the staging path, then at the output path
        (tmp_path / foreign).mkdir()
        (tmp_path / foreign / "adapter_model.safetensors").write_text("a user's own adapter")
        run = subprocess.run([sys.executable, "-P", str(repo / "benchmarks" / "train_suite.py"), "tasks=add",
                              f"out={tmp_path}"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode != 0 and "FolderNotOwnedError" in run.stderr and foreign in run.stderr
        assert (tmp_path / foreign / "adapter_model.safetensors").read_text() == "a user's own adapter"
    for folder in repo.glob("examples/suite_adapters*/*/"):      # the committed adapters it made: replaceable
        assert check_replaceable(folder, "trained adapter")


# -- 2. no race between the clean-up after a commit and another writer; the index is one file ------------

def test_cleanup_after_a_commit_cannot_delete_a_file_another_writer_just_committed(library, checkpoints,
                                                                                     monkeypatch):
    """Writer A removes an adapter; between A's COMMIT and its deletion of the now unreferenced file,
    writer B (another connection) adds the same content again, which reuses that content-addressed file."""
    import pathlib

    library.add(checkpoints["reverse"])
    other = am.AdapterLibrary.open(library.root, config=am.LibraryConfig(busy_timeout=0.2))
    real_unlink, outcome = pathlib.Path.unlink, {}

    def unlink(self, missing_ok=False):
        if self.parent.name == "adapters" and "b" not in outcome:
            try:
                other.add(checkpoints["reverse"], name="again")
                outcome["b"] = "committed"
            except am.LibraryBusyError:
                outcome["b"] = "busy"   # A holds the writer lock while it cleans up: B waits its turn
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    library.remove("reverse")
    monkeypatch.setattr(pathlib.Path, "unlink", real_unlink)
    assert outcome["b"] == "busy"
    if "again" not in other:
        other.add(checkpoints["reverse"], name="again")
    assert other.verify(deep=True) == [] and other.get("again").modules


def test_index_saves_of_two_processes_never_stamp_stale_content_current(library, checkpoints, monkeypatch):
    """Two handles save the index at generations g and g+1, their file writes interleaved in the worst
    order; the index that loads at g+1 must hold exactly the adapters of g+1."""
    from adaptermix.library import index as index_module

    library.add(checkpoints["reverse"])
    old = am.AdapterLibrary.open(library.root)
    old.search("reverse", k=1)                       # index in memory at generation g
    library.search("reverse", k=1)
    library.add(checkpoints["celsius"])              # the other handle's index follows to g+1
    writes = {}
    monkeypatch.setattr(index_module, "write_atomic", lambda path, data: writes.setdefault(id_, []).append((path, data)))
    for id_, handle in (("old", old), ("new", library)):
        handle._index.dirty = True
        handle._index.save()
    monkeypatch.undo()
    new_writes = writes["new"]
    for path, data in [*new_writes[:-1], *writes["old"], new_writes[-1]]:
        index_module.write_atomic(path, data)
    fresh = am.AdapterLibrary.open(library.root)
    generation = int(fresh.catalog.get_meta("generation"))
    index = index_module.TextIndex(fresh.root / "index", fresh.text_kind.config_hash, "flat")
    if index.load(generation, fresh.catalog.ids()):
        assert sorted(index._ids.tolist()) == sorted(fresh.catalog.ids())
    assert sorted(hit.name for hit in fresh.search("convert", k=5)) == ["celsius", "reverse"]


def test_a_writer_recovering_while_a_reader_saves_the_index_costs_the_reader_nothing(library, checkpoints,
                                                                                    monkeypatch):
    """Found by the 10-minute stress run: a reader saves the index cache without the writer lock, and a
    restarting writer's recovery swept its temp file away mid-save; the reader's search raised
    FileNotFoundError."""
    from adaptermix.library import faults

    library.add(checkpoints["reverse"])
    library.add(checkpoints["celsius"])
    root = library.root
    library.close()
    for cached in (root / "index").iterdir():
        cached.unlink()
    reader = am.AdapterLibrary.open(root, recover=False)

    def writer_restarts(name):
        if name == "rename" and list((root / "index").glob(".tmp-*")):
            faults.hook = None
            am.AdapterLibrary.open(root).close()           # its recovery sweeps leftover temp files

    monkeypatch.setattr(faults, "hook", writer_restarts)
    assert reader.search("Convert temperatures from Celsius to Fahrenheit", k=1)[0].name == "celsius"
    assert faults.hook is None and not list((root / "index").glob("*"))   # the race did happen
    reader.close()                                                        # the next save writes it
    assert [p.suffix for p in (root / "index").iterdir()] == [".safetensors"]


# -- 3. hostile libraries: paths that escape, links, a planted index ----------------------------------

def _hostile(library, checkpoints, tmp_path, file_field):
    """A library whose one adapter row names `file_field`; a valid adapter file waits at outside/."""
    import shutil
    import sqlite3

    library.add(checkpoints["reverse"])
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    victim = outside / "victim.safetensors"
    shutil.copy(library.root / library.record("reverse").file, victim)
    conn = sqlite3.connect(str(library.root / "catalog.sqlite"))
    conn.execute("UPDATE adapters SET file = ? WHERE name = 'reverse'",
                 (file_field.replace("VICTIM", str(victim)),))
    conn.commit()
    conn.close()
    return victim


@pytest.mark.parametrize("file_field", ["../outside/victim.safetensors", "VICTIM",
                                        "adapters/../../outside/victim.safetensors", "adapters/./x.safetensors",
                                        "derived/../../outside/victim.safetensors", "catalog.sqlite", ""])
def test_a_catalog_file_field_that_escapes_is_refused_on_every_use(library, checkpoints, tmp_path, file_field):
    victim = _hostile(library, checkpoints, tmp_path, file_field)
    before = victim.read_bytes()
    hostile = am.AdapterLibrary.open(library.root)
    with pytest.raises(am.UnsafeLibraryError, match="not a file inside the library"):
        hostile.get("reverse")
    with pytest.raises(am.UnsafeLibraryError):
        hostile.remove("reverse")
    problems = hostile.verify(deep=True)
    assert any("not a file inside the library" in p for p in problems), problems
    assert victim.read_bytes() == before and "reverse" in hostile


def test_a_derived_file_field_that_escapes_is_never_deleted_by_garbage_collection(library, checkpoints, tmp_path):
    import sqlite3

    victim = _hostile(library, checkpoints, tmp_path, "adapters/x.safetensors")
    conn = sqlite3.connect(str(library.root / "catalog.sqlite"))
    conn.execute("INSERT INTO derived (kind, config_hash, key, file, data, sha256) "
                 "VALUES ('arrow', 'c', 'orphan-key', ?, NULL, 'x')",
                 ("derived/../../outside/victim.safetensors",))
    conn.commit()
    conn.close()
    hostile = am.AdapterLibrary.open(library.root)
    with pytest.raises(am.UnsafeLibraryError):
        hostile.add(checkpoints["celsius"])          # its garbage collection meets the hostile row: refused
    assert victim.is_file() and "celsius" not in hostile


def test_symbolic_links_inside_a_library_are_refused(library, checkpoints, tmp_path):
    import shutil

    library.add(checkpoints["reverse"])
    rel = library.record("reverse").file
    outside = tmp_path / "elsewhere"
    shutil.copytree(library.root / "adapters", outside)
    (library.root / rel).unlink()
    (library.root / rel).symlink_to(outside / rel.split("/")[1])
    with pytest.raises(am.UnsafeLibraryError, match="symbolic link"):
        am.AdapterLibrary.open(library.root).get("reverse")
    shutil.rmtree(library.root / "adapters")
    (library.root / "adapters").symlink_to(outside)
    with pytest.raises(am.UnsafeLibraryError, match="symbolic link"):
        am.AdapterLibrary.open(library.root)
    assert sorted(p.name for p in outside.iterdir()) == [rel.split("/")[1]]


def test_a_planted_index_file_is_never_deserialized_and_search_stays_right(library, checkpoints):
    from adaptermix.library.index import TextIndex

    for name in ("reverse", "celsius", "sql"):
        library.add(checkpoints[name])
    library.search("warm", k=1)
    library.close()
    index_files = sorted((library.root / "index").iterdir())
    assert [p.suffix for p in index_files] == [".safetensors"]
    planted = index_files[0]
    good = planted.read_bytes()
    for hostile in (b"IxFI" + os.urandom(4096), good[:-7] + b"\x00" * 7, good.replace(b'"generation"', b'"generatioN"'),
                    b"\xff" * 8 + b"{}"):
        planted.write_bytes(hostile)
        (library.root / "index" / planted.name.replace(".safetensors", ".faiss")).write_bytes(os.urandom(256))
        reopened = am.AdapterLibrary.open(library.root)
        assert reopened.search("Convert temperatures from Celsius to Fahrenheit", k=1)[0].name == "celsius"
        reopened.close()
    assert isinstance(TextIndex, type)


# -- 4. corrupt content is caught on every read ----------------------------------------------------

def test_a_flipped_bit_is_caught_by_get_and_export(library, checkpoints, tmp_path):
    from adaptermix.cli import main as cli

    library.add(checkpoints["reverse"])
    path = library.root / library.record("reverse").file
    data = bytearray(path.read_bytes())
    for position in (len(data) - 3, len(data) // 2, 200):        # factor bytes, and inside the header
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        path.write_bytes(flipped)
        with pytest.raises(am.CorruptAdapterError, match="checksum"):
            library.get("reverse")
        assert cli(["export", str(library.root), "reverse", str(tmp_path / f"out{position}")]) != 0
        assert not (tmp_path / f"out{position}" / "adapter_model.safetensors").exists()
    path.write_bytes(data[:-8])
    with pytest.raises(am.CorruptAdapterError, match="bytes but the catalog recorded"):
        library.get("reverse")
    path.write_bytes(data)
    assert library.get("reverse").content_hash() == library.record("reverse").content_hash


def test_a_library_without_the_checksum_column_falls_back_to_sha256(library, checkpoints):
    import sqlite3

    library.add(checkpoints["reverse"])
    conn = sqlite3.connect(str(library.root / "catalog.sqlite"))
    conn.execute("ALTER TABLE adapters DROP COLUMN file_check")
    conn.commit()
    conn.close()
    older = am.AdapterLibrary.open(library.root)
    assert older.record("reverse").file_check is None
    path = older.root / older.record("reverse").file
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(data)
    with pytest.raises(am.CorruptAdapterError, match="sha256"):
        older.get("reverse")
    older.add(checkpoints["celsius"])
    assert older.record("celsius").file_check and older.get("celsius").modules


def test_the_content_check_catches_every_single_flipped_bit_truncation_and_extension(tmp_path, monkeypatch):
    from adaptermix.library import tensor_file
    from adaptermix.library.tensor_file import content_check, read_checked

    def reference(data: bytes) -> str:    # the format catalogs store: size, sum of LE 64-bit words mod 2^64
        words = sum(int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8))
        return f"{len(data)}:{words % (1 << 64):016x}"

    monkeypatch.setattr(tensor_file, "_BLOCK", 16)     # many blocks: the read-time sum crosses block edges
    path = tmp_path / "f.safetensors"
    for data in (b"", b"\x01", b"\xff" * 43, os.urandom(61), b"\xff" * 64):   # sums that wrap past 2^64
        check = content_check(data)
        assert check == reference(data) == content_check(bytearray(data))
        path.write_bytes(data)
        assert bytes(read_checked(path, check)) == data
        for bit in range(len(data) * 8):
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(flipped)
            with pytest.raises(am.CorruptAdapterError, match="checksum"):
                read_checked(path, check)
        for damaged in [d for d in (data[:-1], data + b"\x00") if len(d) != len(data)]:
            path.write_bytes(damaged)
            with pytest.raises(am.CorruptAdapterError, match="bytes but the catalog recorded"):
                read_checked(path, check)


def test_a_flipped_bit_in_derived_data_is_caught_on_read(library, checkpoints):
    import sqlite3

    library.add(checkpoints["reverse"])
    record = library.record("reverse")
    conn = sqlite3.connect(str(library.root / "catalog.sqlite"))
    rel, check = conn.execute("SELECT file, file_check FROM derived WHERE kind = 'arrow'").fetchone()
    assert rel and check and library.prototypes("reverse")
    path = library.root / rel
    data = bytearray(path.read_bytes())
    for position in (len(data) - 3, 20):                          # a prototype's bytes, and the header
        flipped = bytearray(data)
        flipped[position] ^= 0x04
        path.write_bytes(flipped)
        with pytest.raises(am.CorruptAdapterError, match="derived arrow data .*checksum"):
            library.prototypes("reverse")
    path.write_bytes(data)
    assert set(library.prototypes("reverse")) == set(library.get("reverse").modules)
    # a blob in the catalog (the parameter sketch), flipped: caught too, by its sha256
    blob, sha = conn.execute("SELECT data, sha256 FROM derived WHERE kind = 'sketch'").fetchone()
    damaged = bytearray(blob)
    damaged[-2] ^= 0x01
    conn.execute("UPDATE derived SET data = ? WHERE kind = 'sketch'", (bytes(damaged),))
    conn.commit()
    with pytest.raises(am.CorruptAdapterError, match="derived sketch data .*sha256"):
        library.parameter_embeddings(["reverse"])
    conn.execute("UPDATE derived SET data = ?, file_check = NULL WHERE kind = 'sketch'", (blob,))
    conn.execute("UPDATE derived SET file_check = NULL WHERE kind = 'arrow'")   # as a library made before it
    conn.commit()
    conn.close()
    assert library.parameter_embeddings(["reverse"])[1].shape[0] == 1
    path.write_bytes(flipped)
    with pytest.raises(am.CorruptAdapterError, match="derived arrow data .*sha256"):
        library.prototypes("reverse")
    path.unlink()
    with pytest.raises(am.CorruptAdapterError, match="derived arrow data .* is missing"):
        library.prototypes("reverse")
    assert record.content_hash == library.record("reverse").content_hash


def test_a_library_without_the_derived_checksum_column_gains_it_on_open(library, checkpoints):
    import sqlite3

    library.add(checkpoints["reverse"])
    conn = sqlite3.connect(str(library.root / "catalog.sqlite"))
    conn.execute("ALTER TABLE derived DROP COLUMN file_check")
    conn.commit()
    conn.close()
    older = am.AdapterLibrary.open(library.root)
    assert older.prototypes("reverse")                  # rows without the column: checked by sha256
    older.add(checkpoints["celsius"])
    assert older.prototypes("celsius") and not older.verify(deep=True)


def test_a_corrupt_catalog_is_a_clear_error(library, checkpoints):
    library.add(checkpoints["reverse"])
    library.close()
    catalog = library.root / "catalog.sqlite"
    for suffix in ("-wal", "-shm"):
        (library.root / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    catalog.write_bytes(b"this is not SQLite" * 512)
    with pytest.raises(am.CorruptCatalogError, match="not a readable adaptermix catalog"):
        am.AdapterLibrary.open(library.root)


# -- 5. partial failures: merge, router output --------------------------------------------------------

def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("damage", ["nan_last", "shape_last", "overflow"])
def test_merge_adapter_is_all_or_nothing(llama, checkpoints, damage):
    import dataclasses

    import torch

    adapter = am.LoraAdapter.from_peft(checkpoints["reverse"])
    last = sorted(adapter.modules)[-1]
    module = adapter.modules[last]
    weight = 1.0
    if damage == "nan_last":
        A = module.A.clone()
        A[0, 0] = float("nan")
        adapter.modules[last] = dataclasses.replace(module, A=A)
    elif damage == "shape_last":
        adapter.modules[last] = dataclasses.replace(module, A=torch.zeros(module.rank, module.d_in + 1))
    else:
        llama.half()
        weight = 1e30
    before = _weights(llama)
    with pytest.raises(am.AdapterValidationError):
        am.merge_adapter(llama, adapter, weight=weight)
    after = _weights(llama)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="no adapter is merged"):
        am.unmerge_adapter(llama)


@pytest.mark.parametrize("damage", ["nan", "too_big", "too_small"])
def test_the_composer_refuses_bad_router_output(llama, library, checkpoints, damage):
    import torch

    from adaptermix.routers.routing import Routing

    library.add(checkpoints["reverse"])
    library.add(checkpoints["celsius"])

    class Broken(am.FixedRouter):
        def route(self, module, x, context):
            routing = super().route(module, x, context)
            indices, weights = routing.indices.clone(), routing.weights.clone()
            if damage == "nan":
                weights[-1, 0] = float("nan")
            else:
                indices[-1, 0] = 2 if damage == "too_big" else -2
            return Routing(indices, weights)

    model = am.compose(llama, library, Broken({"reverse": 0.5, "celsius": 0.5}))
    message = "NaN or infinite" if damage == "nan" else r"valid ids are -1 \(an empty slot\) to 1"
    with pytest.raises(am.RouterOutputError, match=message):
        model(torch.tensor([[1, 2, 3]]))


PUBLISHER = """
import sys, time
from pathlib import Path
from adaptermix.library.owned import publish_folder
target, label = Path(sys.argv[1]), sys.argv[2]
def write(folder):
    for i in range(5):
        (folder / f"part{i}").write_text(label)
        time.sleep(0.05)
publish_folder(target, write, "converted base model")
print("done", flush=True)
"""


def test_two_processes_publishing_one_folder_never_mix_files(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "model"
    (tmp_path / ".model.partial").mkdir()                 # what a killed conversion of old left behind
    children = [subprocess.Popen([sys.executable, "-P", "-c", PUBLISHER, str(target), label],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for label in "ab"]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0 and out.strip() == "done", err
    labels = {p.read_text() for p in target.iterdir() if p.name.startswith("part")}
    assert len(labels) == 1 and len(list(target.glob("part*"))) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.partial", "model"]   # no staging left
    remove_owned(target, "converted base model")


KERNEL_BUILD = """
import hashlib, os, sys
from pathlib import Path
from adaptermix.kernels import cpu_backend
tag = hashlib.sha256((cpu_backend.SOURCE.read_text() + cpu_backend._cpu_signature()).encode()).hexdigest()[:16]
stale = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / f"adaptermix_cpu_{tag}"
stale.mkdir(parents=True)
(stale / "lock").write_text("")      # torch's lock file, left by a build killed midway
print(cpu_backend.available(), cpu_backend.build_error(), flush=True)
folder = cpu_backend._build_root() / f"cpu_{tag}"
assert cpu_backend._cached_library(folder) is not None
built = next(folder.glob("*.so"))
data = bytearray(built.read_bytes())
data[len(data) // 2] ^= 1
(folder / "damaged").write_bytes(data)
os.replace(folder / "damaged", built)   # a new file: the loaded one stays mapped intact
print(cpu_backend._cached_library(folder) is None, flush=True)
"""


def test_the_native_kernel_build_ignores_a_stale_lock_and_checks_its_cache(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-P", "-c", KERNEL_BUILD], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ["True", "None", "True"], child.stdout


def test_a_router_artifact_is_read_like_every_library_file(library, tmp_path):
    import torch

    library.save_artifact("gate", {"w": torch.ones(2, 3)}, {"kind": "gate"})
    tensors, metadata = library.load_artifact("gate")
    assert torch.equal(tensors["w"], torch.ones(2, 3)) and metadata == {"kind": "gate"}
    path = library.root / "routers" / "gate.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-5])                                   # truncated: offsets beyond the file
    with pytest.raises(am.AdapterFormatError, match="gate.safetensors"):
        library.load_artifact("gate")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(data)
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(am.UnsafeLibraryError, match="symbolic link"):
        library.load_artifact("gate")


def test_a_linked_catalog_is_refused_on_open(library, tmp_path):
    library.close()
    real = tmp_path / "elsewhere.sqlite"
    (library.root / "catalog.sqlite").rename(real)
    (library.root / "catalog.sqlite").symlink_to(real)
    with pytest.raises(am.UnsafeLibraryError, match="symbolic link"):
        am.AdapterLibrary.open(library.root)
