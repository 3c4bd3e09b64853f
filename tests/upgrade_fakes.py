"""Helpers for the fast AgentUpgrade tests: a config in a temp dir, a seeded bin dir, small agents,
and a stand-in for the systemd calls the upgrade steps make (recorded, scripted daemon states)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from unbounded_agent import layout, systemd, upgrade
from unbounded_agent.config import Config


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
                  **{"probation_seconds": 1.0, "ready_timeout_seconds": 2.0, **tunables})


def seed(cfg: Config, tmp_path: Path, version: str = "1.0.0") -> layout.Layout:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    lay = layout.Layout(cfg.bin_dir)
    lay.seed(write_agent(tmp_path / "packaged", version))
    return lay


class FakeSystemd:
    """Records start/restart/reset-failed calls; busy() answers from self.busy_units; the daemon's
    snapshot comes from self.daemon (a dict) or self.snapshots (a list consumed one per call)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.busy_units: set[str] = set()
        self.daemon = {"active_state": "active", "sub_state": "running", "invocation": "inv1", "job": 0,
                       "main_pid": 100, "n_restarts": 0, "result": "success", "exec_main_code": None,
                       "exec_main_status": 0, "exec_main_pid": 100}
        self.snapshots: list[dict] = []
        self.fail_restart = False

    def start_unit(self, name, mode="replace"):
        self.calls.append(("start", name))
        self._started(name)

    def restart_unit(self, name, mode="replace"):
        if self.fail_restart:
            raise systemd.SystemdUnavailable("start request repeated too quickly")
        self.calls.append(("restart", name))
        self._started(name)

    def _started(self, name):
        """A (re)started daemon comes up healthy as a new invocation; tests script anything else."""
        if name == systemd.DAEMON_UNIT:
            n = len(self.calls)
            self.daemon.update(active_state="active", sub_state="running", invocation=f"inv-started-{n}",
                               main_pid=1000 + n, job=0, n_restarts=0)

    def reset_failed(self, name):
        self.calls.append(("reset-failed", name))

    def busy(self, names):
        return [n for n in names if n in self.busy_units]

    def service_snapshot(self, name):
        if self.snapshots:
            snap = dict(self.daemon, **self.snapshots.pop(0))
            if not self.snapshots:
                self.daemon = snap
            return snap
        return dict(self.daemon)

    def unit_property(self, name, interface, prop):
        return 60_000_000


@pytest.fixture
def fake_systemd(monkeypatch):
    fake = FakeSystemd()
    for name in ("start_unit", "restart_unit", "reset_failed", "busy", "service_snapshot", "unit_property"):
        monkeypatch.setattr(systemd, name, getattr(fake, name))
    return fake


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv(upgrade.ENV_LOCK, str(tmp_path / "upgrade.lock"))
    monkeypatch.delenv(upgrade.ENV_HOLD, raising=False)
    return make_cfg(tmp_path)


def fake_download(monkeypatch, archives: dict[str, Path]):
    """download.download(url, f, ...) copies archives[url] into f and returns its sha256."""
    from unbounded_agent import download
    from unbounded_agent.reasons import OpsError, Reason

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


def copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest)
    return dest
