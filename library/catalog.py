"""The SQLite catalog of a library: one row per adapter, derived data, and library metadata.

WAL journal, synchronous=FULL. Every change runs in `write()`: BEGIN IMMEDIATE takes the single writer
lock (other processes wait up to `busy_timeout` seconds, then get LibraryBusyError), and a failure rolls
back the catalog and removes any file the transaction had moved into place.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import faults
from .errors import CorruptCatalogError, LibraryBusyError, LibraryError

__all__ = ["Catalog", "AdapterRecord", "FORMAT_VERSION"]

FORMAT_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    content_hash TEXT NOT NULL UNIQUE,
    text_hash TEXT NOT NULL,
    file TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    base_model TEXT NOT NULL,
    dtype TEXT NOT NULL,
    max_rank INTEGER NOT NULL,
    num_modules INTEGER NOT NULL,
    num_parameters INTEGER NOT NULL,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,
    examples TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    file_check TEXT
);
CREATE TABLE IF NOT EXISTS derived (
    kind TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    key TEXT NOT NULL,
    file TEXT,
    data BLOB,
    sha256 TEXT NOT NULL,
    file_check TEXT,
    PRIMARY KEY (kind, config_hash, key)
);
CREATE TABLE IF NOT EXISTS derived_configs (
    kind TEXT NOT NULL, config_hash TEXT NOT NULL, config TEXT NOT NULL,
    PRIMARY KEY (kind, config_hash)
);
"""


_TEXT_FIELDS = ("name", "content_hash", "text_hash", "file", "file_sha256", "fingerprint", "base_model", "dtype",
                "description", "source")


