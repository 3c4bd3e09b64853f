"""The host lock shared by bootstrap and reset: only one of them changes the host at a time.

An exclusive flock(2) on ``/run/unbounded-agent-install.lock`` (the upstream agent's path), taken
without waiting. The kernel drops it when the holder's process dies, so a ``kill -9`` never leaves a
stale lock behind. /run is a tmpfs: nothing survives a reboot, which is also what we want; an
interrupted reset is remembered by its checkpoint instead (see reset.py).
"""

import fcntl
import os

from .reasons import OpsError, Reason

LOCK_PATH = "/run/unbounded-agent-install.lock"


class HostLock:
    """``with HostLock(): ...`` holds the lock for the block; raises OpsError(HOST_LOCKED) if taken."""

    def __init__(self, path: str = LOCK_PATH, purpose: str = "reset"):
        self.path = path
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OpsError(
                Reason.HOST_LOCKED,
                f"another bootstrap or reset is already running on this host ({self.path} held{holder}); "
                "retry when it has finished",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for the error message of the next caller; informational only (flock decides).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.purpose}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "HostLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 100, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" by pid {text}" if text else ""
