"""After the commit: when the committed daemon counts as failing (the failure-detection window).

The daemon unit runs ``unbounded-agent-daemon-exited`` (queue/recover.py) after every run (``ExecStopPost=-+``:
outside the daemon's sandbox, and never failing the stop). A run that ended while nobody had asked the daemon
to stop (no stop or restart job on the unit) is a crash: it is kept, with systemd's SERVICE_RESULT, EXIT_CODE
and EXIT_STATUS and the digest of the binary it ran, in ``<state dir>/daemon-exits.json``.

The window: a committed binary counts as failing when it crashed ``CRASHES`` times within ``WINDOW_SECONDS`` of
its commit, or when systemd's start limit stopped it (``OnFailure=``) at any time, whichever comes first. The
start limit alone is not enough: a daemon that lives 15 s and is restarted 5 s later starts 3 times a minute,
never more, and never reaches it. Then, if a last-good binary other than the committed one exists, a
``recover`` request is queued: the dispatcher runs it like any host operation (one at a time, under the host
lock), re-opening the upgrade's record for recovery (api.recover). Without a last-good, the daemon is left to
systemd's restart policy.

Why 3 in 10 minutes: 3 is the daemon's own StartLimitBurst= (as many failures as systemd tolerates in a
minute), so one transient exit (an OOM kill, a node under pressure) never rolls a release back; 10 minutes is
sixty times the default probation window and covers a release that fails at its first periodic task. A daemon
that lives 15 s is rolled back on its third crash, about 40 s after the first.
"""

from __future__ import annotations

import dataclasses

from .. import layout, log, records, systemd
from . import record
from .record import CRASHED_AFTER_COMMIT, Failure, Store, UpgradeRecord

CRASHES = 3
WINDOW_SECONDS = 600.0
EXITS_FILE = "daemon-exits.json"
KEEP = 20
JOURNAL_LINES = 20
REQUESTED = frozenset({"stop", "restart", "try-restart", "reload-or-restart", "reload-or-try-restart"})


@dataclasses.dataclass
class DaemonExit:
    """One run of the daemon that ended without anyone asking it to (as systemd told ExecStopPost=)."""

    at: str
    t: float  # seconds since the epoch
    invocation: str | None = None
    result: str | None = None  # SERVICE_RESULT: exit-code, signal, core-dump, watchdog, timeout, ...
    exit_code: str | None = None  # EXIT_CODE: exited, killed, dumped
    exit_status: str | None = None  # EXIT_STATUS: a number, or a signal name
    digest: str | None = None  # the binary current selected

    def fill(self, failure: Failure) -> Failure:
        """Put how this run ended (result, exit code or signal) on a failure the record keeps."""
        failure.result = self.result
        status = self.exit_status or ""
        if self.exit_code == "exited":
            try:
                failure.exit_code = int(status)
            except ValueError:
                failure.signal = status or None
        elif self.exit_code in ("killed", "dumped") and status:
            failure.signal = status if status.startswith("SIG") else f"SIG{status}"
        return failure

    def text(self) -> str:
        how = {"exited": "exit code", "killed": "signal", "dumped": "signal (core dumped)"}.get(self.exit_code or "", "")
        return f"{how} {self.exit_status}".strip() or (self.result or "ended")


@dataclasses.dataclass
class DaemonExits:
    exits: list[DaemonExit] = dataclasses.field(default_factory=list)


def _path(store: Store):
    return store.dir / EXITS_FILE


def read_exits(store: Store) -> list[DaemonExit]:
    try:
        doc = records.load(DaemonExits, _path(store))
    except (records.CorruptRecord, OSError) as e:
        log.warn(f"ignoring {e}")
        return []
    return list(doc.exits) if doc else []


def exit_of(store: Store, invocation: str) -> DaemonExit | None:
    """How the run `invocation` ended, as the exit hook kept it; None when it kept nothing."""
    return next((e for e in reversed(read_exits(store)) if e.invocation == invocation), None)


