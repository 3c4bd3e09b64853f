"""The host side of the two agent operations, as the watcher sees it — the only module of the watcher
that calls into the upgrade chain (upgrade.py) and the reset units (reset.py).

Everything here starts units or reads state files and returns at once; the watcher polls for outcomes,
so its loop (and the systemd watchdog it feeds) never waits on a long host step. Fast tests of the
watcher replace this module with a fake of the same functions (tests/watcher_fakes.py).

Outcomes are plain dicts: ``{"finished": bool, "succeeded": bool, "reason": str, "message": str}``.
"""

from __future__ import annotations

from . import log, systemd
from .config import Config
from .reasons import OpsError, Reason

# -- AgentUpgrade ----------------------------------------------------------------------------------------


def start_upgrade(cfg: Config, operation: str, url: str, sha256: str | None, force: bool) -> None:
    """Start the upgrade chain for operation (idempotent per operation name: asking again for the
    operation already in the record starts nothing). Raises OpsError: UPGRADE_IN_PROGRESS when another
    upgrade holds the host (nothing recorded: ask again later), other reasons when refused."""
    from . import upgrade

    upgrade.start_upgrade(cfg, url, sha256=sha256, force=force, operation=operation)


def upgrade_outcome(cfg: Config, operation: str) -> dict | None:
    """The upgrade record's verdict on operation, None when the record is about another one (or absent).

    committed → succeeded; rolled back → DaemonFailed with the recorded failure; failed before the
    switch → its reason. In flight (including probation, while the new daemon is watched) → not finished."""
    from . import upgrade

    rec = upgrade.Store(cfg).read()
    if not rec or rec.get("operation") != operation:
        return None
    phase = rec.get("phase")
    if phase not in upgrade.TERMINAL:
        return {"finished": False, "succeeded": False, "phase": phase, "reason": "", "message": upgrade.describe(rec)}
    reason = rec.get("reason") or (Reason.SUCCEEDED.value if phase == upgrade.COMMITTED else Reason.EXECUTION_FAILED.value)
    if phase == upgrade.ROLLED_BACK:
        reason = Reason.DAEMON_FAILED.value
    return {"finished": True, "succeeded": phase == upgrade.COMMITTED, "phase": phase, "reason": reason,
            "message": rec.get("message") or upgrade.describe(rec)}


# -- AgentReset ------------------------------------------------------------------------------------------


def _phase_units(number: int) -> list[str]:
    from . import reset

    target = reset.PHASE1_TARGET if number == 1 else reset.PHASE2_TARGET
    return [s.unit for s in reset.steps_of_phase(number)] + [target]


def request_reset(cfg: Config, operation: str) -> str:
    """Record a reset request (the run id the step reports will carry) without starting anything."""
    from . import reset

    return reset.write_request(all_wg=False, requested_by=f"MachineOperation {operation}")


def start_reset_phase1(cfg: Config, run_id: str) -> None:
    """Start the steps that leave the daemon running (unbounded-agent-reset-phase1.target) for run_id."""
    from . import reset, state

    path = reset.RESET_DIR / reset.REQUEST
    try:
        request = state.read_json(path) or {}
    except ValueError:
        request = {}
    if request.get("run_id") != run_id:  # replaced meanwhile (a CLI reset): ask again under our id
        state.write_json(path, dict(request, run_id=run_id, all_wg=False, requested_by="MachineOperation (resumed)"))
    try:
        systemd.start_unit(reset.PHASE1_TARGET)
    except systemd.SystemdUnavailable as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot start {reset.PHASE1_TARGET}: {e}") from None


def reset_phase1_busy() -> bool:
    """Whether a unit of reset phase 1 is still at work (active, activating or with a job queued)."""
    return bool(systemd.busy(_phase_units(1)))


def reset_phase1_outcome(cfg: Config, run_id: str) -> dict:
    """Phase 1's result for run_id from the steps' reports: succeeded only if every step reported success
    for this run; otherwise the first failing step (or one that never reported) in the message, and
    ``interrupted`` when that step simply never ran (the run was cut short: it may be resumed)."""
    from . import reset

    for step in reset.steps_of_phase(1):
        report = reset.read_report(step)
        if report is None or report.get("run_id") != run_id:
            # No report: either the step failed before it could write one (its unit is failed), or the run
            # was cut short — the host stopped — and the step never ran (its unit is not failed).
            try:
                st = systemd.unit_state(step.unit)
            except systemd.SystemdUnavailable:
                st = {}
            failed = st.get("active_state") == "failed"
            how = f"failed without a report (unit result {st.get('result')})" if failed else "did not run"
            return {"finished": True, "succeeded": False, "reason": Reason.EXECUTION_FAILED.value, "step": step.name,
                    "interrupted": not failed,
                    "message": f"reset step {step.number} ({step.name}) {how} (see journalctl -u {step.unit})"}
        if report.get("result") != "succeeded":
            first = (report.get("failed") or [{}])[0]
            detail = f"{first.get('reason') or report.get('reason')}: {first.get('error') or 'failed'}"
            return {"finished": True, "succeeded": False, "reason": Reason.EXECUTION_FAILED.value, "step": step.name,
                    "message": f"reset step {step.number} ({step.name}) failed: {detail}"}
    return {"finished": True, "succeeded": True, "reason": Reason.SUCCEEDED.value,
            "message": "AgentReset completed: machines, links, keys, nspawn config, machine trees and routing removed; "
                       "the agent removes itself next"}


def reset_steps(run_id: str) -> list[dict]:
    """(step, result) of each phase-1 step that reported for run_id, for Events."""
    from . import reset

    out = []
    for step in reset.steps_of_phase(1):
        report = reset.read_report(step)
        if report and report.get("run_id") == run_id:
            out.append({"step": step.name, "number": step.number, "result": report.get("result"),
                        "removed": len(report.get("removed") or [])})
    return out


def start_reset_phase2(cfg: Config, run_id: str) -> None:
    """Start the final steps, which stop and remove this daemon (unbounded-agent-reset-phase2.target)."""
    from . import reset

    log.info(f"starting {reset.PHASE2_TARGET} (reset run {run_id}): this daemon stops and is removed")
    try:
        systemd.start_unit(reset.PHASE2_TARGET)
    except systemd.SystemdUnavailable as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot start {reset.PHASE2_TARGET}: {e}") from None
