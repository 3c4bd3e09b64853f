"""Step 4, ``unbounded-upgrade-probation.service``: watch the restarted daemon, then commit or roll back.

Healthy means: a new invocation of ``unbounded-agent-daemon.service`` reaches ``active`` (Type=notify:
the binary itself reported READY=1) within ``readyTimeoutSeconds``, then stays active with the same
invocation, MainPID and NRestarts for ``probationSeconds``. Then the upgrade is committed. Anything
else — a crash before or after ready, a restart, no readiness in time — records the failure and
starts ``unbounded-agent-daemon-recovery.service``. This does not depend on when systemd fires
``OnFailure=`` (which changed between versions); the daemon's ``OnFailure=`` is the second path.
"""

from __future__ import annotations

import subprocess
import time

from . import log, systemd, upgrade
from .config import Config
from .upgrade import Store
from .reasons import Reason

POLL_SECONDS = 0.2
MAX_ATTEMPTS = 3  # probation restarted this often (killed, host stopped) → treat as failed
JOURNAL_LINES = 20


def daemon_failure(snap: dict, what: str) -> dict:
    """The failure of the daemon as the rollback signal carries it: exit code or signal, result."""
    failure = {"detail": what, "result": snap.get("result"), "state": f"{snap.get('active_state')}/{snap.get('sub_state')}",
               "invocation": snap.get("invocation")}
    code, status = snap.get("exec_main_code"), snap.get("exec_main_status")
    if code == "exited":
        failure["exit_code"] = status
    elif code in ("killed", "dumped") and status:
        import signal

        try:
            failure["signal"] = signal.Signals(status).name
        except ValueError:
            failure["signal"] = str(status)
    return failure


def failure_text(failure: dict) -> str:
    if "exit_code" in failure:
        how = f"exit code {failure['exit_code']}"
    elif "signal" in failure:
        how = f"signal {failure['signal']}"
    else:
        how = failure.get("detail", "failed")
    return how if how == failure.get("detail") else f"{failure.get('detail')} ({how})"


def journal_lines(unit: str, since_epoch: float | None, lines: int = JOURNAL_LINES,
                  invocation: str | None = None) -> list[str]:
    """The last lines the failed run of the unit wrote (its invocation when known, else everything
    since the switch), then systemd's last words about it (exit status)."""
    def query(*match: str, n: int) -> list[str]:
        args = ["journalctl", "--no-pager", "-q", "-o", "cat", "-n", str(n), *match]
        if since_epoch:
            args += ["--since", f"@{int(since_epoch)}"]
        try:
            out = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [line[:300] for line in out.splitlines()[-n:]]

    own = [f"_SYSTEMD_UNIT={unit}"] + ([f"_SYSTEMD_INVOCATION_ID={invocation}"] if invocation else [])
    manager = [line for line in query(f"UNIT={unit}", "_PID=1", n=lines)
               if ("exited" in line or "Failed" in line) and "kill control group" not in line]
    return query(*own, n=lines - 5) + manager[-5:]


def switched_epoch(rec: dict) -> float | None:
    for h in reversed(rec.get("history", [])):
        if h.get("phase") == upgrade.SWITCHING:
            return h.get("t")
    return None


def watch(cfg: Config, old_invocation: str | None, snapshot=None, clock=time.monotonic, sleep=time.sleep) -> dict | None:
    """Watch the daemon: None when healthy for the whole window, else the failure."""
    snapshot = snapshot or (lambda: systemd.service_snapshot(systemd.DAEMON_UNIT))
    ready_deadline = clock() + cfg.ready_timeout_seconds
    snap: dict = {}
    # 1. a new invocation becomes active (or fails first)
    while True:
        snap = snapshot()
        fresh = old_invocation is None or snap["invocation"] != old_invocation
        if fresh and snap["active_state"] == "active" and not snap["job"]:
            break
        if fresh and (snap["active_state"] == "failed" or snap["sub_state"] == "auto-restart"):
            return daemon_failure(snap, "the new daemon exited before it reported ready")
        if clock() >= ready_deadline:
            return daemon_failure(snap, f"the new daemon did not report ready within {cfg.ready_timeout_seconds:g} s "
                                        f"(state {snap['active_state']}/{snap['sub_state']})")
        sleep(POLL_SECONDS)
    base = (snap["invocation"], snap["main_pid"], snap["n_restarts"])
    log.info(f"daemon ready (pid {snap['main_pid']}); probation for {cfg.probation_seconds:g} s")
    # 2. it stays up, unchanged, for the probation window
    end = clock() + cfg.probation_seconds
    while clock() < end:
        sleep(POLL_SECONDS)
        snap = snapshot()
        if snap["active_state"] != "active" or (snap["invocation"], snap["main_pid"], snap["n_restarts"]) != base:
            return daemon_failure(snap, f"the new daemon stopped during probation (state {snap['active_state']}/"
                                        f"{snap['sub_state']})")
    return None


def run(cfg: Config) -> dict | None:
    store = Store(cfg)
    with upgrade.UpgradeLock(wait=30.0):
        rec = store.read()
        if not rec or rec.get("phase") != upgrade.PROBATION:
            log.info("no upgrade on probation: " + (upgrade.describe(rec) if rec else "no upgrade record"))
            return rec
        prob = dict(rec.get("probation") or {})
        prob["attempts"] = prob.get("attempts", 0) + 1
        rec = store.write(dict(rec, probation=prob))
    operation = rec["operation"]
    if prob["attempts"] > MAX_ATTEMPTS:
        failure = {"detail": f"probation was interrupted {MAX_ATTEMPTS} times"}
    else:
        upgrade.hold_point(store, "probation-watching")
        try:
            failure = watch(cfg, prob.get("old_invocation"))
        except systemd.SystemdUnavailable as e:
            failure = {"detail": f"cannot watch the daemon: {e}"}
    with upgrade.UpgradeLock(wait=30.0):
        rec = store.read()
        if not rec or rec.get("operation") != operation or rec.get("phase") != upgrade.PROBATION:
            log.info("the upgrade left probation meanwhile: " + (upgrade.describe(rec) if rec else "no record"))
            return rec
        if failure is None:
            return commit(store, rec)
        failure["journal"] = journal_lines(systemd.DAEMON_UNIT, switched_epoch(rec), invocation=failure.pop("invocation", None))
        rec = store.advance(rec, upgrade.RECOVERING, failure=failure)
        log.error(f"{rec['kind']} {operation}: {failure_text(failure)}; starting {upgrade.RECOVERY_UNIT}")
    systemd.start_unit(upgrade.RECOVERY_UNIT)
    return rec


def commit(store: Store, rec: dict) -> dict:
    frm, to = rec["from"], rec["to"]
    if store.quarantine_remove(to.get("digest")):
        log.info(f"sha256 {upgrade.short(to.get('digest'))} passed probation: removed from quarantine")
    verb = "rolled back on request" if rec.get("kind") == "rollback" else "upgraded"
    rec = store.finish(rec, upgrade.COMMITTED, Reason.SUCCEEDED,
                       f"{verb} from {frm.get('version') or '?'} to {to.get('version') or '?'}: the daemon was ready and "
                       f"stayed up for {store.cfg.probation_seconds:g} s")
    log.info(f"{rec['kind']} {rec['operation']} committed: {rec['message']}")
    return rec
