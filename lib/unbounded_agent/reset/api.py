"""What the dispatcher calls to run a reset, while it holds the host for it (from the first step to the last).

    outcome = api.run(Spec(id, operation, all_wg), before_daemon_stops=callback)

Phase 1 (``unbounded-agent-reset-phase1.target``) is everything that can fail, with the daemon running:
steps 1–6, the removals of step 7 and their verification. Only when every step of it succeeded does
``before_daemon_stops`` run — the dispatcher supersedes the requests queued behind the reset and lets the
requester report ``Complete`` — and then phase 2 (``-phase2.target``: stop and disable the daemon,
daemon-reload, the final check). A failed phase 1 leaves the daemon running. Each step writes its own
report; this module only starts the targets and reads the reports back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from .. import log, systemd
from ..reasons import OpsError, Reason
from .reports import ResetRequest, read_report, write_request
from .steps import all_steps, of_phase

PHASE1_TARGET = "unbounded-agent-reset-phase1.target"
PHASE2_TARGET = "unbounded-agent-reset-phase2.target"
TARGETS = {1: PHASE1_TARGET, 2: PHASE2_TARGET}


@dataclasses.dataclass(frozen=True)
class Spec:
    id: str
    operation: str
    all_wg: bool = False
    uid: str = ""  # the MachineOperation's, when one asked for it


@dataclasses.dataclass
class StepOutcome:
    step: str
    number: int
    succeeded: bool
    reason: str
    message: str
    removed: int = 0


@dataclasses.dataclass
class PhaseOutcome:
    phase: int
    steps: list[StepOutcome]

    @property
    def succeeded(self) -> bool:
        return all(s.succeeded for s in self.steps)

    def first_failure(self) -> StepOutcome | None:
        return next((s for s in self.steps if not s.succeeded), None)


@dataclasses.dataclass
class Outcome:
    succeeded: bool
    reason: str
    message: str
    step: str | None = None
    phases: list[PhaseOutcome] = dataclasses.field(default_factory=list)


COMPLETE = "the agent, its machines, links, keys and routing are gone from this host"


def run(spec: Spec, before_daemon_stops: Callable[[PhaseOutcome], None] = lambda phase1: None) -> Outcome:
    write_request(ResetRequest(run_id=spec.id, all_wg=spec.all_wg, requested_by=spec.operation, uid=spec.uid))
    wait_until_no_step_runs(spec.id)
    phase1 = run_phase(1, spec.id)
    if not phase1.succeeded:
        return _failed(phase1, "the agent's daemon keeps running; fix the cause and reset again")
    before_daemon_stops(phase1)
    phase2 = run_phase(2, spec.id)
    if not phase2.succeeded:
        out = _failed(phase2, "everything else is gone; run `unbounded-agent reset` again to finish")
        out.phases.insert(0, phase1)
        return out
    return Outcome(True, Reason.SUCCEEDED.value, f"reset complete: {COMPLETE}", phases=[phase1, phase2])


def _failed(phase: PhaseOutcome, what: str) -> Outcome:
    f = phase.first_failure()
    assert f is not None, "_failed is only called for a phase that did not succeed"
    return Outcome(False, f.reason, f"reset step {f.number} ({f.step}) failed: {f.message}; {what}", step=f.step,
                   phases=[phase])


def wait_until_no_step_runs(run_id: str, poll: float = 0.2) -> None:
    """A dispatcher killed in the middle of this reset may have left steps of it at work (a phase-2 step
    would, e.g., remove the checkpoint under a phase-1 step started now): let them end before starting over."""
    units = [step.unit for step in all_steps()]
    said = False
    while True:
        try:
            busy = systemd.busy(units)
        except systemd.SystemdError as e:  # starting the phase then fails with the same cause, and says so
            log.warn(f"reset {run_id}: cannot tell whether steps of an earlier run are at work: {e}")
            return
        if not busy:
            return
        if not said:
            log.info(f"reset {run_id}: waiting for {', '.join(busy)}, left at work by an interrupted run, to end")
            said = True
        time.sleep(poll)


def run_phase(number: int, run_id: str) -> PhaseOutcome:
    """Start a phase's target, wait until its job is done, and read what each of its steps reported."""
    target = TARGETS[number]
    log.info(f"reset {run_id}: starting {target}")
    try:
        job = systemd.start_unit(target)
        systemd.wait_jobs_done([job])
    except systemd.SystemdError as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot run {target}: {e}") from None
    return PhaseOutcome(number, [step_outcome(step, run_id) for step in of_phase(number)])


def step_outcome(step, run_id: str) -> StepOutcome:
    report = read_report(step.number, step.name)
    if report is None or report.run_id != run_id:
        # No report: the step failed before it could write one, or it never ran (a unit it requires failed,
        # or the run was cut short).
        try:
            st = systemd.unit_state(step.unit)
        except systemd.SystemdError:
            st = {}
        failed = st.get("active_state") == "failed"
        how = (f"ended without a report (unit result {st.get('result')}, exit status {st.get('exit_status')})"
               if failed else "did not run (a unit it requires failed, or the job was cancelled)")
        return StepOutcome(step.name, step.number, False, Reason.EXECUTION_FAILED.value,
                           f"{how} (see journalctl -u {step.unit})")
    if report.succeeded:
        return StepOutcome(step.name, step.number, True, report.reason, "", len(report.removed))
    first = report.first_failure()
    return StepOutcome(step.name, step.number, False, first.reason or report.reason, first.error, len(report.removed))
