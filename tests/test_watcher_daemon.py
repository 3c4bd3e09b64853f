"""The daemon around the watcher: the systemd watchdog is fed only while the main loop makes progress,
no cluster configured means an idle but ready daemon, and `unbounded-agent version` never imports the
kubernetes client."""

import os
import signal
import subprocess
import sys
import threading
import time

from watcher_fakes import LIB, wait_for
from unbounded_agent import daemon


def test_watchdog_is_fed_only_while_the_loop_is_alive(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: pings every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pings, alive, stop = [], threading.Event(), threading.Event()
    alive.set()
    t = daemon.start_watchdog(lambda max_age: alive.is_set(), stop, notify=lambda **f: pings.append(f))
    try:
        wait_for("a few pings", lambda: len(pings) >= 3)
        assert pings[0] == {"WATCHDOG": 1}
        alive.clear()  # the main loop is stuck
        time.sleep(0.1)
        n = len(pings)
        time.sleep(0.3)
        assert len(pings) == n
    finally:
        stop.set()
        t.join(2)


def test_no_watchdog_thread_outside_systemd(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.start_watchdog(lambda _: True, threading.Event()) is None
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert daemon.start_watchdog(lambda _: True, threading.Event()) is None


def test_under_systemd_without_watchdog_sec_the_daemon_arms_its_own(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    sent, stop = [], threading.Event()
    t = daemon.start_watchdog(lambda _: True, stop, notify=lambda **f: sent.append(f))
    try:
        assert sent[0] == {"WATCHDOG_USEC": int(daemon.WATCHDOG_SECONDS * 1_000_000)}
    finally:
        stop.set()
        t.join(2)


def test_without_a_cluster_the_daemon_is_ready_and_idle(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"stateDir: {tmp_path}/state\nbinDir: {tmp_path}/bin\nmachineName: lonely\n")
    env = dict(os.environ, PYTHONPATH=str(LIB), UNBOUNDED_AGENT_CONFIG=str(cfg))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    p = subprocess.Popen([sys.executable, "-m", "unbounded_agent.cli", "daemon"], env=env, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = ""
        while "not watching MachineOperations" not in line:
            line = p.stderr.readline()
            assert line, "the daemon exited"
    finally:
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=10)[1]
    assert p.returncode == 0 and "stopped" in out


def test_version_does_not_import_kubernetes():
    code = ("import sys; from unbounded_agent import cli; cli.main(['version']); "
            "print('kubernetes' in sys.modules, 'unbounded_agent.watcher' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(LIB)), capture_output=True,
                       text=True, check=True)
    assert r.stdout.splitlines()[-1] == "False False"
