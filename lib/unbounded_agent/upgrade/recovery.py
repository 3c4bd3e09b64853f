"""``unbounded-agent-daemon-recovery.service``: roll a failed upgrade back to the binary it replaced.

Started by probation when the new daemon fails it (the record is ``recovering``; this unit is After= probation,
so it never runs beside it), by the daemon's ``OnFailure=`` (its start limit), and by the dispatcher for a
``recover`` request, which re-opened a committed upgrade whose daemon kept failing (``after_commit``,
crashes.py). It acts on an upgrade that is recovering, or on probation with nobody watching it; while another
operation holds the host it changes nothing. For a committed upgrade whose daemon hit its start limit it
starts the dispatcher, which queues a recover request (queue/recover.py). It never runs the binary it rolls
back from: versions and digests come from the record.

Order, so that the node gets a working agent back even when the state dir refuses writes (full, read-only):
the links first (current and last-good select the binary the upgrade left: last-good, else the record's
``from`` slot, else the agent the package ships, copied into that slot) → restart the daemon and wait until it
is ready → quarantine the failed digest and write the rollback signal → record ``rolled-back``. Each write is
retried for a bounded time; one that still fails leaves the rollback done and says so (StateUnwritable). A
crash anywhere leaves the record recovering (or on probation with current back on the old binary), and the
dispatcher starts recovery again to the same end. Every run ends: a daemon that cannot be started again
(masked, refused, the start limit still in force after one wait) is a terminal record, DaemonNotRestarted.
"""

from __future__ import annotations

import os
import time

from .. import fsutil, holdpoint, hostlock, layout, log, program, records, systemd
from ..config import Config
from ..reasons import OpsError, Reason
from . import record, units
from .crashes import journal_lines
from .probation import daemon_failure
from .record import FAILED_UNDER_SYSTEMD, UNRECORDED, Binary, Failure, QuarantineEntry, RollbackSignal, Store, UpgradeRecord


def main(argv: list[str] | None = None) -> int:
    return program.plain_main("unbounded-agent-daemon-recovery", __doc__, run, argv)


def _target(lay: layout.Layout, rec: UpgradeRecord) -> tuple[str, Binary, str]:
    """The slot to go back to, the binary it holds, and how it was found: last-good (which the switch pointed
    at the record's from slot), the from slot, or — both lost — the agent the package ships, put into a slot."""
    frm, to = rec.binaries()
    lg = lay.link_target(layout.LAST_GOOD)
    for slot in (lg, frm.slot):
        if slot in layout.SLOTS and lay.resolves(slot) is not None:
            try:
                if record.file_digest(lay.path(slot)) == frm.digest:
                    return slot, frm, ""
            except OSError:
                continue
    packaged = layout.packaged_agent()
    lost = (f"neither {layout.LAST_GOOD} ({lg}) nor {frm.slot} holds the previous binary (sha256 "
            f"{record.short(frm.digest)})")
    try:
        digest = record.file_digest(packaged)
    except OSError as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot roll back: {lost}, and the packaged agent {packaged} "
                                                f"cannot be read ({e.strerror})") from None
    if digest == to.digest:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot roll back: {lost}, and the packaged agent is the failing binary")
    slot = frm.slot if frm.slot in layout.SLOTS and frm.slot != to.slot else \
        (layout.GREEN if to.slot == layout.BLUE else layout.BLUE)
    fsutil.atomic_copy(packaged, lay.path(slot), mode=0o755)
    log.warn(f"{lost}: put the packaged agent {packaged} into {slot}")
    return slot, Binary(slot=slot, digest=digest, version=layout.binary_version(packaged)), f"{lost}: restored the agent the package ships"


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
    try:
        return bool(systemd.busy([units.PROBATION_UNIT]))
    except systemd.SystemdError:
        return True  # cannot tell: leave it to probation and the dispatcher, as before


def run(cfg: Config) -> UpgradeRecord | None:
    log.bind(step="recovery")
    store = Store(cfg)
    rec = store.read()
    if rec is not None:
        record.log_context(rec)
    if rec is not None and rec.committed and not rec.same_content:
        # the daemon's OnFailure= (its start limit) after the commit: the dispatcher, at its start, queues a
        # recover request when the daemon's last run was a crash of the committed binary (queue/recover.py)
        log.warn(f"{rec.describe()}: the daemon failed; starting {units.DISPATCH_UNIT} to roll it back if it must")
        systemd.start_unit(units.DISPATCH_UNIT)
        return rec
    if rec is None or rec.phase not in (record.PROBATION, record.RECOVERING):
        log.info("no upgrade on probation (" + (rec.describe() if rec else "no upgrade record") + "): not changing any link")
        return rec
    lock = _hold_host(rec)
    if lock is None:
        return rec
    try:
        return _recover(store)
    finally:
        lock.release()


