"""Library upkeep: recovery after an interrupted write, `verify()`, and filling in missing derived data.

`verify_storage` needs only the catalog (no torch): the CLI's `verify` runs it alone, in well under a second."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

from tqdm.auto import tqdm

from . import faults
from .errors import AdapterFormatError, AdaptermixError, LibraryBusyError, UnsafeLibraryError
from .paths import library_file

__all__ = ["recover", "delete_unreferenced", "verify", "verify_storage", "ensure_derived"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stored_files(root: Path) -> set[str]:
    """Every .safetensors entry (file or link) under adapters/ and derived/; links are never followed."""
    files = set()
    for folder in ("adapters", "derived"):
        for parent, dirs, names in os.walk(root / folder, followlinks=False):
            links = [d for d in dirs if os.path.islink(os.path.join(parent, d))]
            for name in [*names, *links]:
                if name.endswith(".safetensors"):
                    files.add(Path(parent, name).relative_to(root).as_posix())
    return files


def _temp_files(root: Path) -> list[Path]:
    return [p for p in (root / "tmp").glob("*") if p.is_symlink() or not p.is_dir()]


def _referenced_files(conn: sqlite3.Connection) -> set[str]:
    files = {r[0] for r in conn.execute("SELECT file FROM adapters")}
    return files | {r[0] for r in conn.execute("SELECT file FROM derived WHERE file IS NOT NULL")}


def _is_referenced(conn: sqlite3.Connection, rel: str) -> bool:
    return conn.execute("SELECT 1 FROM adapters WHERE file = ? UNION ALL SELECT 1 FROM derived WHERE file = ? "
                        "LIMIT 1", (rel, rel)).fetchone() is not None


def recover(library) -> None:
    """Under the writer lock (skipped if another process holds it): drop temp files and files that no
    committed row references. Such files exist only if a writer died between rename and COMMIT, or
    between COMMIT and the clean-up after it."""
    def sweep():
        for leftover in _temp_files(library.root):
            leftover.unlink(missing_ok=True)
        for folder in ("index", "routers"):      # write_atomic's temp files beside their targets
            for leftover in (library.root / folder).glob(".tmp-*"):
                leftover.unlink(missing_ok=True)
        for rel in _stored_files(library.root) - _referenced_files(library.catalog.conn):
            (library.root / rel).unlink(missing_ok=True)

    _if_unlocked(library.catalog, sweep)


def delete_unreferenced(library, files: list[Path]) -> None:
    """After a commit: delete those of `files` that no committed row references, under the writer lock, so
    that no other writer can commit a row pointing at one of them in between (content-addressed files
    are shared). Skipped if another writer holds the lock: the next open's `recover` deletes them."""
    def sweep():
        for path in files:
            if not _is_referenced(library.catalog.conn, path.relative_to(library.root).as_posix()):
                faults.point("unlink")
                path.unlink(missing_ok=True)

    if files:
        _if_unlocked(library.catalog, sweep)


def _if_unlocked(catalog, action) -> bool:
    """Run `action` in a write transaction if the writer lock is free now; False if it is not."""
    catalog.conn.execute("PRAGMA busy_timeout = 0")
    try:
        with catalog.write():
            action()
        return True
    except LibraryBusyError:
        return False  # a live writer; whatever it leaves behind it commits or the next open removes
    finally:
        catalog.conn.execute(f"PRAGMA busy_timeout = {int(catalog.busy_timeout * 1000)}")


