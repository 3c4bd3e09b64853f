"""The host-operation lock: one operation at a time, its holder named, released when the holder dies
(even by SIGKILL), and a step refused unless the lock is held for its own operation."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from unbounded_agent import hostlock
from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason

LIB = str(Path(__file__).resolve().parents[2] / "lib")


@pytest.fixture
def lock(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "install.lock"
    monkeypatch.setenv(hostlock.ENV_LOCK, str(path))
    return path


def _holder(lock: Path, operation: str = "reset-1", kind: str = "reset") -> subprocess.Popen:
    """Another process holding the lock, until it is killed."""
    code = (f"import sys, time; sys.path.insert(0, {LIB!r}); from unbounded_agent.hostlock import HostLock\n"
            f"HostLock({operation!r}, {kind!r}, path={str(lock)!r}).acquire(); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def test_a_second_taker_is_refused_with_the_holder_named(lock):
    p = _holder(lock)
    try:
        with pytest.raises(OpsError) as e:
            HostLock("upgrade-2", "upgrade").acquire()
        assert e.value.reason is Reason.HOST_LOCKED
        assert f"reset reset-1 (pid {p.pid}" in e.value.message
    finally:
        p.kill()
        p.wait()


def test_holder_names_the_process_and_its_operation(lock):
    assert hostlock.holder() is None
    p = _holder(lock, "upgrade-7", "upgrade")
    try:
        who = hostlock.holder()
        assert (who.pid, who.operation, who.kind) == (p.pid, "upgrade-7", "upgrade")
    finally:
        p.kill()
        p.wait()
    assert hostlock.holder() is None


def test_a_description_left_by_a_killed_holder_is_not_taken_for_a_holder(lock):
    p = _holder(lock, "upgrade-7", "upgrade")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert "upgrade-7" in lock.read_text()  # killed: it could not clear its description
    assert hostlock.holder() is None
    with pytest.raises(OpsError) as e:
        hostlock.require("upgrade-7", "stage")
    assert e.value.reason is Reason.HOST_LOCKED
    with HostLock("reset-2", "reset").acquire():  # free again
        assert hostlock.holder().operation == "reset-2"


def test_require_passes_only_for_the_operation_that_holds_the_lock(lock):
    with pytest.raises(OpsError, match="no host operation is running"):
        hostlock.require("upgrade-1", "stage")
    with HostLock("upgrade-1", "upgrade").acquire():
        assert hostlock.require("upgrade-1", "stage").operation == "upgrade-1"
        with pytest.raises(OpsError, match="held by upgrade upgrade-1") as e:
            hostlock.require("reset-9", "reset step remove-agent")
        assert e.value.reason is Reason.HOST_LOCKED


def test_release_clears_the_description_and_lets_the_next_one_in(lock):
    with HostLock("upgrade-1", "upgrade").acquire():
        with pytest.raises(OpsError):
            HostLock("upgrade-2", "upgrade").acquire()  # a second open file description conflicts even in one process
    assert lock.read_text() == ""
    assert hostlock.holder() is None
    with HostLock("upgrade-2", "upgrade").acquire():
        pass


def test_acquire_waits_for_the_holder_to_finish(lock):
    first = HostLock("upgrade-1", "upgrade").acquire()
    got = []

    def second():
        with HostLock("reset-1", "reset").acquire(wait=30, poll=0.01):
            got.append(hostlock.holder().operation)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.2)  # the second taker is waiting meanwhile; nothing below depends on how long it waited
    assert got == [] and hostlock.holder().operation == "upgrade-1"
    first.release()
    t.join(30)
    assert got == ["reset-1"]
