"""Persisting derived data: tensor dicts as files (memory-mapped) or as catalog blobs, keyed by
(kind, config hash, key) where key is the adapter's content hash or text hash."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load, save as st_save

from . import faults
from .catalog import Catalog
from .derived import DerivedKind
from .errors import LibraryError
from .files import library_file, write_temp

__all__ = ["DerivedStore", "PendingFile"]


@dataclass
class PendingFile:
    """Bytes to be written to `relpath` inside a write transaction."""

    relpath: str
    data: bytes
    sha256: str

    @classmethod
    def of(cls, relpath: str, data: bytes) -> "PendingFile":
        return cls(relpath, data, hashlib.sha256(data).hexdigest())


class DerivedStore:
    def __init__(self, root: Path, catalog: Catalog):
        self.root, self.catalog = Path(root), catalog

    def relpath(self, kind: DerivedKind, key: str) -> str:
        return f"derived/{kind.kind}/{kind.config_hash}/{key[:32]}.safetensors"

    def encode(self, kind: DerivedKind, key: str, tensors: dict[str, torch.Tensor]) -> tuple[PendingFile | None, bytes | None, str]:
        data = st_save({k: v.contiguous() for k, v in tensors.items()})
        sha = hashlib.sha256(data).hexdigest()
        if kind.stored_as == "file":
            return PendingFile(self.relpath(kind, key), data, sha), None, sha
        return None, data, sha

    def put(self, kind: DerivedKind, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Inside a catalog write: store one item (file moved into place, or blob)."""
        pending, blob, sha = self.encode(kind, key, tensors)
        file = None
        if pending is not None:
            self.place(pending)
            file = pending.relpath
        self.catalog.put_derived(kind.kind, kind.config_hash, key, file=file, data=blob, sha256=sha,
                                 config=kind.config)

    def place(self, pending: PendingFile) -> None:
        """Inside a catalog write: write to tmp/, fsync, rename into place; undone if the write fails."""
        target = self.root / pending.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target = library_file(self.root, pending.relpath)   # no link on the way out of the library
        existed = target.exists()
        temp = write_temp(self.root / "tmp", pending.data)
        faults.point("rename")
        os.replace(temp, target)
        if not existed:
            self.catalog.track_new_file(target)

    def get(self, kind: DerivedKind, key: str, names: list[str] | None = None) -> dict[str, torch.Tensor] | None:
        """The stored tensors (only `names` that exist, if given), or None if this item was never derived."""
        row = self.catalog.derived_row(kind.kind, kind.config_hash, key)
        if row is None:
            return None
        if row["data"] is not None:
            tensors = st_load(bytes(row["data"]))
            return tensors if names is None else {n: tensors[n] for n in names if n in tensors}
        path = library_file(self.root, row["file"])
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = set(handle.keys())
                return {n: handle.get_tensor(n) for n in (stored if names is None else names) if n in stored}
        except (OSError, RuntimeError) as exc:
            raise LibraryError(f"derived file {path} is unreadable: {exc}; run verify()") from exc

    def missing(self, kind: DerivedKind, needed: set[str]) -> set[str]:
        return needed - self.catalog.derived_keys(kind.kind, kind.config_hash)

    def collect_garbage(self) -> list[Path]:
        """Inside a catalog write: drop rows no adapter references; return their files to delete after commit."""
        files = []
        for row in self.catalog.unreferenced_derived():
            self.catalog.delete_derived(row["kind"], row["config_hash"], row["key"])
            if row["file"]:
                files.append(library_file(self.root, row["file"]))
        return files
