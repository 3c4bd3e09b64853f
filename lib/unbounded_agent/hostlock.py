"""The host-operation lock: one host operation (upgrade, rollback, recovery, reset, a future bootstrap)
at a time, for its whole run.

An exclusive flock(2) on ``/run/unbounded-agent-install.lock`` (the upstream agent's path for bootstrap
and reset). The dispatcher (queue/dispatch.py) takes it before it starts an operation's units and drops
it when the operation's result is written; the steps of that operation run in their own units and check,
with ``require()``, that the lock is held *for their operation* — so no step runs beside another
operation, and none runs at all once the operation it belongs to is over. Recovery started by the
daemon's ``OnFailure=`` while nothing holds the lock takes it itself.

The kernel drops a flock when its holder dies, so ``kill -9`` never leaves it behind; /run is a tmpfs,
so nothing survives a reboot (an interrupted operation is remembered by its claimed request instead).
Who holds it comes from two places that must agree: /proc/locks names the process that holds the
flock, and the file's content (written by the holder right after locking) names its operation.
A description left by a killed holder is therefore never taken for the current one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time

from .reasons import OpsError, Reason

LOCK_PATH = "/run/unbounded-agent-install.lock"
ENV_LOCK = "UNBOUNDED_AGENT_LOCK"  # tests point it elsewhere


def lock_path() -> str:
    return os.environ.get(ENV_LOCK) or LOCK_PATH


@dataclasses.dataclass(frozen=True)
class Holder:
    pid: int
    operation: str  # the request id of the operation, "" while the holder has not written it yet
    kind: str  # upgrade, rollback, reset, recovery
    since: str = ""

    def describe(self) -> str:
        if not self.operation:
            return f"pid {self.pid}"
        return f"{self.kind} {self.operation} (pid {self.pid}, since {self.since})"


class HostLock:
    """``with HostLock(operation, kind).acquire(wait=...):`` holds the lock for the block.

    acquire raises OpsError(HOST_LOCKED) naming the holder when the lock is still taken after ``wait``
    seconds."""

    def __init__(self, operation: str, kind: str, path: str | None = None):
        self.operation = operation
        self.kind = kind
        self.path = path or lock_path()
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0, poll: float = 0.1) -> HostLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        who = holder(self.path)
                        raise OpsError(Reason.HOST_LOCKED,
                                       f"another host operation is running ({who.describe() if who else self.path}); "
                                       "one host operation at a time") from None
                    time.sleep(poll)
            from .records import now

            doc = {"pid": os.getpid(), "operation": self.operation, "kind": self.kind, "since": now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(doc) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # a reader must not find our description once we are gone
            finally:
                os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> HostLock:
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock_pid(path: str) -> int | None:
    """The pid holding an flock on path, from /proc/locks (None when nobody does)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        for line in f:
            words = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (a blocked waiter's line has "->" first)
            if len(words) >= 6 and words[1] == "FLOCK" and words[5] == dev:
                return int(words[4])
    return None


def holder(path: str | None = None, settle: float = 1.0) -> Holder | None:
    """Who holds the lock now, None when it is free. While a new holder has not yet written its
    description (a few microseconds), waits up to ``settle`` seconds for it."""
    path = path or lock_path()
    deadline = time.monotonic() + settle
    while True:
        pid = _flock_pid(path)
        if pid is None:
            return None
        try:
            with open(path) as f:
                doc = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            doc = {}
        if doc.get("pid") == pid:
            return Holder(pid, str(doc.get("operation") or ""), str(doc.get("kind") or ""), str(doc.get("since") or ""))
        if time.monotonic() >= deadline:
            return Holder(pid, "", "unknown")
        time.sleep(0.01)


def require(operation: str, what: str) -> Holder:
    """For a step of an operation: the lock must be held for that operation. Raises OpsError(HOST_LOCKED)
    otherwise, so a step started by hand, or left over from an operation that is over, changes nothing."""
    who = holder()
    if who is None:
        raise OpsError(Reason.HOST_LOCKED,
                       f"{what}: no host operation is running for it (operation {operation}); steps run only "
                       "for an operation the dispatcher runs — submit it with unbounded-agent")
    if who.operation != operation:
        raise OpsError(Reason.HOST_LOCKED,
                       f"{what}: the host is held by {who.describe()}, not by operation {operation}")
    return who
