"""``unbounded-upgrade-probation.service``: watch the restarted daemon, then commit or roll back.

Healthy means: a new invocation of ``unbounded-agent-daemon.service`` reaches ``active`` (Type=notify: the
binary itself reported READY=1) within ``readyTimeoutSeconds`` of its own start, then stays active with the
same invocation, MainPID and NRestarts for ``probationSeconds``, never claiming (in its sd_notify
``STATUS=``, as ``unbounded-agent <version>: ...``) another version than its ``version`` printed in preflight.
Then the upgrade is committed. A crash before or after ready, no readiness in time, or a version that is not
the one checked, records the failure and starts
``unbounded-agent-daemon-recovery.service``. This does not depend on when systemd fires ``OnFailure=``
(which changed between versions).

What is not held against the release: the previous daemon's stop (its TimeoutStopSec=, however slow it is:
the ready clock starts when the new run starts, as systemd's own TimeoutStartSec= does); a restart or stop
from outside (an operator's ``systemctl restart``: NRestarts counts only automatic restarts), after which
the next run is watched again; and a moment when systemd cannot be asked (a D-Bus hiccup), which is waited
out — a crash meanwhile still shows as a new invocation, MainPID or NRestarts.
"""

from __future__ import annotations

import time
import typing

from .. import holdpoint, hostlock, layout, log, program, systemd
from ..config import Config
from ..reasons import OpsError, Reason
from . import crashes, record, units
from .crashes import DaemonExit
from .record import (
    EXITED_BEFORE_READY,
    INTERRUPTED,
    NOT_READY,
    NOT_STARTED,
    RESTARTED_FROM_OUTSIDE,
    STOPPED,
    UNRECORDED,
    VERSION_MISMATCH,
    Failure,
    Probation,
    Store,
    UpgradeRecord,
)

POLL_SECONDS = 0.2
MAX_ATTEMPTS = 3  # probation started this often (killed, host stopped) → treat as failed
DBUS_GRACE_SECONDS = 30.0  # systemd unreachable for this long: probation gives up and runs again

STATUS_PREFIX = "unbounded-agent "  # the daemon's STATUS= begins with its name and version

Verdict = tuple[Failure, str | None]
AGAIN = "again"  # a watch step's outcome: restarted from outside, watch the next run


def main(argv: list[str] | None = None) -> int:
    return program.plain_main("unbounded-upgrade-probation", __doc__, run, argv)


def daemon_failure(snap: dict, what: str, cause: str, blames_release: bool = True) -> Verdict:
    """The daemon's failure as the record keeps it (exit code or signal, result), and the invocation
    whose journal tells it."""
    failure = Failure(detail=what, cause=cause, result=snap.get("result"),
                      state=f"{snap.get('active_state')}/{snap.get('sub_state')}", blames_release=blames_release)
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


def later_run_failure(snap: dict, watched: str, what: str, cause: str, ended: DaemonExit | None) -> Verdict:
    """The watched run ended and systemd already restarted it (the poll missed the gap: a busy host, a D-Bus
    hiccup): its exit detail is the one the daemon's exit hook kept for that invocation, and its journal is
    the watched run's, not the restarted one's."""
    failure = Failure(detail=what, cause=cause, state=f"restarted ({_state(snap)})")
    return (ended.fill(failure) if ended is not None else failure), watched


def not_ready(snap: dict, timeout: float) -> Verdict:
    return daemon_failure(snap, f"the new daemon did not report ready within {timeout:g} s of its start "
                                f"(state {_state(snap)})", NOT_READY)


def _state(s: dict) -> str:
    return f"{s['active_state']}/{s['sub_state']}"


