"""Crash-safe file operations: write to a temporary name, fsync, rename, fsync the directory.

A ``kill -9`` or power loss between any two lines leaves either the old or the new content at
the final name, never a partial file or a dangling half-made link.
"""

import os
from pathlib import Path

from .reasons import OpsError, Reason


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(final: Path) -> Path:
    # Hidden, unique and in the same directory, so rename() is atomic and never crosses filesystems.
    return final.with_name(f".{final.name}.tmp-{os.urandom(4).hex()}")


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    final = Path(path)
    tmp = _temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)  # not subject to the umask
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def atomic_copy(src: str | os.PathLike, dest: str | os.PathLike, mode: int = 0o755) -> None:
    """Copy src to dest through a temporary file in dest's directory (constant memory)."""
    final = Path(dest)
    tmp = _temp_name(final)
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
            fout.flush()
            os.fchmod(fout.fileno(), mode)
            os.fsync(fout.fileno())
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def atomic_symlink(target: str, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target``, replacing any existing link in one rename."""
    final = Path(link)
    tmp = _temp_name(final)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def remove_stale_temps(directory: str | os.PathLike[str], depth: int = 1) -> list[Path]:
    """Remove temporaries left by a crash in the middle of one of the operations above, in directory and (depth > 1)
    the directories below it. Only for a directory whose writers are all stopped, or are the caller: another
    writer's temporary in flight would go too."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(os.fspath(directory)))
    except FileNotFoundError:
        return removed
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            if depth > 1:
                removed += remove_stale_temps(e.path, depth - 1)
        elif e.name.startswith(".") and ".tmp-" in e.name:
            Path(e.path).unlink(missing_ok=True)
            removed.append(Path(e.path))
    return removed


def check_free_space(path: str | os.PathLike, needed_bytes: int) -> None:
    """Refuse to start when the filesystem holding ``path`` has less than ``needed_bytes`` free."""
    try:
        st = os.statvfs(path)
    except OSError as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot check free space on {path}: {e.strerror}") from None
    available = st.f_bavail * st.f_frsize  # what an unprivileged writer may use; keeps root's reserve
    if available < needed_bytes:
        raise OpsError(
            Reason.INSUFFICIENT_SPACE,
            f"not enough free space: needs {needed_bytes} bytes, {available} available on {path}",
        )
    if st.f_files and not st.f_favail:  # some filesystems (btrfs) report no inode counts at all
        raise OpsError(Reason.INSUFFICIENT_SPACE, f"not enough free space: no free inodes on {path}")
