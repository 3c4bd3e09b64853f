"""The host lock: one holder at a time, released when the holder dies (even by SIGKILL)."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason

LIB = str(Path(__file__).resolve().parent.parent / "lib")


def _holder(lock: Path) -> subprocess.Popen:
    code = (f"import sys, time; sys.path.insert(0, {LIB!r}); from unbounded_agent.hostlock import HostLock\n"
            f"l = HostLock({str(lock)!r}, purpose='bootstrap'); l.acquire(); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def test_a_second_taker_is_refused_with_the_holder_named(tmp_path):
    lock = tmp_path / "install.lock"
    p = _holder(lock)
    try:
        with pytest.raises(OpsError) as e:
            HostLock(str(lock)).acquire()
        assert e.value.reason is Reason.HOST_LOCKED
        assert "another bootstrap or reset is already running" in e.value.message
        assert f"pid {p.pid} bootstrap" in e.value.message
    finally:
        p.kill()
        p.wait()


def test_the_lock_is_free_again_once_its_holder_is_killed(tmp_path):
    lock = tmp_path / "install.lock"
    p = _holder(lock)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with HostLock(str(lock)):
        pass


def test_release_lets_the_next_one_in(tmp_path):
    lock = str(tmp_path / "install.lock")
    with HostLock(lock):
        with pytest.raises(OpsError):
            HostLock(lock).acquire()  # a second open file description conflicts even in one process
    with HostLock(lock):
        pass
