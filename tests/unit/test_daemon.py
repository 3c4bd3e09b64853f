"""The daemon around the watcher (daemon.py): the systemd watchdog is fed only while the main loop makes
progress, no cluster configured means an idle but ready daemon, a configured one watches and queues into
the operation queue of UNBOUNDED_AGENT_OPS_DIR, and `unbounded-agent version` never imports the
kubernetes client."""

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from watcher_fakes import MACHINE, REPO, Harness, wait_for

from unbounded_agent import daemon

LIB = REPO / "lib"
DAEMON = [sys.executable, "-c", "import sys; from unbounded_agent import cli; sys.exit(cli.main(['daemon']))"]


def test_watchdog_is_fed_only_while_the_loop_is_alive(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: pings every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pings, alive, stop = [], threading.Event(), threading.Event()
    alive.set()
    checks: list[bool] = []

    def healthy(max_age):
        checks.append(alive.is_set())
        return checks[-1]

    t = daemon.start_watchdog(healthy, stop, notify=lambda **f: pings.append(f))
    try:
        wait_for("a few pings", lambda: len(pings) >= 3)
        assert pings[0] == {"WATCHDOG": 1}
        alive.clear()  # the main loop is stuck
        # once one check has seen it stuck, a ping of an earlier check is sent (one thread: check, then ping)
        wait_for("a check that sees the loop stuck", lambda: False in checks)
        n, seen = len(pings), len(checks)
        wait_for("three more checks", lambda: len(checks) >= seen + 3)
        assert len(pings) == n
        alive.set()
        wait_for("pings again", lambda: len(pings) > n)
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


@pytest.mark.parametrize("usec, pid, seconds", [("2000000", None, 2.0), ("2000000", "self", 2.0), ("0", None, None),
                                                ("soon", None, None), ("2000000", "1", None)])
def test_watchdog_seconds_as_systemd_passes_them(monkeypatch, usec, pid, seconds):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    else:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert daemon.watchdog_seconds() == seconds


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


class NotifySocket:
    """The sd_notify(3) socket systemd gives a Type=notify service: every message the daemon sends."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def having(self, key: str) -> list[dict]:
        return [m for m in list(self.messages) if key in m]

    def close(self):
        self.closed.set()
        self.thread.join(2)
        self.sock.close()


def run_daemon(tmp_path: Path, config: str, **env) -> subprocess.Popen:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config)
    full = {k: v for k, v in os.environ.items()
            if k not in ("KUBERNETES_SERVICE_HOST", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    full.update(PYTHONPATH=str(LIB), UNBOUNDED_AGENT_CONFIG=str(cfg), **env)
    return subprocess.Popen(DAEMON, env=full, stderr=subprocess.PIPE, text=True)


def stop_daemon(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=20)[1]
    assert p.returncode == 0, err
    return err


def test_without_a_cluster_the_daemon_is_ready_and_idle(tmp_path):
    from unbounded_agent.queue.spool import Gate, Spool

    notify = NotifySocket(tmp_path / "notify")
    spool = Spool(tmp_path / "ops").ensure()
    p = run_daemon(tmp_path, f"stateDir: {tmp_path}/state\nbinDir: {tmp_path}/bin\nmachineName: lonely\n",
                   NOTIFY_SOCKET=notify.path, UNBOUNDED_AGENT_OPS_DIR=str(spool.root))
    try:
        line = ""
        while "not watching MachineOperations" not in line:
            line = p.stderr.readline()
            assert line, "the daemon exited"
        ready = wait_for("READY=1", lambda: notify.having("READY"))
        assert "no cluster configured" in ready[0]["STATUS"]
        # not a notify-less idler: it arms its own watchdog and feeds it
        assert notify.having("WATCHDOG_USEC")[0]["WATCHDOG_USEC"] == str(int(daemon.WATCHDOG_SECONDS * 1_000_000))
        # a reset waiting for its requester to report: with no cluster there is nothing to say, it may go on
        spool.open_gate(Gate(id="reset-1", message="AgentReset completed"))
        wait_for("the gate to be acknowledged", lambda: spool.acked("reset-1"))
    finally:
        err = stop_daemon(p)
        notify.close()
    assert "stopped" in err and notify.having("STOPPING")


def test_with_a_cluster_the_daemon_watches_and_queues_its_operations(tmp_path):
    """The daemon as systemd runs it: READY=1 after the first list, the watchdog fed by a live loop, an
    operation queued in the spool of UNBOUNDED_AGENT_OPS_DIR and its result published, STOPPING=1 on SIGTERM."""
    with Harness(tmp_path) as h:
        notify = NotifySocket(tmp_path / "notify")
        p = run_daemon(tmp_path, f"stateDir: {h.cfg.state_dir}\nbinDir: {h.cfg.bin_dir}\nmachineName: {MACHINE}\n"
                                 f"kubeconfig: {h.cfg.kubeconfig}\n",
                       NOTIFY_SOCKET=notify.path, UNBOUNDED_AGENT_OPS_DIR=str(h.spool.root), WATCHDOG_USEC="400000")
        try:
            ready = wait_for("READY=1", lambda: notify.having("READY"))
            assert ready[0]["STATUS"].endswith(f"watching MachineOperations for {MACHINE}")
            wait_for("watchdog pings", lambda: len(notify.having("WATCHDOG")) >= 2)
            h.create("up", "AgentUpgrade", downloadURL="https://releases.example.com/agent.tar.gz")
            req = h.dispatcher.wait_request(h.operation("up"))
            assert req.source == "machineoperation"
            h.dispatcher.succeed(req, "upgraded from 1.0.0 to 2.0.0")
            h.wait_phase("up", "Complete")
            assert (Path(h.cfg.state_dir) / "machineoperations").is_dir()
        finally:
            err = stop_daemon(p)
            notify.close()
        assert notify.having("STOPPING") and "stopped" in err


def test_version_does_not_import_kubernetes():
    code = ("import sys; from unbounded_agent import cli; cli.main(['version']); "
            "print('kubernetes' in sys.modules, any(m.startswith('unbounded_agent.kube') for m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(LIB)), capture_output=True,
                       text=True, check=True)
    assert r.stdout.splitlines()[-1] == "False False"


def test_every_module_the_daemon_can_reach_is_imported_at_its_start():
    """A reset removes the agent's zipapp before the daemon reports Complete: no import may reach for it later.
    Every module of the package that the daemon and the watcher import — at the top or inside a function —
    is in daemon.PRELOAD (or is one of its packages)."""
    from test_architecture import graph, modules

    edges = graph()
    seen, todo = set(), ["unbounded_agent.daemon", "unbounded_agent.kube.watcher"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges.get(m, ())
    packages = {m for m, p in modules().items() if p.name == "__init__.py"}
    preloaded = {f"unbounded_agent.{m}" for m in daemon.PRELOAD}
    assert sorted(seen - preloaded - packages - {"unbounded_agent.daemon"}) == []


def test_preloaded_the_daemon_needs_no_file_of_its_zipapp(tmp_path):
    """The zipapp as the release builds it: preload, remove the file, then everything PRELOAD names works."""
    sys.path.insert(0, str(REPO / "packaging"))
    try:
        import build_release
    finally:
        sys.path.pop(0)
    app = tmp_path / "unbounded-agent"
    build_release.build_zipapp("9.9.9", app)
    script = (f"import sys; sys.path.insert(0, {str(app)!r})\n"
              "import os, importlib\nfrom unbounded_agent import daemon\ndaemon.preload()\n"
              f"os.unlink({str(app)!r})\n"
              "from unbounded_agent.kube import watcher, reset_driver, adoption, upgrade_driver\n"
              "from unbounded_agent.queue.spool import new_id\nfrom unbounded_agent.urls import redact\n"
              "print(new_id('mop').startswith('mop-'), redact('https://u:p@h/x?sig=1'))\n")
    r = subprocess.run(["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "True" and not app.exists()
    control = subprocess.run(["/usr/bin/python3", "-I", "-c", script.replace("daemon.preload()\n", "")],
                             capture_output=True, text=True, timeout=60)
    assert control.returncode != 0  # without the preload the same imports need the removed file


def test_the_reset_reporter_runs_the_watcher_on_the_copy_the_reset_kept(tmp_path, monkeypatch):
    from unbounded_agent.reset import reporter_kit

    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    monkeypatch.setattr(sys, "argv", ["unbounded-agent-reset-reporter"])
    ran = []
    monkeypatch.setattr(daemon, "run", lambda cfg, annotate=True: ran.append((cfg, annotate)) or 0)
    assert daemon.report_reset() == 1 and ran == []  # nothing kept: nothing to report from
    (tmp_path / "kubeconfig").write_text("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
                                         "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                                         "users: [{name: u, user: {token: t}}]\n")
    (tmp_path / "config.yaml").write_text(f"machineName: node-7\nkubeconfig: {tmp_path / 'kubeconfig'}\n")
    (tmp_path / "ops" / "reset").mkdir(parents=True)
    reporter_kit.hold(tmp_path / "ops" / "reset", "run-1", str(tmp_path / "config.yaml"))
    assert daemon.report_reset() == 0
    ((cfg, annotate),) = ran
    kit = tmp_path / "ops" / "reset" / "reporter"
    assert (cfg.machine_name, cfg.kubeconfig, cfg.state_dir, annotate) == ("node-7", str(kit / "kubeconfig"),
                                                                           kit / "state", False)
