"""Remove a directory tree without ever following a symlink or crossing into another mount.

A machine's root directory can have file systems mounted inside it (bind mounts of data that is
not ours, as kubeadm's and k3s's data-loss bugs show). So: unmount everything mounted at or below
the tree (deepest first, without MNT_DETACH: a busy mount is reported, not hidden), re-read the
mount table to verify, and only then delete — walking by directory file descriptors with
O_NOFOLLOW and checking that every directory is on the tree's own mount (its ``mnt_id``), so a
mount that appears meanwhile stops the removal instead of being emptied. A first walk deletes
nothing: it refuses the whole tree if any part of it is on another mount or marked immutable or
append-only (``chattr +i``/``+a``), so such a tree is left whole rather than half deleted.

Where the trees are found on hosts in the field:
- the parent may be a symlink (``/var/lib/machines`` → ``/srv/machines``): it is followed; the tree
  itself (``kube1``) never is — a symlink there is removed as a link;
- trees of any depth (a pod can plant one): the walk is a loop, not a recursion, and holds at most
  ``MAX_OPEN`` directory descriptors, going back up through ``..`` and checking that it arrives where
  it came from (device and inode), so a directory moved meanwhile stops it;
- btrfs: a machine tree, and directories inside it, may be subvolumes. An empty subvolume is removed
  by ``rmdir`` (Linux 4.18 and later); a read-only one is made writable first.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import stat
import struct

from ..reasons import OpsError, Reason

MOUNTINFO = "/proc/self/mountinfo"
MAX_OPEN = 16  # directory descriptors the walk holds at once, however deep the tree
DELETE_PASSES = 5  # a tree written into while it is removed is gone over again, at most this often


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


def _mountinfo(mountinfo: str = MOUNTINFO) -> list[tuple[int, str, str]]:
    """(mount id, mount point, file system type) of every mount."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            out.append((int(fields[0]), _unescape(fields[4]), fstype))
    return out


