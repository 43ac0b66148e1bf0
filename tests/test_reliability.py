"""Reliability and security of the library store: nothing outside what adaptermix made is ever deleted,
hostile libraries are refused, corrupt content is caught on read, failures are whole or nothing."""

import json
import os

import pytest

import adaptermix as am
from adaptermix.library.errors import FolderNotOwnedError
from adaptermix.library.owned import MARKER, make_owned, remove_owned


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
