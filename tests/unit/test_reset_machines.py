"""Stopping kube1/kube2: graceful first, then terminate, each bounded; what counts as stopped; an inventory
that cannot be read fails closed. systemd and machined are faked at the systemd module (the D-Bus layer)."""

import pytest

from unbounded_agent import systemd
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import machines


class FakeHost:
    """Machines that stop when asked (unless stubborn) and die on a kill (unless undying), as systemd1 and
    machine1 would show them through unbounded_agent.systemd."""

    def __init__(self, running=(), stubborn=(), undying=(), enabled=(), scope_only=(), machined_down=False,
                 unreadable_file_state=(), refuse_disable=(), machined_absent=False):
        self.running, self.stubborn, self.undying = set(running), set(stubborn), set(undying)
        self.enabled = set(enabled)
        self.scope_only = set(scope_only)  # registered from a scope: no running unit of ours to stop
        self.machined_down, self.unreadable, self.refuse_disable = machined_down, set(unreadable_file_state), set(refuse_disable)
        self.machined_absent = machined_absent  # no systemd-machined on this host: nothing is registered
        self.calls = []

    @staticmethod
    def _machine(unit):
        return unit.split("@")[1].split(".")[0]

    def list_machines(self):
        if self.machined_absent:
            raise systemd.SystemdError("cannot list machines through systemd-machined: The name "
                                       "org.freedesktop.machine1 was not provided by any .service files")
        if self.machined_down:
            raise systemd.SystemdError("cannot list machines through systemd-machined: Connection refused")
        return set(self.running)

    def unit_file_state(self, unit):
        if unit == machines.MACHINED_UNIT:
            return "not-found" if self.machined_absent else "static"
        m = self._machine(unit)
        if m in self.unreadable:
            raise systemd.SystemdError(f"cannot read the unit file state of {unit}: Access denied")
        return "enabled" if m in self.enabled else "disabled"

    def unit_state(self, unit):
        m = self._machine(unit)
        active = m in self.running and m not in self.scope_only
        return {"unit": unit, "active_state": "active" if active else "inactive"}

    def disable_unit_files(self, units):
        self.calls += [("disable", self._machine(u)) for u in units]
        self.enabled -= {self._machine(u) for u in units} - self.refuse_disable

    def stop_unit(self, unit, mode="replace"):
        m = self._machine(unit)
        self.calls.append(("stop", m))
        if m in self.scope_only:
            raise systemd.SystemdError(f"StopUnit({unit}) failed: Unit {unit} not loaded.")
        if m not in self.stubborn:
            self.running.discard(m)
        return "/org/freedesktop/systemd1/job/1"

    def kill_machine(self, name, who, signal):
        self.calls.append(("kill-machine", name, who, signal))
        if self.machined_absent:
            raise systemd.SystemdError("cannot kill machine: org.freedesktop.machine1 was not provided")
        if name not in self.undying:
            self.running.discard(name)

    def kill_unit(self, unit, who, signal):
        self.calls.append(("kill-unit", self._machine(unit), who, signal))

    def reset_failed(self, unit):
        self.calls.append(("reset-failed", self._machine(unit)))
        raise systemd.SystemdError("ResetFailedUnit failed: Access denied")  # cosmetic: must not matter

    def kills(self):
        return [c[1] for c in self.calls if c[0] == "kill-machine"]


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        host = FakeHost(**kw)
        for name in ("list_machines", "unit_file_state", "unit_state", "disable_unit_files", "stop_unit",
                     "kill_machine", "kill_unit", "reset_failed"):
            monkeypatch.setattr(systemd, name, getattr(host, name))
        return host
    return install


def test_graceful_stop_needs_no_kill(fake):
    host = fake(running={"kube1", "kube2"})
    out = machines.stop(graceful_timeout=5, terminate_timeout=5)
    assert [(o.machine, o.was_running, o.forced) for o in out] == [("kube1", True, False), ("kube2", True, False)]
    assert host.kills() == []
    assert [c for c in host.calls if c[0] == "stop"] == [("stop", "kube1"), ("stop", "kube2")]


def test_a_machine_ignoring_the_graceful_stop_is_killed_after_the_bound(fake):
    import signal

    host = fake(running={"kube1", "kube2"}, stubborn={"kube2"})
    seen = []
    # A zero graceful bound: whatever still runs at the first look is terminated.
    out = machines.stop(graceful_timeout=0, terminate_timeout=5, log=seen.append)
    assert [o.forced for o in out] == [False, True]
    assert host.kills() == ["kube2"]
    assert ("kill-unit", "kube2", "all", signal.SIGKILL) in host.calls
    assert host.running == set()
    assert any("kube2 did not stop within 0 s; terminating it" in line for line in seen)
    # A forced stop leaves the unit failed: it is cleared, and a refusal to clear it does not matter.
    assert ("reset-failed", "kube2") in host.calls