def mounts_at_or_below(path: str, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below path, deepest first (the order to unmount them in)."""
    prefix = path.rstrip("/") or "/"
    found = [point for _, point, _ in _mountinfo(mountinfo) if point == prefix or point.startswith(prefix + "/")]
    # A path mounted twice (stacked) appears twice: unmount it twice.
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def locate(path: str) -> str:
    """The path with its parent resolved (symlinks in the parent followed) and its last part kept as it is."""
    parent, name = os.path.split(path.rstrip("/"))
    return os.path.join(os.path.realpath(parent or "/"), name)


_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _umount(point: str) -> None:
    UMOUNT_NOFOLLOW = 8  # never resolve a symlink planted at the mount point
    if _lib().umount2(os.fsencode(point), UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        hint = " (busy: a process has files open or its working directory there)" if err == errno.EBUSY else ""
        raise OSError(err, f"{os.strerror(err)}{hint}")


def unmount_below(path: str) -> list[str]:
    """Unmount everything mounted at or below path (its parent resolved); return what was unmounted.
    Refuses (UNSAFE_REMOVAL) if a mount cannot be unmounted or is still there afterwards."""
    real = locate(path)
    done = []
    for point in mounts_at_or_below(real):
        try:
            _umount(point)
        except OSError as e:
            raise OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {path}: cannot unmount {point}: {e.strerror}") from None
        done.append(point)
    left = mounts_at_or_below(real)
    if left:
        raise OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {path}: still mounted after unmounting: {', '.join(left)}")
    return done


def _mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


# -- attributes that make a removal fail half-way --------------------------------------------------

_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BASIC_STATS = 0x7FF
_STATX_ATTR_IMMUTABLE, _STATX_ATTR_APPEND = 0x10, 0x20
_statx_works = True


def _blocking_attrs(dir_fd: int, name: str) -> str | None:
    """"immutable" or "append-only" when name (in dir_fd, not followed) has that attribute, else None."""
    global _statx_works
    if not _statx_works:
        return None
    buf = ctypes.create_string_buffer(256)
    if _lib().statx(dir_fd, os.fsencode(name), _AT_SYMLINK_NOFOLLOW, _STATX_BASIC_STATS, buf) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:  # no statx: the deleting walk reports such a file when it meets it
            _statx_works = False
            return None
        raise OSError(err, os.strerror(err), name)
    attrs = struct.unpack_from("=Q", buf.raw, 8)[0]
    if attrs & _STATX_ATTR_IMMUTABLE:
        return "immutable"
    if attrs & _STATX_ATTR_APPEND:
        return "append-only"
    return None


# -- btrfs subvolumes -------------------------------------------------------------------------------

_BTRFS_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root directory
_BTRFS_IOC_SUBVOL_GETFLAGS = 0x80089419  # _IOR(0x94, 25, __u64)
_BTRFS_IOC_SUBVOL_SETFLAGS = 0x4008941A  # _IOW(0x94, 26, __u64)
_BTRFS_SUBVOL_RDONLY = 1 << 1


def _make_subvolume_writable(fd: int) -> bool:
    """Clear the read-only flag of the btrfs subvolume whose root fd is; True if it was read-only."""
    flags = struct.unpack("=Q", fcntl.ioctl(fd, _BTRFS_IOC_SUBVOL_GETFLAGS, bytes(8)))[0]
    if not flags & _BTRFS_SUBVOL_RDONLY:
        return False
    fcntl.ioctl(fd, _BTRFS_IOC_SUBVOL_SETFLAGS, struct.pack("=Q", flags & ~_BTRFS_SUBVOL_RDONLY))
    return True


# -- the walk ---------------------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass
class _Dir:
    name: str
    dev: int
    ino: int
    fd: int | None
    subdirs: list[str] = dataclasses.field(default_factory=list)


class _Walk:
    """One pass over a tree, depth first, children before their parent, never more than MAX_OPEN descriptors.

    delete=False checks (mounts, attributes) and deletes nothing; delete=True deletes every file as it
    lists a directory, and each directory once it is empty."""

    def __init__(self, root_fd: int, path: str, mnt: int, btrfs: bool, delete: bool):
        self.path, self.mnt, self.btrfs, self.delete = path, mnt, btrfs, delete
        st = os.fstat(root_fd)
        self.stack = [_Dir("", st.st_dev, st.st_ino, root_fd)]
        self.root_fd = root_fd

    def where(self, depth: int | None = None) -> str:
        names = [d.name for d in self.stack[1:depth]]
        return "/".join([self.path.rstrip("/"), *names])

    def refuse(self, what: str) -> OpsError:
        return OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {self.path}: {what}")

    def run(self) -> None:
        try:
            self._list(self.stack[0])
            while self.stack:
                top = self.stack[-1]
                if top.subdirs:
                    self._enter(top, top.subdirs.pop())
                else:
                    self._leave()
        finally:
            for d in self.stack:
                if d.fd is not None and d.fd != self.root_fd:
                    os.close(d.fd)

    def _enter(self, parent: _Dir, name: str) -> None:
        fd = os.open(name, _DIR_FLAGS, dir_fd=self._fd(len(self.stack) - 1))
        st = os.fstat(fd)
        child = _Dir(name, st.st_dev, st.st_ino, fd)
        self.stack.append(child)
        if _mnt_id(fd) != self.mnt:
            raise self.refuse(f"{self.where()} is on another mount")
        self._bound()
        self._list(child)

    def _list(self, d: _Dir) -> None:
        fd = self._fd(len(self.stack) - 1)
        if self.btrfs and d.ino == _BTRFS_FIRST_FREE_OBJECTID and self.delete:
            _make_subvolume_writable(fd)
        with os.scandir(fd) as it:
            entries = list(it)
        for entry in entries:
            is_dir = entry.is_dir(follow_symlinks=False)
            if not self.delete:
                bad = _blocking_attrs(fd, entry.name)
                if bad:
                    raise self.refuse(f"{self.where()}/{entry.name} is {bad} (see lsattr; chattr -i -a allows it)")
            if is_dir:
                d.subdirs.append(entry.name)
            elif self.delete:
                try:
                    os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    pass  # a writer renamed its temporary file meanwhile: what it renamed to is gone over again

    def _leave(self) -> None:
        top = self.stack[-1]
        if len(self.stack) == 1:
            self.stack.pop()
            return
        parent_fd = self._fd(len(self.stack) - 2, from_child=top)
        self.stack.pop()
        if top.fd is not None:
            os.close(top.fd)
        if self.delete:
            os.rmdir(top.name, dir_fd=parent_fd)

    def _bound(self) -> None:
        """Close the descriptors of the directories furthest up (but the root) once too many are open."""
        held = [(d, d.fd) for d in self.stack[1:] if d.fd is not None]
        for d, fd in held[: max(0, len(held) - MAX_OPEN)]:
            os.close(fd)
            d.fd = None

    def _fd(self, depth: int, from_child: _Dir | None = None) -> int:
        """The descriptor of stack[depth], opened again through its child's ``..`` when it was closed."""
        d = self.stack[depth]
        if d.fd is not None:
            return d.fd
        child = from_child or self.stack[depth + 1]
        assert child.fd is not None, "the walk keeps the deepest directories open"
        fd = os.open("..", _DIR_FLAGS, dir_fd=child.fd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (d.dev, d.ino):
            os.close(fd)
            raise self.refuse(f"{self.where(depth + 1)} was moved while it was being removed")
        d.fd = fd
        return fd


def prepare(path: str) -> list[str]:
    """Make path ready to be removed and check it, deleting nothing: unmount what is mounted inside, then
    walk the whole tree (see the module docstring). Returns what was unmounted. Raises UNSAFE_REMOVAL when
    any part of the tree cannot be removed; OSError when it cannot be read."""
    real = locate(path)
    try:
        st = os.lstat(real)
    except (FileNotFoundError, NotADirectoryError):
        return []
    if not stat.S_ISDIR(st.st_mode):
        return []
    done = unmount_below(path)
    with _opened(real) as (parent_fd, fd):
        bad = _blocking_attrs(parent_fd, os.path.basename(real))
        if bad:
            raise OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {path}: it is {bad} (see lsattr)")
        mnt = _mnt_id(fd)
        _Walk(fd, path, mnt, _is_btrfs(mnt), delete=False).run()
    return done


def remove_tree(path: str) -> str | None:
    """Remove path safely; return what it was ("directory", "symlink", "file") or None if absent.

    A symlink at path is removed itself, never followed (the parent is followed: see locate). For a
    directory: prepare() (unmount, check everything), then delete with the same checks."""
    real = locate(path)
    try:
        st = os.lstat(real)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(real)
        return "symlink" if stat.S_ISLNK(st.st_mode) else "file"
    prepare(path)
    with _opened(real) as (parent_fd, fd):
        mnt = _mnt_id(fd)
        for attempt in range(1, DELETE_PASSES + 1):
            try:
                _Walk(fd, path, mnt, _is_btrfs(mnt), delete=True).run()
                os.rmdir(os.path.basename(real), dir_fd=parent_fd)
                break
            except OSError as e:
                # Something wrote into the tree while it went (the daemon, still running, records its progress
                # there until it sees the directory is gone): go over what is left again, a bounded number of times.
                if e.errno != errno.ENOTEMPTY or attempt == DELETE_PASSES:
                    raise
        os.fsync(parent_fd)
    return "directory"


class _opened:
    """The resolved parent directory and the tree's root directory (never followed), as descriptors."""

    def __init__(self, real: str):
        self.real = real
        self.fds: list[int] = []

    def __enter__(self) -> tuple[int, int]:
        parent, name = os.path.split(self.real)
        self.fds.append(os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        self.fds.append(os.open(name, _DIR_FLAGS, dir_fd=self.fds[0]))
        return self.fds[0], self.fds[1]

    def __exit__(self, *exc) -> None:
        for fd in reversed(self.fds):
            os.close(fd)


def _is_btrfs(mnt: int) -> bool:
    return any(mid == mnt and fstype == "btrfs" for mid, _, fstype in _mountinfo())
