"""Where a library keeps its files, and the checks every path from a catalog passes before it is touched.

Plain pathlib (no torch): `adaptermix verify` checks a library's files through this module alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UnsafeLibraryError

__all__ = ["LAYOUT", "library_file", "check_layout"]

LAYOUT = ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "adapters", "derived", "index", "tmp",
          "routers")
# What a catalog `file` field may name: a .safetensors file under adapters/ or derived/, nothing else.
_FILE_FIELD = re.compile(r"^(adapters|derived)(/[A-Za-z0-9_.=-]+)+\.safetensors$")


def library_file(root: Path, rel) -> Path:
    """The path of a catalog `file` field inside the library at `root`, checked before any read or delete:
    relative, under adapters/ or derived/, no '.' / '..' / empty parts, no symbolic link on the way, and
    resolving inside the library. A library from someone else cannot make us touch anything outside it."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if not (isinstance(rel, str) and _FILE_FIELD.match(rel)) or any(p in ("", ".", "..") for p in parts):
        raise UnsafeLibraryError(f"{root}: the catalog names the file {rel!r}, which is not a file inside the "
                                 "library (adapters/... or derived/...); refusing to read or delete it")
    path = Path(root)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UnsafeLibraryError(f"{path} is a symbolic link; a library may not hold links (they can point "
                                     "anywhere), so it is not followed")
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise UnsafeLibraryError(f"{path} resolves outside the library {root}; refusing to touch it")
    return path


def check_layout(root: Path) -> None:
    """Refuse a library whose own folders or catalog are symbolic links (they could point anywhere)."""
    for name in LAYOUT:
        if (Path(root) / name).is_symlink():
            raise UnsafeLibraryError(f"{Path(root) / name} is a symbolic link; a library may not hold links "
                                     "(they can point anywhere). Replace it with the real folder or file")
