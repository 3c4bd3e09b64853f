"""Atomic writes and links leave either the old or the new state, and clean up after themselves."""

import os

import pytest

from unbounded_agent import fsutil


def test_atomic_write_replaces_content_and_sets_mode(tmp_path):
    p = tmp_path / "f"
    p.write_text("old")
    fsutil.atomic_write(p, b"new", mode=0o600)
    assert p.read_bytes() == b"new"
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_atomic_symlink_replaces_an_existing_link(tmp_path):
    link = tmp_path / "l"
    os.symlink("a", link)
    fsutil.atomic_symlink("b", link)
    assert os.readlink(link) == "b"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["l"]


def test_failed_copy_leaves_no_temporary_and_no_target(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsutil.atomic_copy(tmp_path / "absent", tmp_path / "dest")
    assert list(tmp_path.iterdir()) == []