@dataclass(frozen=True)
class AdapterRecord:
    """Catalog metadata of one adapter (no tensors)."""

    id: int
    name: str
    content_hash: str
    text_hash: str
    file: str
    file_sha256: str
    fingerprint: str
    base_model: str
    dtype: str
    max_rank: int
    num_modules: int
    num_parameters: int
    description: str
    tags: tuple[str, ...]
    examples: tuple[str, ...]
    source: str
    created: float
    updated: float
    file_check: str | None = None  # "<size>:<64-bit word sum>", checked on every read (tensor_file.py)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "AdapterRecord":
        data = dict(row)
        try:
            for key in ("tags", "examples"):
                data[key] = tuple(json.loads(data[key]))
                if not all(isinstance(text, str) for text in data[key]):
                    raise ValueError(f"{key} must be a list of strings")
            for key in _TEXT_FIELDS:
                if not isinstance(data[key], str):
                    raise ValueError(f"{key} must be text, not {type(data[key]).__name__}")
            if data.get("file_check") is not None and not isinstance(data["file_check"], str):
                raise ValueError("file_check must be text")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise CorruptCatalogError(f"catalog row of adapter {data.get('name')!r} is malformed: {exc}") from exc

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class Catalog:
    def __init__(self, path: Path, busy_timeout: float = 60.0):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
                raise LibraryBusyError(f"library {self.path.parent} is locked by another process; try again") from exc
            raise CorruptCatalogError(f"{self.path} is not a readable adaptermix catalog ({exc}); restore it "
                                      "from a backup, or rebuild the library from its checkpoints") from exc
        self._moved: list[Path] | None = None
        if faults.hook is not None:            # crash testing: every SQL statement is a fault point
            self.conn.set_trace_callback(faults.sql_point)

    def initialise(self, meta: dict[str, str]) -> None:
        with self.write():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self.conn.execute(statement)
            for key, value in {"format_version": FORMAT_VERSION, "generation": "0", **meta}.items():
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def check_format(self) -> None:
        try:
            version = self.get_meta("format_version")
        except sqlite3.DatabaseError as exc:
            raise CorruptCatalogError(f"{self.path} is not a readable adaptermix catalog ({exc}); restore it "
                                      "from a backup, or rebuild the library from its checkpoints") from exc
        if version != FORMAT_VERSION:
            raise LibraryError(f"{self.path}: library format {version!r}, this adaptermix reads {FORMAT_VERSION!r}")
        self._add_file_check_columns()

    def _add_file_check_columns(self) -> None:
        """Libraries made before the cheap content check get its columns (adapters, and derived files). NULL:
        reads of those rows fall back to sha256."""
        def missing() -> list[str]:
            return [t for t in ("adapters", "derived")
                    if "file_check" not in {r[1] for r in self.conn.execute(f"PRAGMA table_info({t})")}]

        if not missing():
            return
        try:
            with self.write():
                for table in missing():
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN file_check TEXT")
        except (LibraryBusyError, sqlite3.OperationalError):
            pass  # read-only or busy: the columns are added by the next writer that opens it

    # -- transactions ----------------------------------------------------------------------------

    @contextmanager
    def write(self):
        """One atomic change. Files moved into place with `track_new_file` are removed on failure."""
        if self._moved is not None:  # nested: join the outer transaction
            yield self.conn
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LibraryBusyError(
                    f"library {self.path.parent} is being written by another process "
                    f"(waited {self.busy_timeout:.0f}s); try again") from exc
            raise
        self._moved = []
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            for path in self._moved:
                path.unlink(missing_ok=True)
            raise
        finally:
            self._moved = None

    @contextmanager
    def snapshot(self):
        """Several reads that see one committed state (a WAL read transaction); inside write(), that one."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    def track_new_file(self, path: Path) -> None:
        assert self._moved is not None, "files are moved into place only inside write()"
        self._moved.append(path)

    def bump_generation(self) -> int:
        """Count one more committed change (the search index compares against this). Returns the new value."""
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return int(self.get_meta("generation"))

    # -- queries ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def record(self, name: str) -> AdapterRecord | None:
        row = self.conn.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        return None if row is None else AdapterRecord.from_row(row)

    def record_by_content(self, content_hash: str) -> AdapterRecord | None:
        row = self.conn.execute("SELECT * FROM adapters WHERE content_hash = ?", (content_hash,)).fetchone()
        return None if row is None else AdapterRecord.from_row(row)

    def records(self) -> list[AdapterRecord]:
        return [AdapterRecord.from_row(r) for r in self.conn.execute("SELECT * FROM adapters ORDER BY id")]

    def names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM adapters ORDER BY id")]

    def names_by_id(self, ids: list[int]) -> dict[int, str]:
        marks = ", ".join("?" for _ in ids)
        return dict(self.conn.execute(f"SELECT id, name FROM adapters WHERE id IN ({marks})", ids).fetchall())

    def ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT id FROM adapters")]

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def insert_adapter(self, fields: dict) -> int:
        now = time.time()
        fields = {**fields, "tags": json.dumps(list(fields["tags"])),
                  "examples": json.dumps(list(fields["examples"])), "created": now, "updated": now}
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        cursor = self.conn.execute(f"INSERT INTO adapters ({columns}) VALUES ({marks})", tuple(fields.values()))
        return cursor.lastrowid

    def update_adapter(self, name: str, fields: dict) -> None:
        fields = dict(fields, updated=time.time())
        for key in ("tags", "examples"):
            if key in fields:
                fields[key] = json.dumps(list(fields[key]))
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE adapters SET {assignments} WHERE name = ?", (*fields.values(), name))

    def delete_adapter(self, name: str) -> None:
        self.conn.execute("DELETE FROM adapters WHERE name = ?", (name,))

    # -- derived data ----------------------------------------------------------------------------

    def derived_keys(self, kind: str, config_hash: str) -> set[str]:
        rows = self.conn.execute("SELECT key FROM derived WHERE kind = ? AND config_hash = ?", (kind, config_hash))
        return {r[0] for r in rows}

    def derived_row(self, kind: str, config_hash: str, key: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM derived WHERE kind = ? AND config_hash = ? AND key = ?",
                                 (kind, config_hash, key)).fetchone()

    def derived_rows(self, kind: str | None = None):
        if kind is None:
            return self.conn.execute("SELECT * FROM derived").fetchall()
        return self.conn.execute("SELECT * FROM derived WHERE kind = ?", (kind,)).fetchall()

    def put_derived(self, kind, config_hash, key, *, file=None, data=None, sha256: str, config: dict,
                    file_check: str | None = None) -> None:
        self.conn.execute("INSERT OR REPLACE INTO derived (kind, config_hash, key, file, data, sha256, file_check) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)", (kind, config_hash, key, file, data, sha256, file_check))
        self.conn.execute("INSERT OR IGNORE INTO derived_configs VALUES (?, ?, ?)",
                          (kind, config_hash, json.dumps(config, sort_keys=True)))

    def unreferenced_derived(self) -> list[sqlite3.Row]:
        """Derived rows whose key no adapter has any more (after a remove, replace or text change)."""
        return self.conn.execute(
            "SELECT * FROM derived WHERE key NOT IN (SELECT content_hash FROM adapters) "
            "AND key NOT IN (SELECT text_hash FROM adapters)").fetchall()

    def delete_derived(self, kind: str, config_hash: str, key: str) -> None:
        self.conn.execute("DELETE FROM derived WHERE kind = ? AND config_hash = ? AND key = ?",
                          (kind, config_hash, key))

    def close(self) -> None:
        self.conn.close()
