"""Stopping kube1/kube2: graceful first, then terminate, each bounded; what counts as stopped."""

import pytest

from unbounded_agent import machines
from unbounded_agent.reasons import OpsError, Reason


class FakeHost:
    """Machines that stop when asked (or ignore it: stubborn) and always die on a kill (unless undying)."""

    def __init__(self, running, stubborn=(), undying=()):
        self.running, self.stubborn, self.undying = set(running), set(stubborn), set(undying)
        self.calls = []

    def inspect(self, names):
        return [machines.MachineState(m, m in self.running, "active" if m in self.running else "inactive", "disabled")
                for m in names]

    class _Mgr:
        def __init__(self, host):
            self.host = host

        def StopUnit(self, unit, mode):
            m = unit.decode().split("@")[1].split(".")[0]
            self.host.calls.append(("stop", m))
            if m not in self.host.stubborn:
                self.host.running.discard(m)

        def ResetFailedUnit(self, unit):
            self.host.calls.append(("reset-failed", unit.decode()))

    def manager(self):
        mgr = type("M", (), {})()
        mgr.Manager = self._Mgr(self)
        return mgr

    def kill(self, manager, m):
        self.calls.append(("kill", m))
        if m not in self.undying:
            self.running.discard(m)


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        host = FakeHost(**kw)
        monkeypatch.setattr(machines, "inspect", host.inspect)
        monkeypatch.setattr(machines, "systemd_manager", host.manager)
        monkeypatch.setattr(machines, "_kill", host.kill)
        monkeypatch.setattr(machines, "POLL_INTERVAL", 0.01)
        return host
    return install


def test_graceful_stop_needs_no_kill(fake):
    host = fake(running={"kube1", "kube2"})
    out = machines.stop(graceful_timeout=5, terminate_timeout=5)
    assert [(o.machine, o.was_running, o.forced) for o in out] == [("kube1", True, False), ("kube2", True, False)]
    assert not [c for c in host.calls if c[0] == "kill"]


def test_a_machine_ignoring_the_graceful_stop_is_killed_after_the_bound(fake):
    host = fake(running={"kube1", "kube2"}, stubborn={"kube2"})
    out = machines.stop(graceful_timeout=0.05, terminate_timeout=5)
    assert [o.forced for o in out] == [False, True]
    assert ("kill", "kube2") in host.calls and ("kill", "kube1") not in host.calls
    assert host.running == set()


def test_a_machine_that_survives_termination_is_an_error(fake):
    fake(running={"kube1", "kube2"}, stubborn={"kube2"}, undying={"kube2"})
    with pytest.raises(OpsError) as e:
        machines.stop(graceful_timeout=0.05, terminate_timeout=0.05)
    assert e.value.reason is Reason.MACHINE_STILL_RUNNING
    assert "kube2" in e.value.message and "kube1" not in e.value.message


def test_nothing_running_means_nothing_to_do(fake):
    host = fake(running={"kube10"})
    out = machines.stop(graceful_timeout=5, terminate_timeout=5)
    assert [o.was_running for o in out] == [False, False]
    assert host.calls == []


def test_state_meanings():
    s = machines.MachineState("kube1", registered=False, unit_active_state="deactivating", unit_file_state="enabled")
    assert s.running and s.enabled
    s = machines.MachineState("kube1", registered=False, unit_active_state="failed", unit_file_state="static")
    assert not s.running and not s.enabled
    assert machines.unit_of("kube1") == "systemd-nspawn@kube1.service"
