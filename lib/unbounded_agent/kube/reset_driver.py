"""An AgentReset, as the watcher drives it: a fresh read, InProgress, a request in the queue; then, when the
dispatcher stops at the reset's gate, ``Complete`` on the server, the operations it supersedes marked
``Failed``, and the acknowledgement that lets the reset stop this daemon. A reset that fails before the
gate ends ``Failed`` with the step and its reason, and the daemon keeps running.

At the gate everything that can fail is done and verified: the machines, links, keys and routing are gone,
and so are the agent's own files — the binary this daemon was started from, its config and its state
directory (with this watcher's progress). The daemon runs on from memory: every module it may need was
imported when it started (daemon.preload), its client was built from the kubeconfig it read then, and
its progress stays in memory (progress.py). Only stopping the daemon comes after the acknowledgement.
"""

from __future__ import annotations

from .. import log
from ..queue.spool import Request, Spool
from ..reasons import Reason
from . import mop
from .progress import ACCEPTED, DONE, SUBMITTED, SUBMITTING, OperationProgress


def drive(w, p: OperationProgress) -> None:
    if p.step in (ACCEPTED, SUBMITTING):  # the fresh read, InProgress and the request: as every kind (w.begin)
        if not w.begin(p, lambda params: "resetting unbounded agent",
                       lambda params: Request(id=p.require_request_id(), kind="reset", operation=p.operation,
                                              uid=p.uid, source="machineoperation", report_gate=True)):
            return
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
        for op in w.waiting():  # they would never run: the agent is gone already, its daemon stops next
            w.claim(op, failed=(Reason.SUPERSEDED, f"superseded by AgentReset {p.name}: the agent is removed from "
                                                   f"{w.machine}"))
        w.set_want(p, mop.COMPLETE, Reason.SUCCEEDED.value, gate.message)
        log.info(f"AgentReset {p.name} Complete: {gate.message}; the daemon stops once the API server has it")
        w.event(p, "Completed", gate.message)
        w.api.flush_one(p)
    if (p.written or p.gone) and w.all_reported_except(p):
        w.api.flush_events()
        w.spool.ack(p.request_id)
        p.acked = True
        p.step = DONE
        w.store.save(p)
        log.info(f"AgentReset {p.name}: reported; the reset goes on and stops this daemon")


def let_gates_go(spool: Spool) -> None:
    """For a daemon that reports to no cluster: acknowledge every open reset gate (there is nothing to say)."""
    try:
        for gate in spool.open_gates():
            log.info(f"reset {gate.id} stops the daemon next: no cluster to report to")
            spool.ack(gate.id)
    except OSError as e:
        log.warn(f"cannot read or acknowledge the reset gates in {spool.gates}: {e}")