def test_a_machine_that_survives_termination_is_an_error(fake):
    fake(running={"kube1", "kube2"}, stubborn={"kube2"}, undying={"kube2"})
    with pytest.raises(OpsError) as e:
        machines.stop(graceful_timeout=0, terminate_timeout=0)
    assert e.value.reason is Reason.MACHINE_STILL_RUNNING
    assert "kube2" in e.value.message and "kube1" not in e.value.message


def test_a_machine_registered_from_a_scope_is_killed_when_its_unit_cannot_be_stopped(fake):
    host = fake(running={"kube1"}, stubborn={"kube1"}, scope_only={"kube1"})
    seen = []
    out = machines.stop(graceful_timeout=0, terminate_timeout=5, log=seen.append)
    assert [(o.machine, o.was_running, o.forced) for o in out] == [("kube1", True, True), ("kube2", False, False)]
    assert any("graceful stop of systemd-nspawn@kube1.service was refused" in line for line in seen)
    assert host.kills() == ["kube1"] and host.running == set()


def test_nothing_running_means_nothing_to_do(fake):
    host = fake(running={"kube10"})  # kube10 is not kube1
    out = machines.stop(graceful_timeout=5, terminate_timeout=5)
    assert [o.was_running for o in out] == [False, False]
    assert host.calls == []
    assert host.running == {"kube10"}


def test_machined_unreachable_fails_the_inventory_closed(fake):
    fake(running={"kube1"}, machined_down=True)
    with pytest.raises(OpsError) as e:
        machines.inspect()
    assert e.value.reason is Reason.INVENTORY_FAILED and "machined" in e.value.message


def test_an_unreadable_unit_file_state_fails_the_inventory_closed(fake):
    # Not "not-found", not "disabled": a state systemd would not tell is never taken for "not enabled".
    host = fake(running=(), enabled={"kube2"}, unreadable_file_state={"kube2"})
    with pytest.raises(OpsError) as e:
        machines.inspect()
    assert e.value.reason is Reason.INVENTORY_FAILED
    assert "systemd-nspawn@kube2.service" in e.value.message and "Access denied" in e.value.message
    with pytest.raises(OpsError) as e:
        machines.stop(graceful_timeout=5, terminate_timeout=5)
    assert e.value.reason is Reason.INVENTORY_FAILED
    with pytest.raises(OpsError) as e:
        machines.disable("kube2")
    assert e.value.reason is Reason.INVENTORY_FAILED
    assert host.calls == []  # nothing was stopped or disabled on a guess


def test_disable_only_what_is_enabled_and_verify_it(fake):
    host = fake(enabled={"kube1"})
    assert machines.disable("kube1") is True
    assert machines.disable("kube2") is False
    assert host.calls == [("disable", "kube1")] and host.enabled == set()


def test_a_unit_still_enabled_after_disabling_is_an_error(fake):
    fake(enabled={"kube1"}, refuse_disable={"kube1"})
    with pytest.raises(OpsError) as e:
        machines.disable("kube1")
    assert e.value.reason is Reason.EXECUTION_FAILED
    assert "systemd-nspawn@kube1.service is still enabled after disabling it" in e.value.message


def test_state_meanings():
    s = machines.MachineState("kube1", registered=False, unit_active_state="deactivating", unit_file_state="enabled")
    assert s.running and s.enabled
    s = machines.MachineState("kube1", registered=False, unit_active_state="failed", unit_file_state="static")
    assert not s.running and not s.enabled
    s = machines.MachineState("kube1", registered=True, unit_active_state="inactive", unit_file_state="not-found")
    assert s.running and not s.enabled  # registered counts as running even without our unit
    assert machines.unit_of("kube1") == "systemd-nspawn@kube1.service"


def test_without_machined_nothing_is_registered_and_the_units_are_still_stopped(fake):
    host = fake(running={"kube1", "kube2"}, enabled={"kube1"}, machined_absent=True)
    states = {s.name: s for s in machines.inspect()}
    assert [(s.registered, s.running) for s in states.values()] == [(False, True), (False, True)]
    assert machines.disable("kube1") is True
    outcomes = machines.stop(graceful_timeout=1, terminate_timeout=1)
    assert [(o.machine, o.was_running, o.forced) for o in outcomes] == [("kube1", True, False), ("kube2", True, False)]
    assert ("stop", "kube1") in host.calls and ("stop", "kube2") in host.calls
    assert not host.running


def test_without_machined_a_stubborn_unit_is_killed_through_systemd(fake, monkeypatch):
    host = fake(running={"kube1"}, stubborn={"kube1"}, machined_absent=True)

    def kill_unit(unit, who, signal):  # with no machined, only systemd can kill the machine's processes
        host.calls.append(("kill-unit", host._machine(unit), who, signal))
        host.running.discard(host._machine(unit))
    monkeypatch.setattr(systemd, "kill_unit", kill_unit)
    outcomes = machines.stop(graceful_timeout=0.2, terminate_timeout=1)
    assert outcomes[0].forced and not host.running


def test_machined_installed_but_failing_still_fails_closed(fake):
    fake(machined_down=True)
    with pytest.raises(OpsError) as e:
        machines.inspect()
    assert e.value.reason is Reason.INVENTORY_FAILED
