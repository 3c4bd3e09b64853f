"""Step 3, ``unbounded-upgrade-switch@<url>.service``: make the preflighted candidate current.

Order, each durable before the next: the record says ``switching`` (with from/to) → last-good selects
the binary being left → current selects the candidate (symlink to a temp name, rename, fsync the
directory) → the record says ``probation`` → restart the daemon and start the probation unit. A crash
between any two of these is resolved by upgrade_resume from the record and the links.
"""

from __future__ import annotations

from . import fsutil, layout, log, systemd, upgrade
from .config import Config
from .reasons import OpsError, Reason
from .upgrade import Store


def run(cfg: Config, instance: str) -> dict:
    store = Store(cfg)
    with upgrade.UpgradeLock(wait=30.0):
        rec = store.read()
        if not rec or rec.get("instance") != instance or rec.get("phase") != upgrade.PREFLIGHTED:
            if rec and rec.get("instance") == instance and rec.get("phase") in upgrade.TERMINAL:
                log.info(f"nothing to switch: {upgrade.describe(rec)}")
                return rec
            raise OpsError(Reason.EXECUTION_FAILED, "nothing preflighted for this request: "
                           + (upgrade.describe(rec) if rec else "no upgrade record"))
        lay = layout.Layout(cfg.bin_dir)
        frm, to = rec["from"], rec["to"]
        try:
            if lay.link_target(layout.CURRENT) != frm["slot"]:
                raise OpsError(Reason.EXECUTION_FAILED, f"{layout.CURRENT} changed since staging "
                               f"(now {lay.link_target(layout.CURRENT)!r}, was {frm['slot']})")
            if upgrade.file_digest(lay.path(to["slot"])) != to["digest"]:
                raise OpsError(Reason.EXECUTION_FAILED, f"{to['slot']} no longer holds the preflighted binary")
        except (OpsError, OSError) as e:
            err = e if isinstance(e, OpsError) else OpsError(Reason.EXECUTION_FAILED, str(e))
            rec = store.finish(rec, upgrade.FAILED, err.reason, err.message)
            upgrade.restore_last_good(lay, rec)
            raise err from None
        try:
            before = systemd.service_snapshot(systemd.DAEMON_UNIT)
        except systemd.SystemdUnavailable as e:
            log.warn(str(e))
            before = {}
        rec = store.advance(rec, upgrade.SWITCHING, switched_at=upgrade.now(),
                            probation={"old_invocation": before.get("invocation"), "attempts": 0})
        upgrade.hold_point(store, "switch-before-links")
        if lay.link_target(layout.LAST_GOOD) != frm["slot"]:
            fsutil.atomic_symlink(frm["slot"], lay.path(layout.LAST_GOOD))
        fsutil.atomic_symlink(to["slot"], lay.path(layout.CURRENT))
        log.info(f"{rec['kind']} {rec['operation']}: {layout.CURRENT} → {to['slot']} (version {to.get('version')}), "
                 f"{layout.LAST_GOOD} → {frm['slot']} (version {frm.get('version')})")
        upgrade.hold_point(store, "switch-before-restart")
        rec = enter_probation(store, rec)
        return rec


def enter_probation(store: Store, rec: dict, restart: bool = True) -> dict:
    """Record probation, restart the daemon (unless told it is starting anyway) and start the unit
    that watches it. The record is durable first, so a crash here still ends in probation."""
    prob = dict(rec.get("probation") or {})
    prob["started_at"] = upgrade.now()
    if restart:
        try:
            prob["old_invocation"] = systemd.service_snapshot(systemd.DAEMON_UNIT).get("invocation")
        except systemd.SystemdUnavailable:
            pass
    rec = store.advance(rec, upgrade.PROBATION, probation=prob)
    try:
        if restart:
            try:
                systemd.reset_failed(systemd.DAEMON_UNIT)
            except systemd.SystemdUnavailable as e:
                log.warn(f"cannot reset the daemon's failed state: {e}")
            systemd.restart_unit(systemd.DAEMON_UNIT)
        systemd.start_unit(upgrade.PROBATION_UNIT)
    except systemd.SystemdUnavailable as e:
        # The probation unit, or resume on the next daemon start, finds the record in probation; a daemon
        # that never gets ready rolls back.
        log.error(f"could not restart the daemon or start probation: {e}")
        raise OpsError(Reason.EXECUTION_FAILED, str(e)) from None
    log.info(f"{rec['kind']} {rec['operation']}: daemon restarted; on probation "
             f"(ready within {store.cfg.ready_timeout_seconds:g} s, then {store.cfg.probation_seconds:g} s stable)")
    return rec
