"""An AgentUpgrade, as the watcher drives it: a fresh read, InProgress, a request in the queue, and the
result as the operation's end. The upgrade record's phases become Events on the way.

AgentUpgrade stays InProgress across the daemon restart: the restarted daemon (the new one, or the one
restored by a rollback) reads the same progress file and publishes the result.
"""

from __future__ import annotations

from ..queue.spool import Request
from ..reasons import OpsError, Reason
from ..urls import redact
from . import mop
from .progress import ACCEPTED, DONE, SUBMITTED, SUBMITTING, OperationProgress


def drive(w, p: OperationProgress) -> None:
    if p.step in (ACCEPTED, SUBMITTING):
        if not w.begin(p, lambda params: f"staging upgraded host agent binary from "
                                         f"{redact(params.get('downloadURL', ''))}", lambda params: _request(p, params)):
            return
        w.event(p, "UpgradeStarted", f"queued the upgrade (request {p.request_id}) from "
                                     f"{redact(p.params.get('downloadURL', ''))}")
    if p.step == SUBMITTED:
        result = w.result(p)
        if result is not None:
            w.finish(p, mop.COMPLETE if result.succeeded else mop.FAILED, result.reason, result.message)
            return
        _phase_events(w, p)
    elif p.step != DONE:
        _legacy(w, p)


def _request(p: OperationProgress, params: dict) -> Request:
    return Request(id=p.require_request_id(), kind="upgrade", operation=p.operation, uid=p.uid, source="machineoperation",
                   url=params["downloadURL"], sha256=params.get("sha256"), force=bool(params.get("force")))


def _phase_events(w, p: OperationProgress) -> None:
    from ..upgrade.record import Store

    rec = Store(w.cfg).read()
    if rec is None or rec.id != p.request_id or p.upgrade_phase == rec.phase:
        return
    p.upgrade_phase = rec.phase  # persisted: the restarted daemon does not repeat it
    w.store.save(p)
    w.event(p, "UpgradePhase", f"upgrade {rec.phase}")


def _legacy(w, p: OperationProgress) -> None:
    """Progress written by an agent without the operation queue (an upgrade from such a version): its
    upgrade record is named by the operation; report it once it is final."""
    from ..upgrade.record import Store

    rec = Store(w.cfg).read()
    if rec is None or rec.operation != p.operation:
        raise OpsError(Reason.EXECUTION_FAILED, "the upgrade record no longer describes this operation")
    if rec.terminal:
        w.finish(p, mop.COMPLETE if rec.committed else mop.FAILED, rec.reason_enum().value, rec.message)
