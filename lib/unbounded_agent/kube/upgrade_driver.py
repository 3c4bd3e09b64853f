"""An AgentUpgrade, as the watcher drives it: InProgress, a fresh read, a request in the queue, and the
result as the operation's end. The upgrade record's phases become Events on the way.

AgentUpgrade stays InProgress across the daemon restart: the restarted daemon (the new one, or the one
restored by a rollback) reads the same progress file and publishes the result.
"""

from __future__ import annotations

from .. import log
from ..queue.spool import Request
from ..reasons import OpsError, Reason
from ..urls import redact
from . import mop
from .progress import ACCEPTED, DONE, SUBMITTED, SUBMITTING, OperationProgress


def drive(w, p: OperationProgress) -> None:
    if p.step == ACCEPTED:
        w.start_operation(p, f"staging upgraded host agent binary from {redact(p.params.get('downloadURL', ''))}",
                          SUBMITTING)
    if p.step == SUBMITTING:
        if w.spool.state(p.request_id) is None:  # not queued yet (a restart may come between the two)
            op = w.fresh(p)
            if op is None:
                if p.gone:  # deleted before it started: it never starts
                    log.info(f"AgentUpgrade {p.name} was deleted before it started: not running it")
                    p.step = DONE
                    w.store.save(p)
                return  # the server cannot be read now: ask again on the next pass
            params = p.params = mop.check_parameters(op, w.cfg.allow_insecure_http)  # act on what the server has now
            w.spool.submit(Request(id=p.require_request_id(), kind="upgrade", operation=p.operation, uid=p.uid,
                                   source="machineoperation",
                                   url=params["downloadURL"], sha256=params.get("sha256"), force=bool(params.get("force"))))
        p.step = SUBMITTED
        w.store.save(p)
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