def _recover(store: Store) -> UpgradeRecord | None:
    lay = layout.Layout(store.cfg.bin_dir)
    with store.transaction() as rec:
        if rec is None or rec.phase not in (record.PROBATION, record.RECOVERING):
            return rec
        if rec.phase == record.PROBATION:  # OnFailure=, or probation that could not record its verdict
            snap = _snapshot()
            failure, invocation = daemon_failure(snap, f"the new daemon failed under systemd (result {snap.get('result')})",
                                                 FAILED_UNDER_SYSTEMD)
            if lay.link_target(layout.CURRENT) != rec.slots()[1]:  # this ran before, and could write none of it
                failure, invocation = Failure(detail="rolled back while the state dir refused writes (how the new "
                                                     "daemon failed is in the journal of unbounded-upgrade-probation "
                                                     "and unbounded-agent-daemon)", cause=UNRECORDED), None
            failure.journal = journal_lines(systemd.DAEMON_UNIT, rec.phase_time(record.SWITCHING), invocation=invocation)
            try:  # once: with a full disk the links must not wait for it
                rec = store.advance(rec, record.RECOVERING, failure=failure)
            except OSError as e:
                log.warn(f"cannot record that {rec.operation} is recovering ({e.strerror}): rolling back first")
                rec.phase, rec.failure = record.RECOVERING, failure
    failure = rec.failure or Failure(detail="daemon failed")
    try:
        target, restored, how = _target(lay, rec)
    except (OpsError, OSError) as e:  # terminal: looping on an impossible rollback helps no one
        err = e if isinstance(e, OpsError) else OpsError(Reason.EXECUTION_FAILED, f"cannot roll back: {e}")
        store.persist(lambda: store.finish(rec, record.FAILED, Reason.DAEMON_FAILED, f"{failure.text()}; {err.message}"))
        raise err from None
    holdpoint.hold(store.dir, "recovery-before-links")
    for link in (layout.CURRENT, layout.LAST_GOOD):
        if lay.link_target(link) != target:
            fsutil.atomic_symlink(target, lay.path(link))
    log.info(f"{rec.kind} {rec.operation}: {layout.CURRENT} and {layout.LAST_GOOD} → {target}")
    holdpoint.hold(store.dir, "recovery-before-restart")
    state, why = restart_daemon(store.cfg.ready_timeout_seconds, since=_flipped_at(lay))
    _, to = rec.binaries()
    text = failure.text()
    unwritten = _keep(store, rec, failure, target, restored, state)
    when = "after its commit" if rec.after_commit else "on probation"
    message = (f"version {to.version or '?'} failed {when}: {text}; rolled back to {restored.version or '?'} ({target})"
               + (f"; {how}" if how else "")
               + (f"; sha256 {record.short(to.digest)} quarantined" if failure.blames_release else "; not quarantined"))
    reason = Reason.DAEMON_FAILED_AFTER_COMMIT if rec.after_commit else Reason.DAEMON_FAILED
    if state != "active":
        reason = Reason.DAEMON_NOT_RESTARTED
        message += f"; the restored daemon is not running: {why}"
    try:
        rec = records.persist(lambda: store.finish(rec, record.ROLLED_BACK, reason, message, restored_daemon=state),
                              f"the upgrade record in {store.dir}", seconds=0 if unwritten else None)
    except OpsError as e:
        unwritten.append(e.message)
    if unwritten:
        raise OpsError(Reason.STATE_UNWRITABLE, f"{message}; but {'; '.join(unwritten)}")
    log.error(f"{rec.kind} {rec.operation}: {message}", result="succeeded" if state == "active" else "failed",
              reason=rec.reason)
    if state != "active":
        raise OpsError(reason, f"rolled back, but the restored daemon is not running: {why}")
    log.info(f"the daemon runs {restored.version or 'the previous version'} again")
    return rec


