"""The agent's nspawn machines (kube1, kube2): inspect, disable, stop, force-terminate — over D-Bus
through systemd.py (systemd1 for the unit, machine1 for registration). No machinectl/systemctl.

"Stopped" means both: machined no longer lists the machine *by exact name* (kube10 is not kube1) and
its ``systemd-nspawn@<m>.service`` is not running. On a host without machined nothing is registered:
the unit alone decides, and it is stopped all the same. Stopping is graceful first (StopUnit: nspawn
asks the payload to shut down with its KillSignal=), bounded by ``graceful_timeout``; a machine
still there is then killed (SIGKILL to every process of the machine and of its unit), bounded by
``terminate_timeout``; a machine still registered after that is an error. The pending graceful stop
job cannot be relied on to escalate by itself: systemd would only kill after the unit's own
TimeoutStopSec (90 s by default), and machined's TerminateMachine merges into that same stop job.
"""

import dataclasses
import signal
import time

from .. import systemd
from ..reasons import OpsError, Reason

AGENT_MACHINES = ("kube1", "kube2")
GRACEFUL_TIMEOUT = 30.0  # seconds, as upstream
TERMINATE_TIMEOUT = 15.0
POLL_INTERVAL = 0.2
_RUNNING_STATES = systemd.RUNNING_STATES


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
        return systemd.enabled(self.unit_file_state)


MACHINED_UNIT = "systemd-machined.service"


def registered_machines() -> set[str]:
    """Names machined lists. Fails closed: machined unreachable is INVENTORY_FAILED, not 'none' — unless the
    host has no machined at all (no unit file: systemd-container without it, or a minimal host), where no
    machine can be registered and the machines' units alone say whether they run."""
    try:
        return systemd.list_machines()
    except systemd.SystemdError as e:
        error = e
    try:
        installed = systemd.unit_file_state(MACHINED_UNIT) != "not-found"
    except systemd.SystemdError:
        installed = True
    if installed:
        raise OpsError(Reason.INVENTORY_FAILED, str(error)) from None
    return set()


def inspect(machines=AGENT_MACHINES) -> list[MachineState]:
    registered = registered_machines()
    out = []
    for m in machines:
        try:
            file_state = systemd.unit_file_state(unit_of(m))
            active = systemd.unit_state(unit_of(m))["active_state"]
        except systemd.SystemdError as e:
            raise OpsError(Reason.INVENTORY_FAILED,
                           f"cannot read the state of the machines' units from systemd: {e}") from None
        out.append(MachineState(m, m in registered, active, file_state))
    return out


def disable(machine: str) -> bool:
    """Disable systemd-nspawn@<m>.service (the `machinectl disable` part). True if it was enabled.
    Afterwards the unit must be in a state that does not start at boot, else this is an error."""
    name = unit_of(machine)
    try:
        before = systemd.unit_file_state(name)
    except systemd.SystemdError as e:
        raise OpsError(Reason.INVENTORY_FAILED, str(e)) from None
    if not systemd.enabled(before):
        return False
    try:
        systemd.disable_unit_files([name])
        after = systemd.unit_file_state(name)
    except systemd.SystemdError as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot disable {name}: {e}") from None
    if systemd.enabled(after):
        raise OpsError(Reason.EXECUTION_FAILED, f"{name} is still {after} after disabling it")
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
    states = {s.name: s for s in inspect(machines)}
    outcomes = {m: StopOutcome(m, states[m].running) for m in machines}
    pending = [m for m in machines if states[m].running]
    for m in pending:
        log(f"stopping machine {m} ({unit_of(m)} {states[m].unit_active_state}); graceful bound {graceful_timeout:g} s")
        try:
            systemd.stop_unit(unit_of(m))
        except systemd.SystemdError as e:  # e.g. a machine registered from a scope, not our unit: the kill covers it
            log(f"graceful stop of {unit_of(m)} was refused: {e}")
    pending = _wait_gone(pending, graceful_timeout, machines)
    if pending:
        for m in pending:
            outcomes[m].forced = True
            log(f"machine {m} did not stop within {graceful_timeout:g} s; terminating it (SIGKILL)")
            _kill(m)
        pending = _wait_gone(pending, terminate_timeout, machines)
    for m in machines:  # a forced stop leaves the unit "failed": clear it so the host looks clean
        if outcomes[m].was_running:
            try:
                systemd.reset_failed(unit_of(m))
            except systemd.SystemdError:
                pass  # not failed, or denied (SELinux on some hosts): cosmetic only
    if pending:
        raise OpsError(
            Reason.MACHINE_STILL_RUNNING,
            f"machine(s) {', '.join(pending)} still running after a graceful stop ({graceful_timeout:g} s) "
            f"and termination ({terminate_timeout:g} s)",
        )
    return [outcomes[m] for m in machines]


def _kill(machine: str) -> None:
    try:
        systemd.kill_machine(machine, "all", signal.SIGKILL)
    except systemd.SystemdError:
        pass  # not registered (any more): the unit kill below still applies
    try:
        systemd.kill_unit(unit_of(machine), "all", signal.SIGKILL)
    except systemd.SystemdError:
        pass  # unit not running (any more); _wait_gone decides


def _wait_gone(pending: list[str], timeout: float, machines) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        running = {s.name for s in inspect(machines) if s.running}
        pending = [m for m in pending if m in running]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(POLL_INTERVAL)