def stop_requested() -> bool | None:
    """Whether someone asked the daemon to stop (a stop or restart job is on it); None when systemd cannot say."""
    try:
        return any(j["type"] in REQUESTED for j in systemd.jobs() if j["unit"] == systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        log.warn(str(e))
        return None


def crashed(env, requested: bool | None) -> bool:
    """Whether the run ExecStopPost= reports on ended on its own (no stop asked for; when systemd cannot say,
    judged by SERVICE_RESULT alone)."""
    if requested is None:
        return (env.get("SERVICE_RESULT") or "") not in ("success", "timeout")
    return not requested


def record_exit(store: Store, env, now: float) -> tuple[DaemonExit, list[DaemonExit]]:
    """Keep the crash ExecStopPost= reports, with the digest of the binary current selects; (it, the exits kept)."""
    lay = layout.Layout(store.cfg.bin_dir)
    real = lay.resolves(layout.CURRENT)
    ex = DaemonExit(at=records.now(), t=round(now, 3), invocation=env.get("INVOCATION_ID"),
                    result=env.get("SERVICE_RESULT") or None, exit_code=env.get("EXIT_CODE"),
                    exit_status=env.get("EXIT_STATUS"), digest=record.file_digest(real) if real else None)
    log.warn(f"the daemon exited on its own ({ex.text()}, result {ex.result or '?'})")
    exits = (read_exits(store) + [ex])[-KEEP:]
    if store.dir.is_dir():  # never make the state dir (a reset may have removed it)
        try:
            records.save(DaemonExits(exits), _path(store))
        except OSError as e:
            log.warn(f"cannot keep this exit in {_path(store)}: {e.strerror}")
    return ex, exits


def after_commit(rec: UpgradeRecord | None, exits: list[DaemonExit], now: float) -> list[DaemonExit] | None:
    """The crashes of rec's committed binary since its commit when they are CRASHES or more within the window;
    else None (and a line in the journal saying how many so far)."""
    if rec is None or not rec.committed or rec.same_content or rec.to is None:
        return None
    committed = rec.phase_time(record.COMMITTED)
    if committed is None or now - committed > WINDOW_SECONDS:
        return None  # outside the window only the start limit (OnFailure=) counts
    crashes = [e for e in exits if e.t >= committed and e.digest == rec.to.digest]
    if len(crashes) < CRASHES:
        log.info(f"{rec.kind} {rec.operation}: the committed daemon crashed {len(crashes)} of {CRASHES} times "
                 f"within {WINDOW_SECONDS:g} s of its commit")
        return None
    return crashes


def last_good(lay: layout.Layout, rec: UpgradeRecord) -> str | None:
    """The slot last-good selects when it holds another binary than the committed one (None: nothing to go
    back to)."""
    real = lay.resolves(layout.LAST_GOOD)
    if real is None or rec.to is None:
        return None
    try:
        digest = record.file_digest(real)
    except OSError:
        return None
    return lay.link_target(layout.LAST_GOOD) if digest != rec.to.digest else None


def failure(store: Store, rec: UpgradeRecord, detail: str) -> Failure:
    """The committed daemon's failure as the record keeps it: the last crash's exit detail and its journal."""

    committed = rec.phase_time(record.COMMITTED)
    to = rec.to.digest if rec.to else None
    mine = [e for e in read_exits(store) if committed is None or (e.t >= committed and e.digest == to)]
    last = mine[-1] if mine else None
    f = Failure(detail=detail, cause=CRASHED_AFTER_COMMIT, state="crash-looping after commit")
    if last:
        last.fill(f)
    f.journal = journal_lines(systemd.DAEMON_UNIT, committed, invocation=last.invocation if last else None)
    return f


def journal_lines(unit: str, since_epoch: float | None, lines: int = JOURNAL_LINES,
                  invocation: str | None = None) -> list[str]:
    """The last lines the failed run of the unit wrote (its invocation when known, else everything since
    the switch), then systemd's last words about it (exit status)."""
    import subprocess  # here: the exit hook and the dispatcher import this module; few runs read the journal

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
