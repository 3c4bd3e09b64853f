"""The upgrade lock (one at a time, released by process death) and the unit-name escaping that
`systemctl start unbounded-upgrade@<escaped URL>.service` relies on."""

import os
import signal
import subprocess
import sys
import time

import pytest

from unbounded_agent import upgrade
from unbounded_agent.reasons import OpsError, Reason

HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from unbounded_agent import upgrade
upgrade.UpgradeLock(path=sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_in_child(lock, lib):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), lib], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_holder_is_refused_and_a_killed_holder_releases(tmp_path):
    lock = tmp_path / "upgrade.lock"
    lib = os.path.join(os.path.dirname(upgrade.__file__), "..")
    child = hold_in_child(lock, lib)
    try:
        with pytest.raises(OpsError) as e:
            upgrade.UpgradeLock(path=str(lock), wait=0.3).acquire()
        assert e.value.reason == Reason.UPGRADE_IN_PROGRESS and "one upgrade at a time" in e.value.message
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with upgrade.UpgradeLock(path=str(lock)):
        pass  # the kernel dropped the dead holder's lock: no stale file to clean


def test_a_waiting_step_gets_the_lock_when_the_holder_exits(tmp_path):
    lock = tmp_path / "upgrade.lock"
    lib = os.path.join(os.path.dirname(upgrade.__file__), "..")
    child = hold_in_child(lock, lib)
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.5; kill {child.pid}"])
    try:
        with upgrade.UpgradeLock(path=str(lock), wait=30):
            assert child.wait(timeout=30) != 0
    finally:
        killer.wait()


@pytest.mark.parametrize("url", [
    "https://localhost:8443/unbounded-agent-linux-amd64.tar.gz",
    "https://releases.example/v1.2-rc.1/agent_x.tar.gz",
    "https://[::1]:8443/a b/%41.tar.gz",
    ".hidden/über",
])
def test_escape_matches_systemd_escape_and_round_trips(url):
    expected = subprocess.run(["systemd-escape", url], capture_output=True, text=True, check=True).stdout.strip()
    assert upgrade.escape(url) == expected
    assert upgrade.unescape(expected) == url
