"""``unbounded-agent-daemon-recovery.service``: roll a failed upgrade back to the binary it replaced.

Started by probation when the new daemon fails it (the record is ``recovering``), and by the daemon's
``OnFailure=``. It acts only on an upgrade that is recovering, or on probation with nobody watching it (no
operation holds the host: the probation unit is gone); with the host held by the operation on
probation, probation decides; with the host held by another operation (a reset), it changes nothing.
It never runs the agent binary (which may be garbage): versions and digests come from the record.

Order, each durable before the next: record ``recovering`` with the failure → current selects the binary
the upgrade left (last-good; both equal the record's ``from`` slot) → quarantine the failed digest →
rollback signal → restart the daemon and wait until it is ready → record ``rolled-back`` (DaemonFailed).
A crash anywhere leaves the record recovering, and the dispatcher starts recovery again to the same end.
"""

from __future__ import annotations

import time

from .. import fsutil, holdpoint, hostlock, layout, log, program, records, systemd
from ..config import Config
from ..reasons import OpsError, Reason
from . import record
from .probation import FAILED_UNDER_SYSTEMD, daemon_failure, journal_lines
from .record import Failure, QuarantineEntry, RollbackSignal, Store, UpgradeRecord

RESTART_READY_SECONDS = 60.0
START_LIMIT_WAIT_MAX = 305.0  # as upstream: at most the 5-minute interval, plus 5 s


def main(argv: list[str] | None = None) -> int:
    return program.plain_main("unbounded-agent-daemon-recovery", __doc__, run, argv)


def _target(lay: layout.Layout, rec: UpgradeRecord) -> str:
    """The slot to go back to: last-good, which the switch pointed at the record's from slot."""
    frm, _ = rec.binaries()
    lg = lay.link_target(layout.LAST_GOOD)
    for slot in (lg, frm.slot):
        if slot in layout.SLOTS and lay.resolves(slot) is not None:
            try:
                if record.file_digest(lay.path(slot)) == frm.digest:
                    return slot
            except OSError:
                continue
    raise OpsError(Reason.EXECUTION_FAILED, f"cannot roll back: neither {layout.LAST_GOOD} ({lg}) nor {frm.slot} "
                                            f"holds the previous binary (sha256 {record.short(frm.digest)})")


def _hold_host(rec: UpgradeRecord) -> hostlock.HostLock | None:
    """Take the host for this rollback, or learn that rec's own operation holds it. None means: do not
    act (another operation holds the host, or probation is watching)."""
    who = hostlock.holder()
    if who is not None and who.operation == rec.id:
        if rec.phase == record.PROBATION and _probation_at_work():
            log.info(f"{rec.describe()}: its probation unit watches the daemon and decides")
            return None
        return hostlock.HostLock(rec.id, "recovery")  # not acquired: the operation's dispatcher holds it
    if who is not None:
        log.warn(f"the host is held by {who.describe()}: not rolling {rec.kind} {rec.operation} back now")
        return None
    try:
        return hostlock.HostLock(rec.id, "recovery").acquire()
    except OpsError as e:
        log.warn(f"not rolling back now: {e.message}")
        return None


def _probation_at_work() -> bool:
    """Whether the probation unit is there to decide (it may be unable to start, e.g. masked: then the
    daemon's OnFailure= is the only way back, and recovery acts under the operation's hold)."""
    from .units import PROBATION_UNIT

    try:
        return bool(systemd.busy([PROBATION_UNIT]))
    except systemd.SystemdError:
        return True  # cannot tell: leave it to probation and the dispatcher, as before


def run(cfg: Config) -> UpgradeRecord | None:
    log.bind(step="recovery")
    store = Store(cfg)
    rec = store.read()
    if rec is not None:
        record.log_context(rec)
    if rec is None or rec.phase not in (record.PROBATION, record.RECOVERING):
        log.info("no upgrade on probation (" + (rec.describe() if rec else "no upgrade record") + "): not changing any link")
        return rec
    lock = _hold_host(rec)
    if lock is None:
        return rec
    try:
        return _recover(store, lock)
    finally:
        lock.release()


