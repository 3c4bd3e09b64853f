"""Atomic writes and links leave either the old or the new state, and clean up after themselves."""

import os

import pytest

from unbounded_agent import fsutil
from unbounded_agent.reasons import OpsError, Reason


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


def test_free_space_check_passes_when_there_is_room(tmp_path):
    fsutil.check_free_space(tmp_path, 1)


def test_free_space_check_names_need_availability_and_path(tmp_path):
    st = os.statvfs(tmp_path)
    too_much = st.f_bavail * st.f_frsize + 1
    with pytest.raises(OpsError) as e:
        fsutil.check_free_space(tmp_path, too_much)
    assert e.value.reason == Reason.INSUFFICIENT_SPACE
    assert f"needs {too_much} bytes" in e.value.message
    assert str(tmp_path) in e.value.message


def test_free_space_check_on_a_missing_path_is_an_execution_failure(tmp_path):
    with pytest.raises(OpsError) as e:
        fsutil.check_free_space(tmp_path / "absent", 1)
    assert e.value.reason == Reason.EXECUTION_FAILED


def test_stale_temp_files_are_swept_and_nothing_else(tmp_path):
    from unbounded_agent.fsutil import atomic_write, remove_stale_temps

    (tmp_path / "events").mkdir()
    atomic_write(tmp_path / "a.json", b"{}")
    atomic_write(tmp_path / "events" / "journal.json", b"{}")
    left = [tmp_path / ".a.json.tmp-0a1b2c3d", tmp_path / "events" / ".journal.json.tmp-deadbeef"]
    for p in left:
        p.write_bytes(b"half")
    (tmp_path / ".hidden").write_bytes(b"kept")
    assert sorted(remove_stale_temps(tmp_path, depth=2)) == sorted(left)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        ".hidden", "a.json", "events", "events/journal.json"]
    assert remove_stale_temps(tmp_path / "missing") == []
