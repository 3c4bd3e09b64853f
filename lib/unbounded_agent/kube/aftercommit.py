"""An AgentUpgrade this agent completed whose binary was rolled back later, because the committed daemon kept
failing (upgrade/crashes.py). The restored daemon finds the rollback signal recovery wrote and adds to the
operation, which stays ``Complete``, a condition ``RolledBack`` (reason DaemonFailedAfterCommit) and a Warning
Event. The Machine's agent-version annotation follows by itself: every daemon writes its own version when it
starts, the restored one too.
"""

from __future__ import annotations

from .. import log
from ..reasons import Reason
from . import mop

CONDITION = "RolledBack"


def report(w) -> None:
    """Once per new rollback signal: the condition and the Event on the operation it names."""
    from ..upgrade.record import Store

    store = Store(w.cfg)
    try:
        stamp = store.signal_path.stat().st_mtime_ns
    except OSError:
        return
    if stamp == w.signal_seen:
        return
    signal = store.read_signal()
    p = None
    if signal is not None and signal.after_commit:
        p = next((p for p in w.progress.values() if p.kind == mop.AGENT_UPGRADE and p.request_id
                  and p.request_id == signal.request_id), None)
    if p is not None and not p.done:
        return  # its own result first (the restored daemon may still have to report Complete): next pass
    w.signal_seen = stamp
    if signal is None or p is None or p.gone or p.want is None or p.rolled_back_at == signal.at:
        return
    reason = signal.reason or Reason.DAEMON_FAILED_AFTER_COMMIT.value
    message = signal.failure_message
    p.rolled_back_at = signal.at
    p.want = dict(p.want, conditions=[{"type": CONDITION, "status": "True", "reason": reason, "message": message}])
    p.written = False
    w.store.save(p)
    log.error(f"{p.kind} {p.name}, completed before, was rolled back after its commit: {message}")
    w.event(p, reason, message, warning=True)
    w.api.flush_one(p)
