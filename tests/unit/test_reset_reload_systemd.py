"""Step 8: daemon-reload through the step's units object; a failure is the step's, with a readable reason."""

import pytest

from unbounded_agent import systemd
from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset.reports import Checkpoint, write_checkpoint
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.steps import reload_systemd

RUN = "req-0001"


class FakeUnits:
    def __init__(self, error=None):
        self.error, self.reloads = error, 0

    def reload(self):
        if self.error:
            raise self.error
        self.reloads += 1


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    write_checkpoint(Checkpoint(run_id=RUN), tmp_path / "reset")
    with HostLock(RUN, "reset").acquire():
        yield lambda units: run_step(reload_systemd.STEP, directory=tmp_path / "reset", systemd=units)


def test_systemd_is_reloaded(run):
    units = FakeUnits()
    report = run(units)
    assert (report.result, report.phase, units.reloads) == ("succeeded", 2, 1)
    assert report.notes == ["systemd reloaded its units"]


def test_a_failed_reload_fails_the_step(run):
    report = run(FakeUnits(systemd.SystemdError("Reload() failed: Access denied")))
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert report.failed[0].error == "daemon-reload failed: Reload() failed: Access denied"


def test_an_ops_error_keeps_its_reason(run):
    report = run(FakeUnits(OpsError(Reason.INVENTORY_FAILED, "cannot reach systemd over D-Bus")))
    assert (report.result, report.reason) == ("failed", "InventoryFailed")
