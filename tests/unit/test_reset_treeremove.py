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


def _deep_tree(root: Path, levels: int) -> None:
    """levels nested directories under root, made through descriptors (the path is longer than PATH_MAX)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(levels):
            os.mkdir("d", dir_fd=fd)
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
                f.write(str(i))
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_a_tree_1500_levels_deep_goes_with_few_descriptors(tmp_path):
    # In a child with room for 40 descriptors: a walk holding one per level could not get past level 40.
    _deep_tree(tmp_path / "tree", 1500)
    script = f"""
import resource, sys
sys.path.insert(0, {LIB!r})
from unbounded_agent.reset import treeremove
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
print(treeremove.remove_tree({str(tmp_path / "tree")!r}))
"""
    r = subprocess.run(["/usr/bin/python3", "-c", script], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout.strip()) == (0, "directory"), r.stderr
    assert not (tmp_path / "tree").exists()


def test_the_walk_never_holds_more_than_its_bound(tmp_path, monkeypatch):
    _deep_tree(tmp_path / "tree", 200)
    held, peak = set(), [0]
    real_open, real_close = os.open, os.close

    def tracking_open(*a, **kw):
        fd = real_open(*a, **kw)
        held.add(fd)
        peak[0] = max(peak[0], len(held))
        return fd

    def tracking_close(fd):
        held.discard(fd)
        real_close(fd)

    monkeypatch.setattr(treeremove.os, "open", tracking_open)
    monkeypatch.setattr(treeremove.os, "close", tracking_close)
    assert treeremove.remove_tree(str(tmp_path / "tree")) == "directory"
    assert peak[0] <= treeremove.MAX_OPEN + 3  # the window, the root, its parent and one being opened
    assert held == set()


def test_a_directory_moved_away_during_the_walk_stops_it(tmp_path, monkeypatch):
    _deep_tree(tmp_path / "tree", treeremove.MAX_OPEN + 5)
    (tmp_path / "keep").write_text("not the tree's")
    real_rmdir = os.rmdir
    moved = []

    def rmdir_then_move(name, dir_fd=None):
        real_rmdir(name, dir_fd=dir_fd)
        if not moved:  # the deepest directory went; now a directory high up, no longer held, moves elsewhere
            moved.append(True)
            os.rename(tmp_path / "tree" / "d" / "d", tmp_path / "elsewhere")
    monkeypatch.setattr(treeremove.os, "rmdir", rmdir_then_move)
    with pytest.raises(OpsError) as e:
        treeremove.remove_tree(str(tmp_path / "tree"))
    assert e.value.reason is Reason.UNSAFE_REMOVAL and "was moved while it was being removed" in e.value.message
    assert (tmp_path / "keep").read_text() == "not the tree's"  # going up led out of the tree: it stopped there


def test_a_symlinked_parent_is_followed_and_the_tree_is_not(tmp_path):
    srv = tmp_path / "srv" / "machines"
    (srv / "kube2" / "etc").mkdir(parents=True)
    (srv / "other").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (srv / "kube1").symlink_to(elsewhere)
    (tmp_path / "machines").symlink_to(srv)
    assert treeremove.remove_tree(str(tmp_path / "machines" / "kube2")) == "directory"
    assert treeremove.remove_tree(str(tmp_path / "machines" / "kube1")) == "symlink"
    assert sorted(p.name for p in srv.iterdir()) == ["other"]
    assert elsewhere.is_dir() and (tmp_path / "machines").is_symlink()


@pytest.mark.parametrize("flag", ["i", "a"])
def test_an_immutable_or_append_only_file_refuses_the_whole_tree(tmp_path, flag):
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("needs root and chattr")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "first").write_text("x")
    (tree / "a" / "b" / "locked").write_text("y")
    if subprocess.run(["chattr", f"+{flag}", str(tree / "a" / "b" / "locked")], capture_output=True).returncode:
        pytest.skip(f"this file system has no chattr +{flag}")
    try:
        with pytest.raises(OpsError) as e:
            treeremove.remove_tree(str(tree))
        assert e.value.reason is Reason.UNSAFE_REMOVAL
        assert "a/b/locked is " in e.value.message and "lsattr" in e.value.message
        assert (tree / "first").read_text() == "x"  # nothing was deleted
    finally:
        subprocess.run(["chattr", f"-{flag}", str(tree / "a" / "b" / "locked")], check=True)
    assert treeremove.remove_tree(str(tree)) == "directory"


BTRFS_SCRIPT = """
truncate -s 128M {img}
mkfs.btrfs -q -f {img} >/dev/null
mkdir -p {mnt}
mount -o loop {img} {mnt}
btrfs -q subvolume create {mnt}/kube1
mkdir -p {mnt}/kube1/var/lib
btrfs -q subvolume create {mnt}/kube1/var/lib/portables
echo x > {mnt}/kube1/var/lib/portables/f
btrfs -q subvolume snapshot -r {mnt}/kube1/var/lib/portables {mnt}/kube1/snap
btrfs -q subvolume create {mnt}/other
/usr/bin/python3 -c 'import sys; sys.path.insert(0, "{lib}"); from unbounded_agent.reset import treeremove; print(treeremove.remove_tree("{mnt}/kube1"))'
ls {mnt}
btrfs subvolume list {mnt}
"""


def test_btrfs_subvolumes_nested_and_read_only_are_removed(tmp_path):
    if not shutil.which("mkfs.btrfs") or "btrfs" not in Path("/proc/filesystems").read_text():
        pytest.skip("needs btrfs (apt-get install btrfs-progs)")
    r = _in_private_mount_namespace(BTRFS_SCRIPT.format(img=tmp_path / "img", mnt=tmp_path / "mnt", lib=LIB))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "directory"
    assert lines[1:] == ["other", lines[2]] and lines[2].endswith("path other")  # only "other" is left


def test_a_tree_written_into_while_it_is_removed_is_gone_over_again(tmp_path, monkeypatch):
    """The daemon still runs while the reset removes its state directory, and may record its progress there."""
    tree = tmp_path / "state"
    (tree / "machineoperations").mkdir(parents=True)
    (tree / "machineoperations" / "a.json").write_text("{}")
    runs = []
    real_run = treeremove._Walk.run

    def run_then_a_writer_comes(walk):
        real_run(walk)
        if walk.delete:
            runs.append(walk)
            if len(runs) == 1:  # right after the first pass emptied it
                (tree / "late.json").write_text("{}")

    monkeypatch.setattr(treeremove._Walk, "run", run_then_a_writer_comes)
    assert treeremove.remove_tree(str(tree)) == "directory"
    assert not tree.exists() and len(runs) == 2
