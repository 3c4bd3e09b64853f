"""Decide an upgrade that a ``kill -9`` or a host stop interrupted.

The dispatcher calls ``resolve`` while it holds the host for the operation and no unit of the operation is
at work (units.busy_units), so nothing else writes the record meanwhile. From the record and the links:

    requested, staging, staged, preflighted           → failed (interrupted); current untouched
    switching, current still on the old slot          → failed (interrupted before the switch)
    switching with current on the new slot, probation → probation again (a fresh window)
    switching with current on something else          → recovery
    probation with current no longer on the new slot  → recovery (it flipped the links, its record write was lost)
    recovering                                        → recovery again

Probation counts its attempts and recovery always ends in a terminal record, so this converges.
"""

from __future__ import annotations

from .. import fsutil, layout, log, systemd
from ..reasons import Reason
from . import record, units
from .record import Failure, Store, UpgradeRecord
from .stage import restore_last_good
from .switch import enter_probation


def resolve(store: Store, rec: UpgradeRecord, *, restart_daemon: bool = True) -> UpgradeRecord:
    """Move an interrupted rec to where it converges; returns it (terminal, or with a unit started)."""
    lay = layout.Layout(store.cfg.bin_dir)
    fsutil.remove_stale_temps(lay.bin_dir)
    phase = rec.phase
    if phase in record.BEFORE_SWITCH:
        return _interrupted(store, lay, rec, f"interrupted while {phase} (the step was killed or the host stopped)")
    if phase == record.SWITCHING:
        _, to = rec.binaries()
        from_slot, to_slot = rec.slots()
        current = lay.link_target(layout.CURRENT)
        if current == from_slot or current not in layout.SLOTS:
            if current not in layout.SLOTS:
                fsutil.atomic_symlink(from_slot, lay.path(layout.CURRENT))
            return _interrupted(store, lay, rec, "interrupted before the switch (the step was killed or the host stopped)")
        if current == to_slot and _digest(lay, to_slot) == to.digest:
            log.info(f"{rec.kind} {rec.operation} was interrupted after the switch: back on probation")
            return enter_probation(store, rec, restart=restart_daemon)
        rec = store.advance(rec, record.RECOVERING,
                            failure=Failure(detail="interrupted during the switch; the new slot does not hold the staged binary"))
    if rec.phase == record.PROBATION and lay.link_target(layout.CURRENT) != rec.slots()[1]:
        log.info(f"{rec.kind} {rec.operation} is on probation but {layout.CURRENT} is back on "
                 f"{lay.link_target(layout.CURRENT)}: recovery finishes the rollback")
        systemd.start_unit(units.RECOVERY_UNIT)
        return rec
    if rec.phase == record.PROBATION:
        log.info(f"{rec.kind} {rec.operation} was interrupted on probation: watching the daemon again")
        systemd.start_unit(units.PROBATION_UNIT)
        return rec
    if rec.phase == record.RECOVERING:
        log.info(f"{rec.kind} {rec.operation} was interrupted while recovering: recovering again")
        systemd.start_unit(units.RECOVERY_UNIT)
    return rec


def _digest(lay: layout.Layout, slot: str) -> str | None:
    try:
        return record.file_digest(lay.path(slot))
    except OSError:
        return None


def _interrupted(store: Store, lay: layout.Layout, rec: UpgradeRecord, message: str) -> UpgradeRecord:
    rec = store.finish(rec, record.FAILED, Reason.EXECUTION_FAILED, message)
    restore_last_good(lay, rec)
    log.error(f"{rec.kind} {rec.operation} failed: {message}; {layout.CURRENT} is {lay.link_target(layout.CURRENT)}")
    return rec


def daemon_starting() -> bool:
    """Whether the daemon has a start job queued (at boot): it will run whatever current selects."""
    try:
        snap = systemd.service_snapshot(systemd.DAEMON_UNIT)
    except systemd.SystemdError:
        return False
    return bool(snap["job"]) and snap["active_state"] in ("inactive", "failed", "activating")
