"""Removing a machine tree: never through a symlink, never across a mount."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import treeremove

LIB = str(Path(__file__).resolve().parents[2] / "lib")


def test_mountinfo_escapes_and_order(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "30 22 0:5 / /var/lib/machines/kube2 rw - tmpfs tmpfs rw\n"
        "31 30 8:1 /srv /var/lib/machines/kube2/my\\040data rw - ext4 /dev/sda1 rw\n"
        "32 22 8:1 /srv /var/lib/machines/kube20 rw - ext4 /dev/sda1 rw\n")
    assert treeremove.mounts_at_or_below("/var/lib/machines/kube2", str(info)) == [
        "/var/lib/machines/kube2/my data", "/var/lib/machines/kube2"]


def test_a_symlinked_tree_is_unlinked_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "kube1").symlink_to(target)
    assert treeremove.remove_tree(str(tmp_path / "kube1")) == "symlink"
    assert (target / "keep").read_text() == "x"


def test_symlinks_inside_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    tree = tmp_path / "kube1"
    (tree / "usr").mkdir(parents=True)
    (tree / "bin").symlink_to("usr/bin")
    (tree / "escape").symlink_to(outside)
    (tree / "usr" / "f").write_text("y")
    assert treeremove.remove_tree(str(tree)) == "directory"
    assert not tree.exists() and (outside / "keep").read_text() == "x"


def test_absent_is_none(tmp_path):
    assert treeremove.remove_tree(str(tmp_path / "nope")) is None


def _in_private_mount_namespace(script: str) -> subprocess.CompletedProcess:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private mount namespace")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
                          capture_output=True, text=True, timeout=60)


def test_a_bind_mount_inside_is_unmounted_and_its_data_kept(tmp_path):
    script = f"""
mkdir -p {tmp_path}/data {tmp_path}/tree/mnt
echo precious > {tmp_path}/data/f
mount --bind {tmp_path}/data {tmp_path}/tree/mnt
/usr/bin/python3 -c 'import sys; sys.path.insert(0, "{LIB}"); from unbounded_agent.reset import treeremove; print(treeremove.remove_tree("{tmp_path}/tree"))'
"""
    r = _in_private_mount_namespace(script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "directory"
    assert not (tmp_path / "tree").exists()
    assert (tmp_path / "data" / "f").read_text() == "precious\n"


def test_a_busy_mount_is_refused_and_nothing_is_deleted(tmp_path):
    script = f"""
mkdir -p {tmp_path}/data {tmp_path}/tree/mnt
echo precious > {tmp_path}/data/f
echo mine > {tmp_path}/tree/own
mount --bind {tmp_path}/data {tmp_path}/tree/mnt
cd {tmp_path}/tree/mnt   # a working directory inside keeps the mount busy
/usr/bin/python3 -c 'import sys; sys.path.insert(0, "{LIB}"); from unbounded_agent.reset import treeremove
from unbounded_agent.reasons import OpsError
try:
    treeremove.remove_tree("{tmp_path}/tree")
except OpsError as e:
    print(e.reason.value, e.message)'
cat {tmp_path}/tree/mnt/f
"""
    r = _in_private_mount_namespace(script)
    assert r.returncode == 0, r.stderr
    first, data = r.stdout.splitlines()
    assert first.startswith("UnsafeRemoval refusing to remove") and "busy" in first
    assert data == "precious"
    assert (tmp_path / "tree" / "own").read_text() == "mine\n"


def test_a_mount_that_appears_during_the_walk_stops_it(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    real = treeremove._mnt_id
    sub_inode = (tree / "sub").stat().st_ino

    def fake(fd):  # "sub" looks like another mount (as a bind mount made meanwhile would)
        return real(fd) + (1 if os.fstat(fd).st_ino == sub_inode else 0)

    monkeypatch.setattr(treeremove, "_mnt_id", fake)
    with pytest.raises(OpsError) as e:
        treeremove.remove_tree(str(tree))
    assert e.value.reason is Reason.UNSAFE_REMOVAL and "sub" in e.value.message
    assert (tree / "sub" / "f").read_text() == "x"  # the dry walk refused before deleting anything
