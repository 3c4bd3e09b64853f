"""``unbounded-upgrade-switch@<id>.service``: make the preflighted candidate current.

Order, each durable before the next: the record says ``switching`` → last-good selects the binary being
left → current selects the candidate (symlink to a temp name, rename, fsync the directory) → the record
says ``probation`` → restart the daemon and start the probation unit. A crash between any two of these is
decided by resume.py from the record and the links.
"""

from __future__ import annotations

from .. import fsutil, holdpoint, hostlock, layout, log, program, records, systemd
from ..config import Config
from ..reasons import OpsError, Reason
from . import record, units
from .record import Probation, Store, UpgradeRecord
from .stage import restore_last_good


def main(argv: list[str] | None = None) -> int:
    return program.instance_main("unbounded-upgrade-switch", __doc__, run, argv)


def run(cfg: Config, id: str) -> UpgradeRecord:
    hostlock.require(id, "switch")
    store = Store(cfg)
    rec = store.for_step(id, record.PREFLIGHTED, "switch")
    if rec.terminal:  # e.g. the same content as current: nothing to do
        return rec
    lay = layout.Layout(cfg.bin_dir)
    try:
        frm, to = rec.binaries()
        from_slot, to_slot = rec.slots()
        if lay.link_target(layout.CURRENT) != from_slot:
            raise OpsError(Reason.EXECUTION_FAILED, f"{layout.CURRENT} changed since staging "
                           f"(now {lay.link_target(layout.CURRENT)!r}, was {from_slot})")
        if record.file_digest(lay.path(to_slot)) != to.digest:
            raise OpsError(Reason.EXECUTION_FAILED, f"{to_slot} no longer holds the preflighted binary")
    except (OpsError, OSError) as e:
        err = e if isinstance(e, OpsError) else OpsError(Reason.EXECUTION_FAILED, str(e))
        rec = store.finish(rec, record.FAILED, err.reason, err.message)
        restore_last_good(lay, rec)
        raise err from None
    try:
        before = systemd.service_snapshot(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        log.warn(str(e))
        before = {}
    rec = store.advance(rec, record.SWITCHING, switched_at=records.now(),
                        probation=Probation(old_invocation=before.get("invocation")))
    holdpoint.hold(store.dir, "switch-before-links")
    if lay.link_target(layout.LAST_GOOD) != from_slot:
        fsutil.atomic_symlink(from_slot, lay.path(layout.LAST_GOOD))
    fsutil.atomic_symlink(to_slot, lay.path(layout.CURRENT))
    log.info(f"{rec.kind} {rec.operation}: {layout.CURRENT} → {to_slot} (version {to.version}), "
             f"{layout.LAST_GOOD} → {from_slot} (version {frm.version})")
    holdpoint.hold(store.dir, "switch-before-restart")
    return enter_probation(store, rec)


def enter_probation(store: Store, rec: UpgradeRecord, restart: bool = True) -> UpgradeRecord:
    """Record probation, restart the daemon (unless told it is starting anyway) and start the unit that
    watches it. The record is durable first, so a crash here still ends in probation."""
    prob = rec.probation or Probation()
    prob.started_at = records.now()
    if restart:
        try:
            prob.old_invocation = systemd.service_snapshot(systemd.DAEMON_UNIT).get("invocation")
        except systemd.SystemdError:
            pass
    rec = store.advance(rec, record.PROBATION, probation=prob)
    try:
        if restart:
            try:
                systemd.reset_failed(systemd.DAEMON_UNIT)
            except systemd.SystemdError as e:
                log.warn(f"cannot reset the daemon's failed state: {e}")
            systemd.restart_unit(systemd.DAEMON_UNIT)
        systemd.start_unit(units.PROBATION_UNIT)
    except systemd.SystemdError as e:
        # The dispatcher finds the record on probation with no unit at work and starts probation again; a
        # daemon that never gets ready rolls back.
        log.error(f"could not restart the daemon or start probation: {e}")
        raise OpsError(Reason.EXECUTION_FAILED, str(e)) from None
    log.info(f"{rec.kind} {rec.operation}: daemon restarted; on probation "
             f"(ready within {store.cfg.ready_timeout_seconds:g} s, then {store.cfg.probation_seconds:g} s stable)",
             result="succeeded")
    return rec
