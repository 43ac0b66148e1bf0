"""Persisting derived data: tensor dicts as files or as catalog blobs, keyed by (kind, config hash, key)
where key is the adapter's content hash or text hash.

Every read checks the bytes against the catalog's record before a tensor is made, as for adapter files:
a file by its size and word sum (tensor_file.py; sha256 for rows written before that column existed), a
blob by its sha256 (blobs are a few KB). A mismatch is a CorruptAdapterError naming the item: derived data
is never used silently when damaged."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from . import faults
from .catalog import Catalog
from .derived import DerivedKind
from .errors import AdapterFormatError, CorruptAdapterError, CorruptCatalogError, LibraryError
from .files import library_file, write_temp
from .tensor_file import content_check, parse_safetensors, read_checked

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
        file = check = None
        if pending is not None:
            self.place(pending)
            file, check = pending.relpath, content_check(pending.data)
        self.catalog.put_derived(kind.kind, kind.config_hash, key, file=file, data=blob, sha256=sha,
                                 config=kind.config, file_check=check)

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
        """The stored tensors (only `names` that exist, if given), or None if this item was never derived.
        CorruptAdapterError if the bytes differ from the record, or the file is gone (which is also what a
        reader sees when a writer removed the item after this row was read: callers can tell)."""
        row = self.catalog.derived_row(kind.kind, kind.config_hash, key)
        if row is None:
            return None
        label = f"derived {kind.kind} data {key[:12]}"
        buffer = self._checked_bytes(row, label)
        try:
            _, tensors = parse_safetensors(buffer, label)
        except AdapterFormatError as exc:
            raise CorruptAdapterError(f"{exc}; run verify()") from exc
        return tensors if names is None else {n: tensors[n] for n in names if n in tensors}

    def _checked_bytes(self, row, label: str) -> bytearray:
        """The stored bytes of a derived row, checked against the catalog's record of them."""
        check = row["file_check"] if "file_check" in row.keys() else None
        if not isinstance(row["sha256"], str) or not (check is None or isinstance(check, str)):
            raise CorruptCatalogError(f"catalog row of {label} is malformed: its hashes are not text")
        if row["file"] is None:
            data = row["data"]
            if not isinstance(data, bytes):
                raise CorruptCatalogError(f"catalog row of {label} is malformed: its data is not a blob")
            if hashlib.sha256(data).hexdigest() != row["sha256"]:
                raise CorruptAdapterError(f"{label}: the blob in the catalog does not match its recorded sha256 "
                                          "(the catalog is damaged); run verify(), then restore it from a backup")
            return bytearray(data)
        path = library_file(self.root, row["file"])
        try:
            return read_checked(path, check, None if check else row["sha256"])
        except CorruptAdapterError as exc:
            raise CorruptAdapterError(f"{label}: {exc}") from exc
        except FileNotFoundError:
            raise CorruptAdapterError(f"{label}: its file {path} is missing; run verify()") from None
        except OSError as exc:
            raise LibraryError(f"{label}: file {path} is unreadable: {exc}; run verify()") from exc

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