def verify_storage(root: Path, catalog) -> list[str]:
    """What can be checked from the catalog alone: SQLite's integrity, every adapter and derived file inside
    the library, present and matching its recorded hash, no orphan or leftover temp file. Problems found;
    empty when sound."""
    conn, problems = catalog.conn, []
    if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
        problems.append("catalog.sqlite fails SQLite's integrity check")
    for record in catalog.records():
        try:
            path = library_file(root, record.file)
        except UnsafeLibraryError as exc:
            problems.append(f"{record.name}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{record.name}: adapter file {record.file} is missing")
        elif _sha256(path) != record.file_sha256:
            problems.append(f"{record.name}: adapter file {record.file} does not match its recorded hash")
    for row in catalog.derived_rows():
        label = f"derived {row['kind']}/{row['config_hash']}/{row['key'][:12]}"
        if row["file"]:
            try:
                path = library_file(root, row["file"])
            except UnsafeLibraryError as exc:
                problems.append(f"{label}: {exc}")
                continue
            if not path.is_file():
                problems.append(f"{label}: file {row['file']} is missing")
            elif _sha256(path) != row["sha256"]:
                problems.append(f"{label}: file {row['file']} does not match its recorded hash")
        elif not isinstance(row["data"], bytes):
            problems.append(f"{label}: the catalog row holds neither a file nor a blob")
        elif hashlib.sha256(row["data"]).hexdigest() != row["sha256"]:
            problems.append(f"{label}: stored blob does not match its recorded hash")
    orphans = sorted(_stored_files(root) - _referenced_files(conn))
    problems += [f"orphan file not in the catalog: {rel}" for rel in orphans]
    problems += [f"leftover temp file: {p.name}" for p in _temp_files(root)]
    return problems


def verify(library, deep: bool = False) -> list[str]:
    """Problems found (empty when sound): `verify_storage`, derived data present for this handle's configs,
    and with `deep` every adapter loaded, validated and re-hashed."""
    problems = verify_storage(library.root, library.catalog)
    records = library.records()
    broken = {p.split(":", 1)[0] for p in problems}
    if deep:
        for record in records:
            if record.name not in broken:
                problems += _deep_check(library, record)
    for kind in (library.arrow, library.sketch):
        for key in library.derived.missing(kind, {r.content_hash for r in records}):
            problems.append(f"{_owner(records, key)}: no {kind.kind} data for config {kind.config_hash}")
    return problems


def _owner(records, key: str) -> str:
    return next((r.name for r in records if key in (r.content_hash, r.text_hash)), key[:12])


def _deep_check(library, record) -> list[str]:
    from .validation import check_against_base

    try:
        adapter = library.get(record.name)
        adapter.validate()
        check_against_base(adapter, library.base_model, check_name=False)
    except (AdaptermixError, AdapterFormatError) as exc:
        return [f"{record.name}: {exc}"]
    if adapter.content_hash() != record.content_hash:
        return [f"{record.name}: content hash differs from the catalog"]
    return []


def ensure_derived(library, kinds, names, progress: bool) -> int:
    """Compute what the current configs need and the catalog lacks; commit in chunks of 32."""
    records = library.records() if names is None else [library.record(n) for n in names]
    made = 0
    for kind_name in kinds:
        if kind_name == "text":
            made += _ensure_text(library, records, progress)
            continue
        kind = {"arrow": library.arrow, "sketch": library.sketch}[kind_name]
        missing = library.derived.missing(kind, {r.content_hash for r in records})
        todo = [r for r in records if r.content_hash in missing]
        for start in tqdm(range(0, len(todo), 32), desc=f"derive {kind_name}", disable=not progress or len(todo) < 32):
            chunk = todo[start:start + 32]
            computed = [(r.content_hash, kind.compute(library.get(r.name), library.base_model)) for r in chunk]
            with library.catalog.write():
                for key, tensors in computed:
                    library.derived.put(kind, key, tensors)
            made += len(chunk)
    return made


def _ensure_text(library, records, progress: bool) -> int:
    from .derived import adapter_texts

    kind = library.text_kind
    missing = library.derived.missing(kind, {r.text_hash for r in records})
    todo = {r.text_hash: adapter_texts(r.name, r.description, r.examples) for r in records if r.text_hash in missing}
    keys = list(todo)
    for start in tqdm(range(0, len(keys), 256), desc="embed texts", disable=not progress or len(keys) < 256):
        chunk = keys[start:start + 256]
        computed = kind.compute_many([todo[k] for k in chunk])
        with library.catalog.write():
            for key, tensors in zip(chunk, computed):
                library.derived.put(kind, key, tensors)
            library.catalog.bump_generation()
    return len(keys)
