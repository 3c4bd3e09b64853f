"""Remove a directory tree without ever following a symlink or crossing into another mount.

A machine's root directory can have file systems mounted inside it (bind mounts of data that is
not ours, as kubeadm's and k3s's data-loss bugs show). So: unmount everything mounted at or below
the tree (deepest first, without MNT_DETACH: a busy mount is reported, not hidden), re-read the
mount table to verify, and only then delete — walking by directory file descriptors with
O_NOFOLLOW and checking that every directory is on the tree's own mount (its ``mnt_id``), so a
mount that appears meanwhile stops the removal instead of being emptied.
"""

import ctypes
import errno
import os
import stat

from ..reasons import OpsError, Reason

MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_at_or_below(path: str, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below path, deepest first (the order to unmount them in)."""
    prefix = path.rstrip("/") or "/"
    found = []
    with open(mountinfo) as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    # A path mounted twice (stacked) appears twice: unmount it twice.
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


_libc = None


def _umount(point: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    UMOUNT_NOFOLLOW = 8  # never resolve a symlink planted at the mount point
    if _libc.umount2(os.fsencode(point), UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        hint = " (busy: a process has files open or its working directory there)" if err == errno.EBUSY else ""
        raise OSError(err, f"{os.strerror(err)}{hint}")


def unmount_below(path: str) -> list[str]:
    """Unmount everything mounted at or below path; return what was unmounted. Refuses
    (UNSAFE_REMOVAL) if a mount cannot be unmounted or is still there afterwards."""
    done = []
    for point in mounts_at_or_below(path):
        try:
            _umount(point)
        except OSError as e:
            raise OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {path}: cannot unmount {point}: {e.strerror}") from None
        done.append(point)
    left = mounts_at_or_below(path)
    if left:
        raise OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {path}: still mounted after unmounting: {', '.join(left)}")
    return done


def _mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(dir_fd: int, where: str, mnt: int, delete: bool) -> None:
    if _mnt_id(dir_fd) != mnt:
        raise OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {where}: it is on another mount")
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _walk(child, f"{where}/{entry.name}", mnt, delete)
            finally:
                os.close(child)
            if delete:
                os.rmdir(entry.name, dir_fd=dir_fd)
        elif delete:
            os.unlink(entry.name, dir_fd=dir_fd)


def remove_tree(path: str) -> str | None:
    """Remove path safely; return what it was ("directory", "symlink", "file") or None if absent.

    A symlink at path is removed itself, never followed. For a directory, mounts inside are
    unmounted first (see unmount_below), then a dry walk checks the whole tree is on one mount
    before anything is deleted, then the tree is deleted with the same checks.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return "symlink" if stat.S_ISLNK(st.st_mode) else "file"
    unmount_below(path)
    parent, name = os.path.split(path.rstrip("/"))
    parent_fd = os.open(parent or "/", _DIR_FLAGS)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            mnt = _mnt_id(fd)
            _walk(fd, path, mnt, delete=False)
            _walk(fd, path, mnt, delete=True)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)
        os.fsync(parent_fd)
    finally:
        os.close(parent_fd)
    return "directory"
