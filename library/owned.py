"""Folders adaptermix may delete: only those it created and marked as its own, for one named purpose.

    make_owned(folder, "example library")      # creates the folder (must be new or empty) and marks it
    remove_owned(folder, "example library")    # rmtree, only if the marker says so; else FolderNotOwnedError
    check_replaceable(folder, "example library")  # the same refusal up front, before long work

    publish_folder(target, write, "base model")  # write into a per-process staging folder, rename into place

The marker is a small JSON file inside the folder. A folder without it (a user's library, a home folder), a
marker for another purpose, or a symbolic link is never removed: the error names the folder and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FolderNotOwnedError
from .files import fsync_dir, write_atomic

__all__ = ["MARKER", "make_owned", "mark_owned", "is_owned", "check_replaceable", "remove_owned",
           "publish_folder"]

MARKER = ".adaptermix-owned"


def mark_owned(folder: Path, purpose: str) -> None:
    """Mark an existing folder, which this process has just created, as adaptermix's for `purpose`."""
    write_atomic(Path(folder) / MARKER, json.dumps({"purpose": purpose, "pid": os.getpid()}).encode())


def make_owned(folder: Path, purpose: str) -> Path:
    """Create `folder` (absent or empty) and mark it as adaptermix's for `purpose`."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and any(folder.iterdir())):
        raise FolderNotOwnedError(f"{folder} exists and is not empty; adaptermix only writes its {purpose} "
                                  "into a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    mark_owned(folder, purpose)
    return folder


def is_owned(folder: Path, purpose: str) -> bool:
    folder, marker = Path(folder), Path(folder) / MARKER
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("purpose") == purpose
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(folder: Path, purpose: str) -> bool:
    """True if `folder` exists and adaptermix may replace it (marked for `purpose`); False if it is absent;
    FolderNotOwnedError if it is anything else (a user's folder, a link, another purpose's folder)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    if not is_owned(folder, purpose):
        raise FolderNotOwnedError(
            f"{folder} is not an adaptermix {purpose} (no {MARKER} marker for it), so it was left untouched; "
            "pass a new or empty folder instead, or move or delete this one yourself")
    return True


def remove_owned(folder: Path, purpose: str) -> None:
    """Delete `folder` and everything in it, only if adaptermix created and marked it for `purpose`."""
    if check_replaceable(folder, purpose):
        shutil.rmtree(folder)


def publish_folder(target: Path, write, purpose: str) -> Path:
    """Make `target` with `write(folder)` in a staging folder of this process beside it, then rename it into
    place in one step. Concurrent processes never share a staging folder; if another one published first,
    ours is discarded and theirs kept. The result is marked as adaptermix's for `purpose`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_owned(Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-")), purpose)
    try:
        write(staging)
        try:
            os.replace(staging, target)      # `target` absent or an empty folder
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                raise
            remove_owned(staging, purpose)   # another process published it first
        fsync_dir(target.parent)
    except BaseException:
        remove_owned(staging, purpose)
        raise
    return target
