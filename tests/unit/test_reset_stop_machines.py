"""Step 1: kube1 and kube2 are disabled first (so they do not come back at boot even if stopping fails), then
stopped within the bounds the unit passes; what was forced is reported. The machines module is faked here
(its own tests cover how it talks to systemd)."""

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import machines
from unbounded_agent.reset.reports import Checkpoint, read_report, reset_dir, write_checkpoint
from unbounded_agent.reset.runner import exit_code, run_step
from unbounded_agent.reset.step import Context
from unbounded_agent.reset.steps import stop_machines

RUN = "req-0001"


class FakeMachines:
    def __init__(self, running=(), enabled=(), forced=(), survivors=(), refuse_disable=()):
        self.running, self.enabled, self.forced = set(running), set(enabled), set(forced)
        self.survivors, self.refuse_disable = set(survivors), set(refuse_disable)
        self.calls = []

    def inspect(self, names=machines.AGENT_MACHINES):
        return [machines.MachineState(m, m in self.running, "active" if m in self.running else "inactive",
                                      "enabled" if m in self.enabled else "disabled") for m in names]

    def disable(self, m):
        self.calls.append(("disable", m))
        if m in self.refuse_disable:
            raise OpsError(Reason.EXECUTION_FAILED, f"systemd-nspawn@{m}.service is still enabled after disabling it")
        was = m in self.enabled
        self.enabled.discard(m)
        return was

    def stop(self, names, graceful_timeout, terminate_timeout, log):
        self.calls.append(("stop", tuple(names), graceful_timeout, terminate_timeout))
        out = [machines.StopOutcome(m, m in self.running, m in self.forced) for m in names]
        if self.survivors:
            raise OpsError(Reason.MACHINE_STILL_RUNNING, f"machine(s) {', '.join(sorted(self.survivors))} still running")
        self.running.clear()
        return out


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A reset run in progress (checkpoint in the ops dir, lock held); install(...) fakes the machines."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    write_checkpoint(Checkpoint(run_id=RUN))

    def install(**kw):
        host = FakeMachines(**kw)
        for name in ("inspect", "disable", "stop"):
            monkeypatch.setattr(machines, name, getattr(host, name))
        return host

    with HostLock(RUN, "reset").acquire():
        yield install


def test_disable_first_then_stop_both(fake):
    host = fake(running={"kube1", "kube2"}, enabled={"kube1"})
    report = run_step(stop_machines.STEP, graceful_timeout=5, terminate_timeout=2)
    assert report.result == "succeeded", report
    assert host.calls == [("disable", "kube1"), ("disable", "kube2"), ("stop", ("kube1", "kube2"), 5, 2)]
    assert report.removed == ["enabled unit systemd-nspawn@kube1.service", "machine kube1", "machine kube2"]
    assert (report.absent, report.forced) == ([], [])


def test_nothing_running_is_already_absent(fake):
    fake(running={"kube10"})
    report = run_step(stop_machines.STEP)
    assert (report.result, report.removed) == ("succeeded", [])
    assert report.absent == ["machine kube1", "machine kube2"]


def test_a_machine_that_had_to_be_terminated_is_reported(fake):
    fake(running={"kube1", "kube2"}, forced={"kube2"})
    report = run_step(stop_machines.STEP, graceful_timeout=0.5)
    assert report.succeeded and report.forced == ["kube2"]
    assert "machine kube2 ignored the graceful stop for 0.5 s and was terminated" in report.notes


def test_a_machine_still_running_fails_the_step_but_it_stays_disabled(fake):
    host = fake(running={"kube1", "kube2"}, enabled={"kube1", "kube2"}, survivors={"kube2"})
    report = run_step(stop_machines.STEP)
    assert (report.result, report.reason) == ("failed", "MachineStillRunning")
    assert "kube2 still running" in report.failed[0].error
    assert host.enabled == set()
    assert report.removed == ["enabled unit systemd-nspawn@kube1.service", "enabled unit systemd-nspawn@kube2.service"]
    assert exit_code(report) == 23


def test_a_unit_that_cannot_be_disabled_does_not_keep_the_machines_running(fake):
    host = fake(running={"kube1"}, enabled={"kube1", "kube2"}, refuse_disable={"kube1"})
    report = run_step(stop_machines.STEP)
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert report.failed[0].item == "enabled unit systemd-nspawn@kube1.service"
    assert host.running == set() and "machine kube1" in report.removed


def test_an_unreadable_inventory_fails_the_step_closed(fake, monkeypatch):
    host = fake(running={"kube1"})

    def unreadable(*a, **kw):
        raise OpsError(Reason.INVENTORY_FAILED, "cannot list machines through systemd-machined: Connection refused")

    monkeypatch.setattr(machines, "disable", unreadable)
    monkeypatch.setattr(machines, "stop", unreadable)
    report = run_step(stop_machines.STEP)
    assert (report.result, report.reason) == ("failed", "InventoryFailed")
    assert host.running == {"kube1"}


def test_the_plan_names_what_is_enabled_and_what_runs(fake):
    fake(running={"kube2"}, enabled={"kube1"})
    plan = stop_machines.STEP.plan(Context(machine_name="m", bin_dirs=(), state_dirs=()))
    assert [(str(i), i.action) for i in plan] == [
        ("enabled unit systemd-nspawn@kube1.service (enabled)", "disable"),
        ("machine kube2 (registered, systemd-nspawn@kube2.service active)", "stop")]


def test_the_unit_passes_its_bounds_on_the_command_line(fake):
    host = fake(running={"kube1"})
    assert stop_machines.main(["--graceful-timeout", "0", "--terminate-timeout", "4"]) == 0
    assert host.calls[-1] == ("stop", ("kube1", "kube2"), 0.0, 4.0)
    assert read_report(1, "stop-machines", reset_dir()).succeeded
