"""An operation that is ``InProgress`` on the server, for this machine, with no progress file here: this
agent's memory of it is gone, but the host's queue (the toolset's own directory, which a reset keeps) may
still know its request — queued, running, or with a result.

That happens when a reset removes the agent's state directory while it runs and the daemon is restarted
(before the reset stops it), or when an agent is installed again on a machine whose reset could not be
reported: the request of each operation carries its name and uid prefix. Such an operation is followed
from its request (its gate acknowledged, its result published), never run again. Without one it is failed
as before: running it now could run it twice.
"""

from __future__ import annotations

from .. import log
from ..queue.spool import KEEP_RESULTS
from . import mop
from .progress import SUBMITTED, OperationProgress


def adopt(w, op: dict) -> bool:
    """Follow op from its request in the host's queue, if there is one; False when there is none."""
    u, name = mop.uid(op), mop.name(op)
    operation = f"{name}@{u[:8]}"
    request_id = next((r.id for _, r in w.spool.queue() if r.operation == operation), None)
    if request_id is None:
        request_id = next((r.id for r in w.spool.recent_results(KEEP_RESULTS) if r.operation == operation), None)
    if request_id is None:
        return False
    status = op.get("status") or {}
    p = OperationProgress(uid=u, name=name, kind=mop.kind(op), step=SUBMITTED, operation=operation,
                          request_id=request_id, claimed_at=mop.now(), started_at=status.get("startedAt"))
    w.progress[u] = p
    w.store.save(p)
    log.info(f"{p.kind} {name} is in progress on the server and its request {request_id} is in this host's "
             "queue: following it")
    return True