def _recover(store: Store, lock: hostlock.HostLock) -> UpgradeRecord | None:
    with store.transaction() as rec:
        if rec is None or rec.phase not in (record.PROBATION, record.RECOVERING):
            return rec
        if rec.phase == record.PROBATION:  # we came through the daemon's OnFailure=, with nobody watching
            snap = _snapshot()
            failure, invocation = daemon_failure(snap, f"the new daemon failed under systemd (result {snap.get('result')})",
                                                 FAILED_UNDER_SYSTEMD)
            failure.journal = journal_lines(systemd.DAEMON_UNIT, rec.phase_time(record.SWITCHING), invocation=invocation)
            rec = store.advance(rec, record.RECOVERING, failure=failure)
    failure = rec.failure or Failure(detail="daemon failed")
    frm, to = rec.from_, rec.to
    lay = layout.Layout(store.cfg.bin_dir)
    try:
        target = _target(lay, rec)
    except OpsError as e:  # terminal: looping on an impossible rollback helps no one
        store.finish(rec, record.FAILED, Reason.DAEMON_FAILED, f"{failure.text()}; {e.message}")
        raise
    holdpoint.hold(store.dir, "recovery-before-links")
    if lay.link_target(layout.CURRENT) != target:
        fsutil.atomic_symlink(target, lay.path(layout.CURRENT))
    if lay.link_target(layout.LAST_GOOD) != target:
        fsutil.atomic_symlink(target, lay.path(layout.LAST_GOOD))
    text = failure.text()
    store.quarantine_add(QuarantineEntry(digest=to.digest, archive_sha256=to.archive_sha256, version=to.version,
                                         operation=rec.operation, at=records.now(), failure=text))
    store.write_signal(RollbackSignal(
        operation=rec.operation, kind=rec.kind, at=records.now(),
        failed=record.Binary(slot=to.slot, digest=to.digest, version=to.version),
        restored=record.Binary(slot=target, digest=frm.digest, version=frm.version), failure=failure,
        failure_message=f"AgentUpgrade daemon failed after switching binary ({text}); rolled back to "
                        f"{frm.version or '?'}"))
    holdpoint.hold(store.dir, "recovery-before-restart")
    # Restart before the record is final: a crash before it leaves it recovering, and recovery runs again.
    restored = restart_daemon()
    message = (f"version {to.version or '?'} failed on probation: {text}; rolled back to {frm.version or '?'} "
               f"({target}); sha256 {record.short(to.digest)} quarantined")
    if restored != "active":
        message += f"; the restored daemon is {restored}"
    rec = store.finish(rec, record.ROLLED_BACK, Reason.DAEMON_FAILED, message, restored_daemon=restored)
    log.error(f"{rec.kind} {rec.operation}: {message}", result="succeeded" if restored == "active" else "failed",
              reason=rec.reason)
    if restored != "active":
        raise OpsError(Reason.DAEMON_FAILED, f"rolled back, but the restored daemon is {restored}")
    log.info(f"the daemon runs {frm.version or 'the previous version'} again")
    return rec


def _snapshot() -> dict:
    try:
        return systemd.service_snapshot(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        log.warn(str(e))
        return {}


def restart_daemon(ready_seconds: float = RESTART_READY_SECONDS) -> str:
    """reset-failed (tolerated: some SELinux policies deny it), restart, and wait until active. When the
    start limit refuses the restart, wait out its interval once (bounded) and start again. Returns the
    daemon's final ActiveState."""
    try:
        systemd.reset_failed(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        log.warn(f"reset-failed refused ({e}); restarting anyway")
    try:
        systemd.restart_unit(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        interval = _start_limit_interval()
        log.warn(f"restart refused ({e}); waiting {interval:.0f} s for the start limit to pass")
        time.sleep(interval)
        systemd.start_unit(systemd.DAEMON_UNIT)
    deadline = time.monotonic() + ready_seconds
    state = "unknown"
    while time.monotonic() < deadline:
        snap = _snapshot()
        state = snap.get("active_state", "unknown")
        if state == "active" and not snap.get("job"):
            return state
        time.sleep(0.2)
    return state


def _start_limit_interval() -> float:
    try:
        usec = int(systemd.unit_property(systemd.DAEMON_UNIT, "Unit", "StartLimitIntervalUSec"))
    except (systemd.SystemdError, ValueError, TypeError):
        return 65.0
    if usec <= 0 or usec >= 2**63:
        return 65.0
    return min(usec / 1e6 + 5, START_LIMIT_WAIT_MAX)
