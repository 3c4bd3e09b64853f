"""Helpers for the fast AgentUpgrade tests: a config in a temp dir, a seeded bin dir, small agents, the
host lock held as the dispatcher holds it, releases served by a fake download, and a stand-in for systemd
(recorded calls, scripted daemon states, optionally the units themselves run in-process) and its journal.

A test module binds the fixtures it uses at module level, so pytest finds them under those names:

    import upgrade_fakes
    cfg = upgrade_fakes.cfg
    fake_systemd = upgrade_fakes.fake_systemd
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from archives import valid_archive

from unbounded_agent import download, holdpoint, hostlock, layout, systemd
from unbounded_agent.config import ENV_OPS_DIR, Config
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import api, preflight, probation, recovery, stage, switch, units
from unbounded_agent.upgrade.record import Store, UpgradeRecord

ID = "upgrade-20260101t000000-0a1b2c"  # the shape queue.spool.new_id gives
URL = "https://releases.example/v2/unbounded-agent-linux-amd64.tar.gz"
SECRET = "sig=secret-token"
SECRET_URL = f"{URL}?{SECRET}"


def agent_body(version: str, extra: str = "") -> bytes:
    return f"#!/bin/sh\n{extra}echo unbounded-agent {version}\n".encode()


def write_agent(path: Path, version: str, extra: str = "") -> Path:
    path.write_bytes(agent_body(version, extra))
    path.chmod(0o755)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_cfg(tmp_path: Path, **tunables) -> Config:
    return Config(machine_name="t", kubeconfig=None, bin_dir=tmp_path / "bin", state_dir=tmp_path / "state",
                  **{"probation_seconds": 0.3, "ready_timeout_seconds": 2.0, **tunables})


def seed(cfg: Config, tmp_path: Path, version: str = "1.0.0") -> layout.Layout:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    lay = layout.Layout(cfg.bin_dir)
    lay.seed(write_agent(tmp_path / "packaged", version))
    return lay


def links(lay: layout.Layout) -> dict[str, str | None]:
    return {name: lay.link_target(name) for name in (layout.CURRENT, layout.LAST_GOOD, layout.COMPAT)}


def slots(lay: layout.Layout) -> dict[str, bytes | None]:
    return {s: lay.path(s).read_bytes() if lay.path(s).exists() else None for s in layout.SLOTS}


def hidden_files(lay: layout.Layout) -> list[str]:
    return sorted(p.name for p in lay.bin_dir.iterdir() if p.name.startswith("."))


def state_files(cfg: Config) -> dict[str, bytes]:
    """Every file under the state dir with its content: to prove that a refusal changed nothing."""
    root = Path(cfg.state_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


# -- systemd and its journal -----------------------------------------------------------------------------

_JOURNALCTL = """#!/bin/sh
printf '%s\\n' "$*" >> "{dir}/queries"
case " $* " in
  *" _PID=1 "*) cat "{dir}/manager" 2>/dev/null ;;
  *) cat "{dir}/unit" 2>/dev/null ;;