class _Watch:
    """One probation watch: the new run, its readiness, its stable window; again after a restart from outside."""

    def __init__(self, cfg: Config, old_invocation: str | None, snapshot, clock, sleep, expected_version=None,
                 ended=None):
        self.cfg, self.old, self.snapshot, self.clock, self.sleep = cfg, old_invocation, snapshot, clock, sleep
        self.expected_version = expected_version
        self.ended = ended or (lambda invocation: crashes.exit_of(Store(cfg), invocation))
        self.rewatches = 0
        self.unreachable_since: float | None = None

    def snap(self) -> dict | None:
        """The daemon's state; None while systemd cannot be asked (up to DBUS_GRACE_SECONDS, then SystemdError)."""
        try:
            s = self.snapshot()
        except systemd.SystemdError as e:
            now = self.clock()
            if self.unreachable_since is None:
                self.unreachable_since = now
                log.warn(f"cannot read the daemon's state ({e}); watching on")
            if now - self.unreachable_since >= DBUS_GRACE_SECONDS:
                raise
            return None
        self.unreachable_since = None
        return s

    def run(self) -> Verdict | None:
        while True:
            s, verdict = self.new_run()
            if verdict is None:
                s, verdict = self.ready(s)
            if verdict is None and s is not None:
                verdict = self.stable(s)
            if verdict != AGAIN:
                return typing.cast("Verdict | None", verdict)

    def again(self, invocation: str, what: str) -> tuple[None, typing.Any]:
        """A restart or stop from outside: watch the next run, up to MAX_REWATCH times."""
        self.rewatches += 1
        if self.rewatches > units.MAX_REWATCH:
            return None, (Failure(detail=f"the daemon was restarted from outside {self.rewatches} times during "
                                         "probation: it could not be watched", cause=RESTARTED_FROM_OUTSIDE,
                                  blames_release=False), None)
        log.info(f"{what}: not the new release's doing; watching its next run")
        self.old = invocation
        return None, AGAIN

    def new_run(self) -> tuple[typing.Any, typing.Any]:
        """Wait for a run that is not the old one: the old daemon's stop (up to TimeoutStopSec=, then the kill)
        is not the new release's time."""
        stop_deadline = self.clock() + units.STOP_BOUND_SECONDS
        idle_since: float | None = None
        while True:
            s = self.snap()
            if s is not None:
                if s["invocation"] and (self.old is None or s["invocation"] != self.old):
                    return s, None
                if s["active_state"] in ("inactive", "failed") and not s["job"]:
                    # nothing is going to start it (stopped from outside, a start refused): give it the ready time
                    idle_since = self.clock() if idle_since is None else idle_since
                    if self.clock() - idle_since >= self.cfg.ready_timeout_seconds:
                        return None, daemon_failure(s, f"the new daemon was not started (state {_state(s)}, "
                                                       f"result {s.get('result')})", NOT_STARTED, blames_release=False)
                else:
                    idle_since = None
                if idle_since is None and self.clock() >= stop_deadline:
                    return None, daemon_failure(s, f"the new daemon did not start: the previous run was still "
                                                   f"{_state(s)} after {units.STOP_BOUND_SECONDS} s",
                                                NOT_STARTED, blames_release=False)
            self.sleep(POLL_SECONDS)

    def ready(self, first: dict) -> tuple[typing.Any, typing.Any]:
        """The run reports ready within readyTimeoutSeconds of its own start."""
        timeout = self.cfg.ready_timeout_seconds
        start = first.get("started_monotonic") or self.clock()
        deadline = min(start, self.clock()) + timeout
        inv, restarts = first["invocation"], first["n_restarts"]
        s: dict | None = first
        while True:
            if s is not None:
                if s["invocation"] != inv and s["n_restarts"] <= restarts:
                    return self.again(inv, "the daemon was restarted from outside while it started")
                if s["invocation"] != inv or s["sub_state"] == "auto-restart" or s["active_state"] == "failed" or (
                        s["active_state"] == "deactivating" and (s["result"] != "success" or not s["job"])):
                    if s["invocation"] == inv and s["result"] == "timeout":
                        # systemd ended it at TimeoutStartSec= (this bound plus a margin, generator.py): it was
                        # not ready in time either, whoever saw it first
                        return None, not_ready(s, timeout)
                    what = "the new daemon exited before it reported ready"
                    if s["invocation"] != inv:
                        return None, later_run_failure(s, inv, what, EXITED_BEFORE_READY, self.ended(inv))
                    return None, daemon_failure(s, what, EXITED_BEFORE_READY)
                if s["active_state"] == "active" and not s["job"]:
                    return s, _lies(s, self.expected_version)
                if s["active_state"] in ("deactivating", "inactive"):  # a stop asked from outside
                    return self.again(inv, "the daemon was stopped from outside while it started")
                if self.clock() >= deadline:
                    return None, not_ready(s, timeout)
            self.sleep(POLL_SECONDS)
            s = self.snap()

    def stable(self, first: dict) -> typing.Any:
        """It stays up, unchanged, for the probation window."""
        base = (first["invocation"], first["main_pid"], first["n_restarts"])
        log.info(f"daemon ready (pid {first['main_pid']}); probation for {self.cfg.probation_seconds:g} s")
        end = self.clock() + self.cfg.probation_seconds
        while True:
            self.sleep(POLL_SECONDS)
            s = self.snap()
            if s is None:
                continue  # a crash meanwhile shows in the next snapshot, which the window's end waits for
            if s["active_state"] == "active" and (s["invocation"], s["main_pid"], s["n_restarts"]) == base:
                if (lie := _lies(s, self.expected_version)) is not None:
                    return lie
                if self.clock() >= end:
                    return None
                continue
            outside = (s["n_restarts"] <= base[2] and s["sub_state"] != "auto-restart" and s["active_state"] != "failed"
                       and (s["invocation"] != base[0]
                            or (s["active_state"] in ("deactivating", "inactive") and s["result"] == "success"
                                and (s["job"] or s["active_state"] == "inactive"))))
            if outside:
                return self.again(base[0], "the daemon was restarted or stopped from outside during probation")[1]
            if s["invocation"] != base[0]:
                return later_run_failure(s, base[0], "the new daemon stopped during probation and was restarted",
                                         STOPPED, self.ended(base[0]))
            return daemon_failure(s, f"the new daemon stopped during probation (state {_state(s)})", STOPPED)


