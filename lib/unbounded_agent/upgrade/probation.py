"""``unbounded-upgrade-probation.service``: watch the restarted daemon, then commit or roll back.

Healthy means: a new invocation of ``unbounded-agent-daemon.service`` reaches ``active`` (Type=notify: the
binary itself reported READY=1) within ``readyTimeoutSeconds``, then stays active with the same invocation,
MainPID and NRestarts for ``probationSeconds``, never claiming (in its sd_notify ``STATUS=``, as
``unbounded-agent <version>: ...``) another version than its ``version`` printed in preflight. Then the
upgrade is committed. Anything else — a crash before or after ready, a restart, no readiness in time, a
version that is not the one checked — records the failure and starts
``unbounded-agent-daemon-recovery.service``. This does not depend on when systemd fires ``OnFailure=``
(which changed between versions).
"""

from __future__ import annotations

import subprocess
import time

from .. import holdpoint, hostlock, log, program, systemd
from ..config import Config
from ..reasons import Reason
from . import record, units
from .record import Failure, Probation, Store, UpgradeRecord

POLL_SECONDS = 0.2
MAX_ATTEMPTS = 3  # probation started this often (killed, host stopped) → treat as failed
JOURNAL_LINES = 20
# Failure.cause: why an upgrade was rolled back, in one word each (the label of the rollbacks metric)
EXITED_BEFORE_READY, NOT_READY, STOPPED = "ExitedBeforeReady", "NotReady", "StoppedOnProbation"
INTERRUPTED, UNWATCHABLE, FAILED_UNDER_SYSTEMD = "ProbationInterrupted", "Unwatchable", "FailedUnderSystemd"
VERSION_MISMATCH = "VersionMismatch"
CAUSES = (EXITED_BEFORE_READY, NOT_READY, STOPPED, INTERRUPTED, UNWATCHABLE, FAILED_UNDER_SYSTEMD, VERSION_MISMATCH)
STATUS_PREFIX = "unbounded-agent "


def main(argv: list[str] | None = None) -> int:
    return program.plain_main("unbounded-upgrade-probation", __doc__, run, argv)


def daemon_failure(snap: dict, what: str, cause: str) -> tuple[Failure, str | None]:
    """The daemon's failure as the record keeps it (exit code or signal, result), and the invocation
    whose journal tells it."""
    failure = Failure(detail=what, cause=cause, result=snap.get("result"),
                      state=f"{snap.get('active_state')}/{snap.get('sub_state')}")
    code, status = snap.get("exec_main_code"), snap.get("exec_main_status")
    if code == "exited":
        failure.exit_code = status
    elif code in ("killed", "dumped") and status:
        import signal

        try:
            failure.signal = signal.Signals(status).name
        except ValueError:
            failure.signal = str(status)
    return failure, snap.get("invocation")


def journal_lines(unit: str, since_epoch: float | None, lines: int = JOURNAL_LINES,
                  invocation: str | None = None) -> list[str]:
    """The last lines the failed run of the unit wrote (its invocation when known, else everything since
    the switch), then systemd's last words about it (exit status)."""
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


def claimed_version(status_text: str | None) -> str | None:
    """The version a daemon claims in its STATUS= ("unbounded-agent 2.0.0: connected ..."), or None."""
    if not status_text or not status_text.startswith(STATUS_PREFIX):
        return None
    words = status_text[len(STATUS_PREFIX):].split(maxsplit=1)
    version = words[0].rstrip(":") if words else ""
    return version or None


def _lies(snap: dict, expected: str | None) -> tuple[Failure, str | None] | None:
    """A daemon claiming another version than the binary's `version` printed: what runs is not what was
    checked and recorded (the Machine's agent-version annotation and the operation's message would disagree)."""
    claimed = claimed_version(snap.get("status_text"))
    if expected is None or claimed is None or claimed == expected:
        return None
    return daemon_failure(snap, f"the new daemon claims version {claimed[:64]!r} in its status, but its `version` "
                                f"printed {expected[:64]!r}", VERSION_MISMATCH)