esac
"""


# A run the fake starts begins this much after the call that asked for it: later than any file time the caller
# wrote before (those come from the kernel's coarse clock, up to a tick behind time.time()).
RUN_STARTS_AFTER = 1.0


class FakeSystemd:
    """Stands in for the unbounded_agent.systemd calls the upgrade makes.

    - start/restart/reset-failed are recorded in ``calls``; a unit in ``fail_start`` refuses to start,
      and ``fail_restart`` makes every restart fail (as the start limit does);
    - a (re)started daemon comes up healthy as a new invocation; ``daemon`` is its snapshot, or
      ``snapshots`` a script consumed one per call (the last one stays);
    - ``busy()`` answers from ``busy_units``, or from ``on_busy(names)`` when a test scripts it;
    - after ``run_units(cfg)``, starting a unit runs it in-process as systemd would: the chain
      stage → preflight → switch (stopping at the first failure, as Requires= does), probation, recovery;
    - journalctl is a script that prints ``journal(...)``'s lines and logs its arguments.
    """

    def __init__(self, journal_dir: Path):
        self.calls: list[tuple[str, str]] = []
        self.busy_units: set[str] = set()
        self.on_busy = None
        self.busy_calls = 0
        self.daemon = {"active_state": "active", "sub_state": "running", "invocation": "inv1", "job": 0,
                       "main_pid": 100, "n_restarts": 0, "result": "success", "exec_main_code": None,
                       "exec_main_status": 0, "exec_main_pid": 100}
        self.snapshots: list[dict] = []
        self.fail_restart = False
        self.fail_start: set[str] = set()
        self.start_limit_usec = 60_000_000
        self.on_restart = None  # called with the unit name before a restart is recorded
        self.after_restart = None  # called with the unit name once the restarted unit is up (to script it)
        self.unit_errors: list[tuple[str, OpsError]] = []
        self._cfg: Config | None = None
        self.journal_dir = journal_dir

    # -- the manager

    def start_unit(self, name, mode="replace"):
        if name in self.fail_start:
            raise systemd.SystemdError(f"StartUnit({name}) failed: Unit {name} not found. (org.freedesktop.systemd1.NoSuchUnit)")
        self.calls.append(("start", name))
        self._started(name)
        self._run(name)
        return "/org/freedesktop/systemd1/job/1"

    def restart_unit(self, name, mode="replace"):
        if self.on_restart:
            self.on_restart(name)
        if self.fail_restart:
            raise systemd.SystemdError(f"RestartUnit({name}) failed: Start request repeated too quickly.")
        self.calls.append(("restart", name))
        self._started(name)
        if self.after_restart:
            self.after_restart(name)
        return "/org/freedesktop/systemd1/job/2"

    def reset_failed(self, name):
        self.calls.append(("reset-failed", name))

    def _started(self, name):
        if name == systemd.DAEMON_UNIT:
            n = len(self.calls)
            self.snapshots = []
            self.daemon.update(active_state="active", sub_state="running", invocation=f"inv-started-{n}",
                               main_pid=1000 + n, job=0, n_restarts=0, result="success", exec_main_code=None,
                               exec_main_status=0, started_realtime=time.time() + RUN_STARTS_AFTER)

    # -- units

    def busy(self, names):
        self.busy_calls += 1
        if self.on_busy is not None:
            return self.on_busy(names)
        return [n for n in names if n in self.busy_units]

    def service_snapshot(self, name):
        assert name == systemd.DAEMON_UNIT, name
        if self.snapshots:
            snap = dict(self.daemon, **self.snapshots.pop(0))
            if not self.snapshots:
                self.daemon = snap
            return snap
        return dict(self.daemon)

    def unit_property(self, name, prop):
        assert (name, prop) == (systemd.DAEMON_UNIT, "StartLimitIntervalUSec")
        return self.start_limit_usec

    def daemon_crashed(self, status: int = 3, **changes) -> None:
        """The new daemon exited with status and systemd is about to restart it."""
        self.daemon.update({"invocation": "inv-crashed", "active_state": "activating", "sub_state": "auto-restart",
                            "result": "exit-code", "exec_main_code": "exited", "exec_main_status": status, **changes})

    # -- the units, run in-process

    def run_units(self, cfg: Config) -> FakeSystemd:
        self._cfg = cfg
        return self

    def _run(self, name: str) -> None:
        if self._cfg is None:
            return
        cfg = self._cfg
        try:
            if name.startswith("unbounded-upgrade-switch@"):
                id = name.split("@", 1)[1].removesuffix(".service")
                for step in (stage, preflight, switch):
                    step.run(cfg, id)
            elif name == units.PROBATION_UNIT:
                probation.run(cfg)
            elif name == units.RECOVERY_UNIT:
                recovery.run(cfg)
        except OpsError as e:  # the unit fails; systemd records it, nobody else hears of it
            self.unit_errors.append((name, e))

    # -- the journal

    def journal(self, unit_lines: list[str] = (), manager_lines: list[str] = ()) -> None:
        (self.journal_dir / "unit").write_text("".join(f"{line}\n" for line in unit_lines))
        (self.journal_dir / "manager").write_text("".join(f"{line}\n" for line in manager_lines))

    def journal_queries(self) -> list[str]:
        p = self.journal_dir / "queries"
        return p.read_text().splitlines() if p.exists() else []


@pytest.fixture
def fake_systemd(monkeypatch, tmp_path):
    journal_dir = tmp_path / "fake-journal"
    journal_dir.mkdir()
    script = journal_dir / "journalctl"
    script.write_text(_JOURNALCTL.format(dir=journal_dir))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{journal_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    fake = FakeSystemd(journal_dir)
    for name in ("start_unit", "restart_unit", "reset_failed", "busy", "service_snapshot", "unit_property"):
        monkeypatch.setattr(systemd, name, getattr(fake, name))
    return fake


# -- config and the host lock ----------------------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv(hostlock.ENV_LOCK, str(tmp_path / "install.lock"))
    monkeypatch.setenv(ENV_OPS_DIR, str(tmp_path / "ops"))
    monkeypatch.delenv(holdpoint.ENV_HOLD, raising=False)
    monkeypatch.setenv(layout.ENV_PACKAGED_AGENT, str(tmp_path / "packaged"))  # what seed() installs
    return make_cfg(tmp_path)


class HostLockHolder:
    """The host lock as the dispatcher holds it: for one operation at a time."""

    def __init__(self):
        self.lock: hostlock.HostLock | None = None

    def hold(self, operation: str = ID, kind: str = "upgrade") -> hostlock.HostLock:
        self.free()
        self.lock = hostlock.HostLock(operation, kind).acquire()
        return self.lock

    def free(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


@pytest.fixture
def host_lock(cfg):
    holder = HostLockHolder()
    yield holder
    holder.free()


# -- releases --------------------------------------------------------------------------------------------


def fake_download(monkeypatch, archives: dict[str, Path]):
    """download.download(url, f, ...) copies archives[url] into f and returns its sha256; an unknown URL
    fails as a 404 whose message names the URL in full (the step must redact it)."""
    def _download(url, dest, *, limits, expected_sha256=None, progress=None, ca_bundle=None):
        if url not in archives:
            raise OpsError(Reason.DOWNLOAD_FAILED, f"HTTP 404 from {url}")
        data = archives[url].read_bytes()
        if progress:
            progress(0, len(data))
        dest.write(data)
        if progress:
            progress(len(data), len(data))
        digest = sha(data)
        if expected_sha256 and expected_sha256 != digest:
            raise OpsError(Reason.CHECKSUM_MISMATCH, "agent archive SHA-256 does not match expected digest")
        return digest

    monkeypatch.setattr(download, "download", _download)


@pytest.fixture
def release(tmp_path, monkeypatch):
    """release(version="2.0.0", url=URL, body=None) serves an archive of that agent at url (and keeps the
    ones served before); returns the archive's path."""
    archives: dict[str, Path] = {}

    def make(version: str = "2.0.0", url: str = URL, body: bytes | None = None) -> Path:
        path = valid_archive(tmp_path / f"release-{len(archives)}.tar.gz", body or agent_body(version))
        archives[url] = path
        fake_download(monkeypatch, archives)
        return path

    return make