def claimed_version(status_text: str | None) -> str | None:
    """The version a daemon claims in its STATUS= ("unbounded-agent 2.0.0: connected ..."), or None."""
    if not status_text or not status_text.startswith(STATUS_PREFIX):
        return None
    words = status_text[len(STATUS_PREFIX):].split(maxsplit=1)
    version = words[0].rstrip(":") if words else ""
    return version or None


def _lies(snap: dict, expected: str | None) -> Verdict | None:
    """A daemon claiming another version than the binary's `version` printed: what runs is not what was
    checked and recorded (the Machine's agent-version annotation and the operation's message would disagree)."""
    claimed = claimed_version(snap.get("status_text"))
    if expected is None or claimed is None or claimed == expected:
        return None
    return daemon_failure(snap, f"the new daemon claims version {claimed[:64]!r} in its status, but its `version` "
                                f"printed {expected[:64]!r}", VERSION_MISMATCH)


def watch(cfg: Config, old_invocation: str | None, snapshot=None, clock=time.monotonic,
          sleep=time.sleep, expected_version: str | None = None, ended=None) -> Verdict | None:
    """Watch the daemon: None when healthy for the whole window, else the failure and its invocation.
    SystemdError when systemd could not be asked for DBUS_GRACE_SECONDS."""
    snapshot = snapshot or (lambda: systemd.service_snapshot(systemd.DAEMON_UNIT))
    return _Watch(cfg, old_invocation, snapshot, clock, sleep, expected_version, ended).run()


def run(cfg: Config) -> UpgradeRecord | None:
    log.bind(step="probation")
    store = Store(cfg)
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
        try:
            rec = store.write(rec)
        except OSError as e:  # the dispatcher bounds how often it starts probation for one operation
            log.warn(f"cannot count this probation attempt ({e.strerror}): watching anyway")
    id, attempts = rec.id, prob.attempts
    verdict: Verdict | None
    if attempts > MAX_ATTEMPTS:
        verdict = Failure(detail=f"probation was interrupted {MAX_ATTEMPTS} times", cause=INTERRUPTED), None
    else:
        holdpoint.hold(store.dir, "probation-watching")
        try:
            verdict = watch(cfg, prob.old_invocation, expected_version=rec.to.version if rec.to else None)
        except systemd.SystemdError as e:  # no verdict: the record stays on probation and is watched again
            raise OpsError(Reason.EXECUTION_FAILED, f"cannot watch the daemon: {e}; probation runs again") from None
    return decide(store, id, verdict)


def decide(store: Store, id: str, verdict: Verdict | None) -> UpgradeRecord | None:
    """Commit, or record the failure and start recovery. Each write is retried while the state dir refuses
    it; a failure that still cannot be recorded starts recovery anyway (it rolls back from the links first)."""
    with store.transaction() as rec:
        if rec is None or rec.id != id or rec.phase != record.PROBATION:
            log.info("the upgrade left probation meanwhile: " + (rec.describe() if rec else "no record"))
            return rec
        to_slot = rec.slots()[1]
        current = layout.Layout(store.cfg.bin_dir).link_target(layout.CURRENT)
        if current != to_slot:  # recovery flipped the links and could not record it: it finishes the job
            verdict = verdict or (Failure(detail=f"{layout.CURRENT} selects {current}, not {to_slot}: rolled back "
                                                 "while the record could not say so", cause=UNRECORDED,
                                                 blames_release=False), None)
        if verdict is None:
            holdpoint.hold(store.dir, "probation-before-commit")
            return store.persist(lambda: commit(store, rec))
        failure, invocation = verdict
        failure.journal = crashes.journal_lines(systemd.DAEMON_UNIT, rec.phase_time(record.SWITCHING), invocation=invocation)
        try:
            rec = store.persist(lambda: store.advance(rec, record.RECOVERING, failure=failure))
        except OpsError as e:
            log.error(f"{e}: starting {units.RECOVERY_UNIT} all the same")
        log.error(f"{rec.kind} {rec.operation}: {failure.text()}; starting {units.RECOVERY_UNIT}", result="failed",
                  reason=Reason.DAEMON_FAILED.value)
    systemd.start_unit(units.RECOVERY_UNIT)  # it runs once this unit has ended (After=)
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
