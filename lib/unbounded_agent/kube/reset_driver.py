"""An AgentReset, as the watcher drives it: InProgress, a fresh read, a request in the queue; then, when the
dispatcher stops at the reset's gate (phase 1 succeeded, the agent is removed next), ``Complete`` on the
server, the operations it supersedes marked ``Failed``, and the acknowledgement that lets the reset remove
this daemon. A reset that fails before the gate ends ``Failed`` with the step and its reason, and the daemon
keeps running.
"""

from __future__ import annotations

from .. import log
from ..queue.spool import Request
from ..reasons import Reason
from . import mop
from .progress import ACCEPTED, DONE, SUBMITTED, SUBMITTING, OperationProgress


def drive(w, p: OperationProgress) -> None:
    if p.step == ACCEPTED:
        w.start_operation(p, "resetting unbounded agent", SUBMITTING)
    if p.step == SUBMITTING:
        if w.spool.state(p.request_id) is None:
            op = w.fresh(p)
            if op is None:
                if p.gone:
                    log.info(f"AgentReset {p.name} was deleted before it started: not running it")
                    p.step = DONE
                    w.store.save(p)
                return
            mop.check_parameters(op, w.cfg.allow_insecure_http)
            w.spool.submit(Request(id=p.require_request_id(), kind="reset", operation=p.operation, uid=p.uid,
                                   source="machineoperation", report_gate=True))
        p.step = SUBMITTED
        w.store.save(p)
        w.event(p, "ResetStarted", f"queued the reset (request {p.request_id})")
    if p.step == SUBMITTED:
        result = w.result(p)
        if result is not None:
            w.finish(p, mop.COMPLETE if result.succeeded else mop.FAILED, result.reason, result.message)
            return
        gate = w.spool.gate(p.request_id)
        if gate is not None:
            _at_gate(w, p, gate)
    elif p.step not in (DONE,):
        # Progress from an agent without the operation queue: the reset it started cannot be followed here.
        w.finish(p, mop.FAILED, Reason.EXECUTION_FAILED.value,
                 "the agent was replaced while this reset ran; run `unbounded-agent reset` on the host to finish it")


def _at_gate(w, p: OperationProgress, gate) -> None:
    if not p.want or p.want.get("phase") != mop.COMPLETE:
        for s in gate.steps:
            w.event(p, "ResetStep", f"step {s['number']} {s['step']}: {s['result']}", warning=s["result"] != "succeeded")
        for op in w.waiting():  # they would never run: the agent is removed next
            w.claim(op, failed=(Reason.SUPERSEDED, f"superseded by AgentReset {p.name}: the agent is removed from "
                                                   f"{w.machine}"))
        w.set_want(p, mop.COMPLETE, Reason.SUCCEEDED.value, gate.message)
        log.info(f"AgentReset {p.name} Complete: {gate.message}; the agent is removed once the API server has it")
        w.event(p, "Completed", gate.message)
        w.api.flush_one(p)
    if (p.written or p.gone) and w.all_reported_except(p):
        w.api.flush_events()
        w.spool.ack(p.request_id)
        p.acked = True
        p.step = DONE
        w.store.save(p)
        log.info(f"AgentReset {p.name}: reported; the reset goes on and removes this daemon")
