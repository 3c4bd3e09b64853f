"""The agent's nspawn machines (kube1, kube2): inspect, disable, stop, force-terminate — over D-Bus
through pystemd (systemd1 for the unit, machine1 for registration). No machinectl/systemctl.

"Stopped" means both: machined no longer lists the machine *by exact name* (kube10 is not kube1) and
its ``systemd-nspawn@<m>.service`` is not running. Stopping is graceful first (StopUnit: nspawn
asks the payload to shut down with its KillSignal=), bounded by ``graceful_timeout``; a machine
still there is then killed (SIGKILL to every process of the machine and of its unit), bounded by
``terminate_timeout``; a machine still registered after that is an error. The pending graceful stop
job cannot be relied on to escalate by itself: systemd would only kill after the unit's own
TimeoutStopSec (90 s by default), and machined's TerminateMachine merges into that same stop job.
"""

import dataclasses
import signal
import time

from .reasons import OpsError, Reason, describe_error

AGENT_MACHINES = ("kube1", "kube2")
GRACEFUL_TIMEOUT = 30.0  # seconds, as upstream
TERMINATE_TIMEOUT = 15.0
POLL_INTERVAL = 0.2
# UnitFileState values that mean "will not start at boot" (upstream's accepted set).
NOT_ENABLED = {"", "disabled", "not-found", "masked", "masked-runtime", "static", "indirect", "bad"}
_RUNNING_STATES = {"active", "activating", "deactivating", "reloading"}


def unit_of(machine: str) -> str:
    return f"systemd-nspawn@{machine}.service"


@dataclasses.dataclass
class MachineState:
    name: str
    registered: bool  # listed by machined
    unit_active_state: str  # ActiveState of systemd-nspawn@<m>.service
    unit_file_state: str  # UnitFileState: enabled means it starts at boot

    @property
    def running(self) -> bool:
        return self.registered or self.unit_active_state in _RUNNING_STATES

    @property
    def enabled(self) -> bool:
        return self.unit_file_state not in NOT_ENABLED


def _d(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def registered_machines() -> set[str]:
    """Names machined lists. Fails closed: machined unreachable is INVENTORY_FAILED, not 'none'."""
    from pystemd.machine1 import Manager

    try:
        with Manager() as m:
            return {_d(entry[0]) for entry in m.Manager.ListMachines()}
    except Exception as e:
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot list machines through systemd-machined: {describe_error(e)}") from None


def systemd_manager():
    """A loaded systemd Manager over D-Bus; INVENTORY_FAILED when systemd cannot be reached."""
    from pystemd.systemd1 import Manager

    try:
        m = Manager()
        m.load()
        return m
    except Exception as e:
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot reach systemd over D-Bus: {describe_error(e)}") from None


def _unit_states(manager, machine: str) -> tuple[str, str]:
    from pystemd.systemd1 import Unit

    name = unit_of(machine).encode()
    try:
        file_state = _d(manager.Manager.GetUnitFileState(name))
    except Exception as e:
        # No unit file for this name at all (e.g. the template is not installed).
        if "NoSuchUnit" in str(e) or "not found" in str(e).lower():
            file_state = "not-found"
        else:
            raise
    with Unit(name) as unit:
        return _d(unit.Unit.ActiveState), file_state


def inspect(machines=AGENT_MACHINES) -> list[MachineState]:
    registered = registered_machines()
    try:
        manager = systemd_manager()
        out = []
        for m in machines:
            active, file_state = _unit_states(manager, m)
            out.append(MachineState(m, m in registered, active, file_state))
        return out
    except OpsError:
        raise
    except Exception as e:
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot read the state of the machines' units from systemd: {describe_error(e)}") from None


def disable(machine: str) -> bool:
    """Disable systemd-nspawn@<m>.service (the `machinectl disable` part). True if it was enabled.
    Afterwards the unit must be in a state that does not start at boot, else this is an error."""
    manager = systemd_manager()
    name = unit_of(machine).encode()
    try:
        _, before = _unit_states(manager, machine)
    except Exception as e:
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot read the state of {unit_of(machine)}: {describe_error(e)}") from None
    if before in NOT_ENABLED:
        return False
    try:
        manager.Manager.DisableUnitFiles([name], False)
    except Exception as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot disable {unit_of(machine)}: {describe_error(e)}") from None
    _, after = _unit_states(manager, machine)
    if after not in NOT_ENABLED:
        raise OpsError(Reason.EXECUTION_FAILED, f"{unit_of(machine)} is still {after} after disabling it")
    return True


@dataclasses.dataclass
class StopOutcome:
    machine: str
    was_running: bool
    forced: bool = False  # the graceful stop did not finish within its bound


def stop(machines=AGENT_MACHINES, graceful_timeout: float = GRACEFUL_TIMEOUT,
         terminate_timeout: float = TERMINATE_TIMEOUT, log=lambda msg: None) -> list[StopOutcome]:
    """Stop the machines, all at once (the bounds apply to the group, not to each in turn).

    Raises MACHINE_STILL_RUNNING naming every machine still there after both bounds.
    """
    manager = systemd_manager()
    states = {s.name: s for s in inspect(machines)}
    outcomes = {m: StopOutcome(m, states[m].running) for m in machines}
    pending = [m for m in machines if states[m].running]
    for m in pending:
        log(f"stopping machine {m} ({unit_of(m)} {states[m].unit_active_state}); graceful bound {graceful_timeout:g} s")
        try:
            manager.Manager.StopUnit(unit_of(m).encode(), b"replace")
        except Exception as e:  # e.g. a machine registered from a scope, not our unit: the kill below covers it
            log(f"graceful stop of {unit_of(m)} was refused: {describe_error(e)}")
    pending = _wait_gone(pending, graceful_timeout, machines)
    if pending:
        for m in pending:
            outcomes[m].forced = True
            log(f"machine {m} did not stop within {graceful_timeout:g} s; terminating it (SIGKILL)")
            _kill(manager, m)
        pending = _wait_gone(pending, terminate_timeout, machines)
    for m in machines:  # a forced stop leaves the unit "failed": clear it so the host looks clean
        if outcomes[m].was_running:
            try:
                manager.Manager.ResetFailedUnit(unit_of(m).encode())
            except Exception:
                pass  # not failed, or denied (SELinux on some hosts): cosmetic only
    if pending:
        raise OpsError(
            Reason.MACHINE_STILL_RUNNING,
            f"machine(s) {', '.join(pending)} still running after a graceful stop ({graceful_timeout:g} s) "
            f"and termination ({terminate_timeout:g} s)",
        )
    return [outcomes[m] for m in machines]


def _kill(manager, machine: str) -> None:
    from pystemd.machine1 import Manager

    try:
        with Manager() as mm:
            mm.Manager.KillMachine(machine.encode(), b"all", signal.SIGKILL)
    except Exception:
        pass  # not registered (any more): the unit kill below still applies
    try:
        manager.Manager.KillUnit(unit_of(machine).encode(), b"all", signal.SIGKILL)
    except Exception:
        pass  # unit not running (any more); _wait_gone decides


def _wait_gone(pending: list[str], timeout: float, machines) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        running = {s.name for s in inspect(machines) if s.running}
        pending = [m for m in pending if m in running]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(POLL_INTERVAL)