def _keep(store: Store, rec: UpgradeRecord, failure: Failure, target: str, restored: Binary, state: str) -> list[str]:
    """Quarantine the failed binary (when it is to blame) and write the rollback signal; what could not be written.
    Once one write was refused for its whole retry, the next ones are tried once (the state dir is known bad)."""
    _, to = rec.binaries()
    text = failure.text()
    problems: list[str] = []

    def persist(write, what):
        try:
            records.persist(write, f"{what} in {store.dir}", seconds=0 if problems else None)
        except OpsError as e:
            problems.append(e.message)

    if failure.blames_release:
        entry = QuarantineEntry(digest=to.digest, archive_sha256=to.archive_sha256, version=to.version,
                                operation=rec.operation, at=records.now(), failure=text)
        persist(lambda: store.quarantine_add(entry), "the quarantine")
    when = "kept failing after its commit" if rec.after_commit else "failed after switching binary"
    signal = RollbackSignal(
        operation=rec.operation, kind=rec.kind, request_id=rec.id, after_commit=rec.after_commit, at=records.now(),
        reason=(Reason.DAEMON_FAILED_AFTER_COMMIT if rec.after_commit else Reason.DAEMON_FAILED).value,
        failed=Binary(slot=to.slot, digest=to.digest, version=to.version),
        restored=Binary(slot=target, digest=restored.digest, version=restored.version), failure=failure,
        failure_message=f"AgentUpgrade daemon {when} ({text}); rolled back to {restored.version or '?'}"
                        + ("" if state == "active" else f", whose daemon is {state}"))
    persist(lambda: store.write_signal(signal), "the rollback signal")
    return problems


def _snapshot() -> dict:
    try:
        return systemd.service_snapshot(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        log.warn(str(e))
        return {}


MTIME_TICK_SECONDS = 0.02  # one tick of the kernel's coarse clock, at HZ=100 and a margin


def _flipped_at(lay: layout.Layout) -> float | None:
    """When current was last pointed somewhere (a link is replaced, never changed: its own mtime)."""
    try:
        return os.lstat(lay.path(layout.CURRENT)).st_mtime
    except OSError:
        return None


def restart_daemon(ready_seconds: float, since: float | None = None) -> tuple[str, str]:
    """Start the daemon on what current selects and wait until it is ready; (its ActiveState, why not).

    A daemon already running a run that began after ``since`` (the links' flip: recovery running again) is
    left alone. reset-failed first (tolerated: some SELinux policies deny it); a start refused by the start
    limit waits out its interval once (bounded) and tries again; a masked unit or another refusal ends at
    once. Never raises."""
    snap = _snapshot()
    if snap.get("load_state") == "masked":
        return "masked", f"{systemd.DAEMON_UNIT} is masked (systemctl unmask it, then start it)"
    # a file's mtime comes from the kernel's coarse clock (a tick behind at most): a run started within a tick
    # before the flip must not pass for one started after it
    if since and snap.get("active_state") == "active" and not snap.get("job") and \
            (snap.get("started_realtime") or 0) >= since + MTIME_TICK_SECONDS:
        return "active", ""
    try:
        systemd.reset_failed(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        log.warn(f"reset-failed refused ({e}); restarting anyway")
    waited = False
    try:
        systemd.restart_unit(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        if "masked" in str(e).lower():
            return "masked", f"systemd refused to start it: {e}"
        if "too quickly" not in str(e) and "start-limit" not in str(e):
            return "refused", f"systemd refused to start it: {e}"
        waited = True
        if (refused := _after_start_limit(str(e))) is not None:
            return "refused", refused
    deadline = time.monotonic() + units.STOP_BOUND_SECONDS + ready_seconds
    state = "unknown"
    while time.monotonic() < deadline:
        snap = _snapshot()
        state = snap.get("active_state", "unknown")
        if state == "active" and not snap.get("job"):
            return state, ""
        if state == "failed" and not snap.get("job"):
            if snap.get("result") != "start-limit-hit" or waited:
                return state, f"it failed again (result {snap.get('result')})"
            waited = True
            if (refused := _after_start_limit("start limit hit")) is not None:
                return "refused", refused
        time.sleep(0.2)
    return state, f"not ready within {units.STOP_BOUND_SECONDS + ready_seconds:g} s (state {state})"


def _after_start_limit(why: str) -> str | None:
    """Wait out the start limit's interval once and start again; what went wrong, None once started."""
    interval = _start_limit_interval()
    log.warn(f"{why}: waiting {interval:.0f} s for the start limit to pass")
    time.sleep(interval)
    try:
        systemd.reset_failed(systemd.DAEMON_UNIT)
    except systemd.SystemdError:
        pass
    try:
        systemd.start_unit(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        return f"systemd refused to start it after the start limit's interval: {e}"
    return None


def _start_limit_interval() -> float:
    try:
        usec = int(systemd.unit_property(systemd.DAEMON_UNIT, "StartLimitIntervalUSec"))
    except (systemd.SystemdError, ValueError, TypeError):
        return 65.0
    if usec <= 0 or usec >= 2**63:
        return 65.0
    return min(usec / 1e6 + 5, units.START_LIMIT_WAIT_MAX)
