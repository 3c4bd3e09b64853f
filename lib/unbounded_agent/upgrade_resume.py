"""``unbounded-upgrade-resume.service``: converge an upgrade that a ``kill -9`` or a host stop interrupted.

Runs before every start of the daemon (``unbounded-upgrade-resume.service``, its ``Wants=``/``After=``,
so at boot too) and when any upgrade step's unit fails (``unbounded-upgrade-resume@<step>.service``,
their ``OnFailure=``); the stage step and the API call resolve() too before refusing a request. A record that is not terminal and whose units are all gone is decided from the record and
the links alone:

    requested, staging, staged, preflighted        → failed (interrupted); current untouched
    switching, current still on the old slot       → failed (interrupted before the switch)
    switching with current on the new slot, probation → probation again (a fresh window)
    recovering                                     → recovery again

It never waits for the daemon (which waits for it) and never blocks on the lock: a held lock means
a step is at work and will finish the job.
"""

from __future__ import annotations

import time

from . import fsutil, layout, log, systemd, upgrade
from .config import Config
from .reasons import OpsError, Reason
from .upgrade import Store


def resolve(store: Store, rec: dict, *, restart_daemon: bool = True) -> dict:
    """Under the lock, with no unit of rec at work: move rec to where it converges. Returns it."""
    phase = rec.get("phase")
    lay = layout.Layout(store.cfg.bin_dir)
    fsutil.remove_stale_temps(lay.bin_dir)
    if phase in upgrade.BEFORE_SWITCH:
        return _interrupted(store, lay, rec, f"interrupted while {phase} (the step was killed or the host stopped)")
    if phase == upgrade.SWITCHING:
        frm, to = rec["from"], rec["to"]
        current = lay.link_target(layout.CURRENT)
        if current == frm["slot"] or current not in layout.SLOTS:
            if current not in layout.SLOTS:
                fsutil.atomic_symlink(frm["slot"], lay.path(layout.CURRENT))
            return _interrupted(store, lay, rec, "interrupted before the switch (the step was killed or the host stopped)")
        if current == to["slot"] and _digest(lay, to["slot"]) == to["digest"]:
            log.info(f"{rec['kind']} {rec['operation']} was interrupted after the switch: back on probation")
            from . import upgrade_switch

            return upgrade_switch.enter_probation(store, rec, restart=restart_daemon)
    if phase == upgrade.PROBATION:
        log.info(f"{rec['kind']} {rec['operation']} was interrupted on probation: watching the daemon again")
        systemd.start_unit(upgrade.PROBATION_UNIT)
        return rec
    if phase in (upgrade.RECOVERING, upgrade.SWITCHING):
        if phase == upgrade.SWITCHING:  # current selects something we did not stage: go back
            rec = store.advance(rec, upgrade.RECOVERING,
                                failure={"detail": "interrupted during the switch; the new slot does not hold the staged binary"})
        log.info(f"{rec['kind']} {rec['operation']} was interrupted while recovering: recovering again")
        systemd.start_unit(upgrade.RECOVERY_UNIT)
        return rec
    return rec


def _digest(lay: layout.Layout, slot: str) -> str | None:
    try:
        return upgrade.file_digest(lay.path(slot))
    except OSError:
        return None


def _interrupted(store: Store, lay: layout.Layout, rec: dict, message: str) -> dict:
    rec = store.finish(rec, upgrade.FAILED, Reason.EXECUTION_FAILED, message)
    upgrade.restore_last_good(lay, rec)
    log.error(f"{rec['kind']} {rec['operation']} failed: {message}; {layout.CURRENT} is "
              f"{lay.link_target(layout.CURRENT)}")
    return rec


def run(cfg: Config, failed_unit: str | None = None, wait: float = 30.0) -> dict | None:
    """Resolve an interrupted record. ``failed_unit`` set (``unbounded-upgrade-resume@<unit>.service``,
    the steps' OnFailure=): that unit just failed, so units still busy are probably finishing with it —
    wait for them (bounded) rather than decide on a stale view. Unset (before a daemon start): decide
    at once; a busy unit carries the record on itself."""
    store = Store(cfg)
    deadline = time.monotonic() + (wait if failed_unit else 0)
    while True:
        rec = store.read()
        if not upgrade.in_flight(rec):
            if failed_unit:
                log.info(f"{failed_unit} failed; the upgrade record is final, nothing to resume")
            return rec
        try:
            lock = upgrade.UpgradeLock(wait=0).acquire()
        except OpsError:
            lock = None
        if lock is not None:
            try:
                rec = store.read()
                if not upgrade.in_flight(rec):
                    return rec
                busy = upgrade.busy_units(rec)
                if not busy:
                    # Before the daemon starts (at boot) it is about to run whatever current selects.
                    return resolve(store, rec, restart_daemon=not _daemon_starting())
            finally:
                lock.release()
        if time.monotonic() >= deadline:
            what = f"{', '.join(busy)} at work" if lock is not None else "a step holds the upgrade lock"
            log.info(f"{upgrade.describe(rec)}: {what}; it carries the upgrade on, nothing to resume")
            return rec
        time.sleep(0.5)


def _daemon_starting() -> bool:
    try:
        snap = systemd.service_snapshot(systemd.DAEMON_UNIT)
    except systemd.SystemdUnavailable:
        return False
    return bool(snap["job"]) and snap["active_state"] in ("inactive", "failed", "activating")