# -- operations ------------------------------------------------------------------------------------------


def begin(cfg: Config, id: str = ID, url: str = URL, kind: str = "upgrade", operation: str | None = None,
          **spec) -> UpgradeRecord:
    """What the dispatcher does first for a request (the caller holds the host lock for id)."""
    return api.begin(cfg, api.Spec(id=id, operation=operation or f"op-{id}", kind=kind,
                                   url=url if kind == "upgrade" else "", **spec))


def run_chain(cfg: Config, id: str = ID) -> UpgradeRecord:
    """stage, preflight and switch of operation id, as the chain's units run them."""
    stage.run(cfg, id)
    preflight.run(cfg, id)
    return switch.run(cfg, id)


def upgrade_to(cfg: Config, host_lock: HostLockHolder, fake: FakeSystemd, id: str, url: str = URL,
               kind: str = "upgrade") -> UpgradeRecord:
    """A whole operation that commits: begin, the chain, probation with a healthy daemon."""
    host_lock.hold(id, kind)
    begin(cfg, id, url, kind=kind)
    run_chain(cfg, id)
    rec = probation.run(cfg)
    assert rec.committed, rec.describe()
    return rec


@pytest.fixture
def switched(cfg, tmp_path, release, host_lock, fake_systemd):
    """v1 in blue, v2 staged in green, preflighted and switched: the record of ID is on probation, the
    host lock held for ID, no systemd call recorded yet."""
    lay = seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    begin(cfg)
    run_chain(cfg)
    fake_systemd.calls.clear()
    # the switched daemon's run began well before anything the test does next (a flip of the links, whose
    # time comes from the kernel's coarse clock): no test depends on the clock tick a step lands in
    fake_systemd.daemon["started_realtime"] -= 60
    return lay


def read(cfg: Config) -> UpgradeRecord:
    rec = Store(cfg).read()
    assert rec is not None
    return rec

