"""``unbounded-agent-daemon-recovery.service``: roll a failed upgrade back to the binary it replaced.

Started by probation when the new daemon fails it, and by the daemon's ``OnFailure=`` (when it hits
its start limit). It acts only when the record says an upgrade is on probation or recovering;
otherwise it changes nothing and says so. It never runs the agent binary (which may be garbage):
versions and digests come from the record.

Order, each durable before the next: record ``recovering`` with the failure → current selects the
binary the upgrade left (last-good; both equal the record's ``from`` slot) → quarantine the failed
digest → rollback signal → record ``rolled-back`` (reason DaemonFailed) → reset-failed and restart
the daemon, and wait until it is ready. A crash anywhere re-runs it (resume) to the same end.
"""

from __future__ import annotations

import time

from . import fsutil, layout, log, systemd, upgrade, upgrade_probation
from .config import Config
from .reasons import OpsError, Reason
from .upgrade import Store

RESTART_READY_SECONDS = 60.0
START_LIMIT_WAIT_MAX = 305.0  # as upstream: at most the 5-minute interval, plus 5 s


def _target(lay: layout.Layout, rec: dict) -> str:
    """The slot to go back to: last-good, which the switch pointed at the record's from slot."""
    frm = rec["from"]
    lg = lay.link_target(layout.LAST_GOOD)
    for slot in (lg, frm["slot"]):
        if slot in layout.SLOTS and lay.resolves(slot) is not None:
            try:
                if upgrade.file_digest(lay.path(slot)) == frm["digest"]:
                    return slot
            except OSError:
                continue
    raise OpsError(Reason.EXECUTION_FAILED, f"cannot roll back: neither {layout.LAST_GOOD} ({lg}) nor {frm['slot']} "
                                            f"holds the previous binary (sha256 {upgrade.short(frm['digest'])})")


def run(cfg: Config) -> dict | None:
    store = Store(cfg)
    with upgrade.UpgradeLock(wait=60.0):
        rec = store.read()
        if not rec or rec.get("phase") not in (upgrade.PROBATION, upgrade.RECOVERING):
            log.info("no upgrade on probation (" + (upgrade.describe(rec) if rec else "no upgrade record")
                     + "): not changing any link")
            return rec
        lay = layout.Layout(cfg.bin_dir)
        if rec["phase"] == upgrade.PROBATION:  # we came through the daemon's OnFailure=
            snap = _snapshot()
            failure = upgrade_probation.daemon_failure(snap, f"the new daemon failed under systemd "
                                                             f"(result {snap.get('result')})")
            failure["journal"] = upgrade_probation.journal_lines(systemd.DAEMON_UNIT,
                                                                 upgrade_probation.switched_epoch(rec),
                                                                 invocation=failure.pop("invocation", None))
            rec = store.advance(rec, upgrade.RECOVERING, failure=failure)
        failure = rec.get("failure") or {"detail": "daemon failed"}
        frm, to = rec["from"], rec["to"]
        try:
            target = _target(lay, rec)
        except OpsError as e:  # terminal: looping on an impossible rollback helps no one
            store.finish(rec, upgrade.FAILED, Reason.DAEMON_FAILED, f"{upgrade_probation.failure_text(failure)}; {e.message}")
            raise
        upgrade.hold_point(store, "recovery-before-links")
        if lay.link_target(layout.CURRENT) != target:
            fsutil.atomic_symlink(target, lay.path(layout.CURRENT))
        if lay.link_target(layout.LAST_GOOD) != target:
            fsutil.atomic_symlink(target, lay.path(layout.LAST_GOOD))
        text = upgrade_probation.failure_text(failure)
        store.quarantine_add({"digest": to.get("digest"), "archive_sha256": to.get("archive_sha256"),
                              "version": to.get("version"), "operation": rec["operation"], "at": upgrade.now(),
                              "failure": text})
        signal = {"operation": rec["operation"], "kind": rec.get("kind"), "at": upgrade.now(),
                  "failed": {"version": to.get("version"), "digest": to.get("digest"), "slot": to.get("slot")},
                  "restored": {"version": frm.get("version"), "digest": frm.get("digest"), "slot": target},
                  "failure": failure,
                  "failureMessage": f"AgentUpgrade daemon failed after switching binary ({text}); rolled back to "
                                    f"{frm.get('version') or '?'}"}
        store.write_signal(signal)
        upgrade.hold_point(store, "recovery-before-restart")
        # Restart before the record is final: a crash before it re-runs recovery, which restarts again.
        restored = restart_daemon()
        message = (f"version {to.get('version') or '?'} failed on probation: {text}; rolled back to "
                   f"{frm.get('version') or '?'} ({target}); sha256 {upgrade.short(to.get('digest'))} quarantined")
        if restored != "active":
            message += f"; the restored daemon is {restored}"
        rec = store.finish(rec, upgrade.ROLLED_BACK, Reason.DAEMON_FAILED, message, restored_daemon=restored)
        log.error(f"{rec['kind']} {rec['operation']}: {message}")
    if restored != "active":
        raise OpsError(Reason.DAEMON_FAILED, f"rolled back, but the restored daemon is {restored}")
    log.info(f"the daemon runs {frm.get('version') or 'the previous version'} again")
    return rec


def _snapshot() -> dict:
    try:
        return systemd.service_snapshot(systemd.DAEMON_UNIT)
    except systemd.SystemdUnavailable as e:
        log.warn(str(e))
        return {}


def restart_daemon(ready_seconds: float = RESTART_READY_SECONDS) -> str:
    """reset-failed (tolerated: some SELinux policies deny it), restart, and wait until active. When
    the start limit refuses the restart, wait out its interval once (bounded) and start again.
    Returns the daemon's final ActiveState."""
    try:
        systemd.reset_failed(systemd.DAEMON_UNIT)
    except systemd.SystemdUnavailable as e:
        log.warn(f"reset-failed refused ({e}); restarting anyway")
    try:
        systemd.restart_unit(systemd.DAEMON_UNIT)
    except systemd.SystemdUnavailable as e:
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
    except (systemd.SystemdUnavailable, ValueError, TypeError):
        return 65.0
    if usec <= 0 or usec >= 2**63:
        return 65.0
    return min(usec / 1e6 + 5, START_LIMIT_WAIT_MAX)