def watch(cfg: Config, old_invocation: str | None, snapshot=None, clock=time.monotonic,
          sleep=time.sleep, expected_version: str | None = None) -> tuple[Failure, str | None] | None:
    """Watch the daemon: None when healthy for the whole window, else the failure and its invocation."""
    snapshot = snapshot or (lambda: systemd.service_snapshot(systemd.DAEMON_UNIT))
    ready_deadline = clock() + cfg.ready_timeout_seconds
    # 1. a new invocation becomes active (or fails first)
    while True:
        snap = snapshot()
        fresh = old_invocation is None or snap["invocation"] != old_invocation
        if fresh and snap["active_state"] == "active" and not snap["job"]:
            break
        if fresh and (snap["active_state"] == "failed" or snap["sub_state"] == "auto-restart"):
            return daemon_failure(snap, "the new daemon exited before it reported ready", EXITED_BEFORE_READY)
        if clock() >= ready_deadline:
            return daemon_failure(snap, f"the new daemon did not report ready within {cfg.ready_timeout_seconds:g} s "
                                        f"(state {snap['active_state']}/{snap['sub_state']})", NOT_READY)
        sleep(POLL_SECONDS)
    if (lie := _lies(snap, expected_version)) is not None:
        return lie
    base = (snap["invocation"], snap["main_pid"], snap["n_restarts"])
    log.info(f"daemon ready (pid {snap['main_pid']}); probation for {cfg.probation_seconds:g} s")
    # 2. it stays up, unchanged, for the probation window
    end = clock() + cfg.probation_seconds
    while clock() < end:
        sleep(POLL_SECONDS)
        snap = snapshot()
        if snap["active_state"] != "active" or (snap["invocation"], snap["main_pid"], snap["n_restarts"]) != base:
            return daemon_failure(snap, f"the new daemon stopped during probation (state {snap['active_state']}/"
                                        f"{snap['sub_state']})", STOPPED)
        if (lie := _lies(snap, expected_version)) is not None:
            return lie
    return None


def run(cfg: Config) -> UpgradeRecord | None:
    store = Store(cfg)
    log.bind(step="probation")
    with store.transaction() as rec:
        if rec is None or rec.phase != record.PROBATION:
            log.info("no upgrade on probation: " + (rec.describe() if rec else "no upgrade record"))
            return rec
        record.log_context(rec)
        hostlock.require(rec.id, "probation")
        # switch records probation before this phase; a record without it is watched as enter_probation
        # would have started it (no old invocation: any active daemon is the new one)
        prob = rec.probation = rec.probation or Probation()
        prob.attempts += 1
        rec = store.write(rec)
    id, attempts = rec.id, prob.attempts
    verdict: tuple[Failure, str | None] | None
    if attempts > MAX_ATTEMPTS:
        verdict = Failure(detail=f"probation was interrupted {MAX_ATTEMPTS} times", cause=INTERRUPTED), None
    else:
        holdpoint.hold(store.dir, "probation-watching")
        try:
            verdict = watch(cfg, prob.old_invocation, expected_version=rec.to.version if rec.to else None)
        except systemd.SystemdError as e:
            verdict = Failure(detail=f"cannot watch the daemon: {e}", cause=UNWATCHABLE), None
    with store.transaction() as rec:
        if rec is None or rec.id != id or rec.phase != record.PROBATION:
            log.info("the upgrade left probation meanwhile: " + (rec.describe() if rec else "no record"))
            return rec
        if verdict is None:
            return commit(store, rec)
        failure, invocation = verdict
        failure.journal = journal_lines(systemd.DAEMON_UNIT, rec.phase_time(record.SWITCHING), invocation=invocation)
        rec = store.advance(rec, record.RECOVERING, failure=failure)
        log.error(f"{rec.kind} {rec.operation}: {failure.text()}; starting {units.RECOVERY_UNIT}", result="failed",
                  reason=Reason.DAEMON_FAILED.value)
    systemd.start_unit(units.RECOVERY_UNIT)
    return rec


def commit(store: Store, rec: UpgradeRecord) -> UpgradeRecord:
    frm, to = rec.binaries()
    if store.quarantine_remove(to.digest):
        log.info(f"sha256 {record.short(to.digest)} passed probation: removed from quarantine")
    verb = "rolled back on request" if rec.kind == record.ROLLBACK else "upgraded"
    rec = store.finish(rec, record.COMMITTED, Reason.SUCCEEDED,
                       f"{verb} from {frm.version or '?'} to {to.version or '?'}: the daemon was ready and "
                       f"stayed up for {store.cfg.probation_seconds:g} s")
    log.info(f"{rec.kind} {rec.operation} committed: {rec.message}", result="succeeded", reason=rec.reason)
    return rec
