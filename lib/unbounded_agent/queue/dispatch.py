"""``unbounded-agent-dispatch.service``: run the queued host operations one at a time, each for its whole run
under the host-operation lock, and write each one's result.

Started by ``unbounded-agent-requests.path`` (``DirectoryNotEmpty=`` on the spool) whenever requests wait,
and once at boot. It goes on with the request a killed dispatcher had claimed, else claims the oldest one
by renaming it; takes the host for it; runs it through its chain of units (upgrade/api, reset/api); writes
its result; removes the request. It exits when nothing waits: the path unit starts it again for the next
request, also for one that arrived while it was exiting (systemd checks the directory again when the
service stops).

A reset whose every step that can fail has succeeded (the agent's files are gone; only its daemon still
runs) first gives every request queued behind it a ``Superseded`` result, and, when its requester asked for
it (the watcher, which reports ``Complete`` there), waits at a gate until the requester has reported —
or can no longer report (the daemon has no process: it cannot start again without its files) — before it
stops the daemon.
"""

from __future__ import annotations

import time
import traceback

from .. import holdpoint, hostlock, log, program, records, systemd
from ..reasons import OpsError, Reason
from . import recover
from .spool import KINDS, Gate, Request, Result, Spool

MAX_ATTEMPTS = 3  # a request whose run was cut short this often (a crash in the dispatcher) fails
LOCK_WAIT_SECONDS = 1800.0  # the host held by something else (recovery after a crash, a bootstrap)
GATE_POLL_SECONDS = 0.2
GATE_LOG_SECONDS = 60.0


def main(argv: list[str] | None = None) -> int:
    program.parser("unbounded-agent-dispatch", __doc__).parse_args(argv)
    return program.run("unbounded-agent-dispatch", run, config=False)


def preload() -> None:
    """Import now everything a run may need: a package upgrade that replaces the library while this
    dispatcher runs an operation must not hand it half old and half new modules (it finishes with the code
    it started with; the next dispatcher runs the new one). Called once a request is claimed: a dispatcher
    started with nothing to do (at boot, after the last request) exits without importing it all."""
    from .. import config, layout, urls  # noqa: F401
    from ..reset import api as reset_api  # noqa: F401
    from ..reset.steps import all_steps
    from ..upgrade import api as upgrade_api  # noqa: F401
    from ..upgrade import record, resume  # noqa: F401
    from . import metrics  # noqa: F401

    all_steps()


def run(spool: Spool | None = None) -> None:
    from .. import config

    spool = (spool or Spool()).ensure()
    try:
        cfg, cfg_error = config.load(), None
    except OpsError as e:
        cfg, cfg_error = None, e
        log.error(f"{e}: every queued request fails with it until the config is fixed")
    if cfg is not None:
        recover.check_daemon(cfg, spool)
    while True:
        for name in spool.sweep():
            log.warn(f"moved {name} out of the spool to {spool.rejected}: it is not a request")
        if cfg is not None:
            _converge_orphan(cfg, spool)
        entry = spool.claimed() or spool.claim_next()
        if entry is None:
            return
        preload()
        path, req = entry
        if req is None or req.kind not in KINDS:
            rid = path.name.split("-", 1)[1].rsplit(".", 1)[0]
            finish(cfg, spool, path, Result(id=rid, kind=getattr(req, "kind", "?"), operation=rid, source="?",
                                            succeeded=False, reason=Reason.INVALID_PARAMETERS.value,
                                            message=f"unreadable request {path.name}", finished_at=records.now()))
            continue
        with log.context(operation=req.name, request=req.id, uid=req.uid, kind=req.kind):
            result = dispatch(cfg, cfg_error, spool, path, req)
            # said before the result is written, so the journal tells it before its requester reports it
            (log.info if result.succeeded else log.error)(
                f"{result.describe()} (queued {result.queued_seconds} s, ran {result.seconds} s)",
                result="succeeded" if result.succeeded else "failed", reason=result.reason,
                from_version=result.from_version, to_version=result.to_version)
            holdpoint.hold(spool.root, "dispatch-before-result")
            finish(cfg, spool, path, result)
            if req.kind in ("upgrade", "rollback"):
                _forget_chain(req.id)


def _forget_chain(id: str) -> None:
    """After the result is written (no requester waits on this): no failed step of the chain stays loaded."""
    from ..upgrade import units

    units.forget(id)


def finish(cfg, spool: Spool, path, result: Result) -> None:
    """Write the result, remove its request, and count it in the metrics (which never fail an operation)."""
    from . import metrics

    spool.finish(path, result)
    try:
        metrics.count(cfg, result, spool.root)
    except Exception as e:  # e.g. the textfile directory is read-only: say so, go on
        log.warn(f"cannot update the metrics: {type(e).__name__}: {e}")


def dispatch(cfg, cfg_error: OpsError | None, spool: Spool, path, req: Request) -> Result:
    """Run one claimed request to its result. Never raises: every way it can end is a result."""
    req.attempts += 1
    req.claimed_at = req.claimed_at or records.now()
    spool.update(path, req)
    holdpoint.hold(spool.root, "dispatch-claimed")
    t0 = time.monotonic()
    result = Result(id=req.id, kind=req.kind, operation=req.name, source=req.source, succeeded=False,
                    reason=Reason.EXECUTION_FAILED.value, message="", submitted_at=req.submitted_at,
                    started_at=req.claimed_at, queued_seconds=_between(req.submitted_at, req.claimed_at),
                    attempts=req.attempts)
    log.info(f"{req.kind} {req.name} (request {req.id}, from {req.source}): "
             + ("starting" if req.attempts == 1 else f"going on after an interruption (attempt {req.attempts})"))
    try:
        if cfg_error is not None:
            raise cfg_error
        if req.attempts > MAX_ATTEMPTS:
            raise OpsError(Reason.EXECUTION_FAILED, f"the dispatcher was interrupted {MAX_ATTEMPTS} times while "
                                                    "running it; giving up (see journalctl -u unbounded-agent-dispatch)")
        # A recover request re-opens the upgrade it names and runs under that operation's id: its recovery
        # unit checks the host is held for the record it rolls back.
        lock_id = (req.target or req.id) if req.kind == "recover" else req.id
        with hostlock.HostLock(lock_id, req.kind).acquire(wait=LOCK_WAIT_SECONDS):
            if req.kind == "reset":
                _run_reset(spool, req, result)
            elif req.kind == "recover":
                _run_recover(cfg, spool, req, result)
            else:
                _run_upgrade(cfg, req, result)
    except OpsError as e:
        result.reason, result.message = e.reason.value, e.message
    except Exception as e:  # a bug: keep the traceback in the journal; the request still gets a result
        log.error(traceback.format_exc().rstrip())
        result.reason, result.message = Reason.EXECUTION_FAILED.value, f"unexpected error: {type(e).__name__}: {e}"
    result.finished_at = records.now()
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def _between(a: str | None, b: str | None) -> float | None:
    import datetime

    if a is None or b is None:
        return None
    try:  # AttributeError: a record read from disk may hold something else than a string
        ta, tb = (datetime.datetime.fromisoformat(x.replace("Z", "+00:00")) for x in (a, b))
    except (AttributeError, ValueError):
        return None
    return round((tb - ta).total_seconds(), 3)


# -- upgrade and rollback -------------------------------------------------------------------------------


def _run_upgrade(cfg, req: Request, result: Result) -> None:
    from .. import records as rec_io
    from ..upgrade import api

    rec = api.run(cfg, api.Spec(id=req.id, operation=req.name, kind=req.kind, url=req.url, sha256=req.sha256,
                                force=req.force, uid=req.uid))
    result.succeeded = rec.committed
    result.reason = rec.reason_enum().value
    result.message = rec.message or rec.describe()
    result.from_version = rec.from_.version if rec.from_ else None
    result.to_version = rec.to.version if rec.to else None
    result.failure = rec_io.to_dict(rec.failure) if rec.failure else None


def _run_recover(cfg, spool: Spool, req: Request, result: Result) -> None:
    """Roll a committed upgrade back (crashes.py), and add it to that upgrade's own result."""
    from ..upgrade import api
    from ..upgrade.record import ROLLED_BACK

    rec, note = api.recover(cfg, req.id, req.target or "", req.detail)
    if rec is None:
        result.succeeded, result.reason, result.message = True, Reason.SUCCEEDED.value, note
        return
    result.succeeded = rec.phase == ROLLED_BACK and rec.restored_daemon == "active"
    result.reason, result.message = rec.reason_enum().value, rec.message or rec.describe()
    result.from_version = rec.to.version if rec.to else None  # from the failing binary back to the previous one
    result.to_version = rec.from_.version if rec.from_ else None
    result.failure = records.to_dict(rec.failure) if rec.failure else None
    spool.amend_result(rec.id, after_commit={"reason": result.reason, "message": result.message,
                                             "at": rec.finished_at, "request": req.id, "failure": result.failure})


def _converge_orphan(cfg, spool: Spool) -> None:
    """An upgrade in flight that no claimed request owns (left by an older toolset, or by a request that gave
    up): follow it to its end under its own id before anything else runs."""
    from ..upgrade import api
    from ..upgrade.record import Store

    rec = api.orphan(cfg)
    claimed = spool.claimed()
    if rec is None or (claimed and rec.id in (claimed[1].id, claimed[1].target)):
        return
    with log.context(operation=rec.operation, request=rec.id, uid=rec.uid, kind=rec.kind):
        log.info(f"found {rec.describe()} with no request: following it to its end first")
        try:
            with hostlock.HostLock(rec.id, rec.kind).acquire(wait=LOCK_WAIT_SECONDS):
                api.follow(Store(cfg), rec.id)
        except OpsError as e:
            log.error(f"could not converge {rec.operation}: {e}")


# -- reset ----------------------------------------------------------------------------------------------


def _run_reset(spool: Spool, req: Request, result: Result) -> None:
    from ..reset import api

    def before_daemon_stops(phase1: api.PhaseOutcome) -> None:
        superseded = supersede(spool, req)
        # The watcher reports before its daemon stops: its own reset, and the operations this one superseded.
        if req.report_gate or any(r.source == "machineoperation" for r in superseded):
            _wait_at_gate(spool, req, phase1)
        holdpoint.hold(spool.root, "reset-gate-passed")

    outcome = api.run(api.Spec(id=req.id, operation=req.name, all_wg=req.all_wg, uid=req.uid), before_daemon_stops)
    if len(outcome.phases) > 1 or outcome.succeeded:
        supersede(spool, req)  # requests that arrived while the daemon was being stopped
    result.succeeded, result.reason, result.message, result.step = (outcome.succeeded, outcome.reason,
                                                                    outcome.message, outcome.step)


def supersede(spool: Spool, reset: Request) -> list[Request]:
    """Give every request still queued behind the reset (but another reset) a terminal result."""
    done = []
    for path, req in spool.pending():
        if req.kind == "reset":
            continue
        finish(None, spool, path, Result(id=req.id, kind=req.kind, operation=req.name, source=req.source,
                                         succeeded=False, reason=Reason.SUPERSEDED.value, submitted_at=req.submitted_at,
                                         finished_at=records.now(),
                                         message=f"superseded by reset {reset.name}: the agent is removed from this host"))
        with log.context(operation=req.name, request=req.id, uid=req.uid, kind=req.kind):
            log.info(f"{req.kind} {req.name} superseded by reset {reset.name}", result="failed",
                     reason=Reason.SUPERSEDED.value)
        done.append(req)
    return done


GATE_MESSAGE = "AgentReset completed: {what} (its daemon stops next)"


def _wait_at_gate(spool: Spool, req: Request, phase1) -> None:
    """Let the requester report before its daemon stops. A daemon with no process (its files are gone: it cannot
    start again) is stood in for by the reporter, from the copy remove-agent kept (reset/reporter_kit.py); stop
    waiting when neither can report."""
    from ..reset import api, reporter_kit

    steps = [{"step": s.step, "number": s.number, "result": "succeeded" if s.succeeded else "failed",
              "removed": s.removed} for s in phase1.steps if s.number]
    spool.open_gate(Gate(id=req.id, steps=steps, message=GATE_MESSAGE.format(what=api.COMPLETE)))
    log.info(f"reset {req.name}: waiting for its requester to report before the daemon stops")
    next_log = time.monotonic() + GATE_LOG_SECONDS
    reporter = systemd.DAEMON_UNIT
    while not spool.acked(req.id):
        if not _can_report(reporter):
            if reporter == systemd.DAEMON_UNIT and _start_reporter(req, reporter_kit):
                reporter = reporter_kit.REPORTER_UNIT
                continue
            log.warn(f"reset {req.name}: {reporter} that would report it has no process; going on")
            return
        if time.monotonic() >= next_log:
            log.info(f"reset {req.name}: still waiting for {reporter} to report (the API server may be down)")
            next_log += GATE_LOG_SECONDS
        time.sleep(GATE_POLL_SECONDS)


def _start_reporter(req: Request, reporter_kit) -> bool:
    """Start the reporter in the daemon's place (the daemon's files are gone: it cannot start again), when the
    reset kept what it needs; whether it runs."""
    from ..reset.reports import reset_dir

    if reporter_kit.held_for(reset_dir()) != req.id:
        log.warn(f"reset {req.name}: the daemon cannot start again (its files are gone), and no copy of its config "
                 "and credentials was kept for this reset: nothing can report it now")
        return False
    log.info(f"reset {req.name}: the daemon cannot start again (its files are gone); starting "
             f"{reporter_kit.REPORTER_UNIT} to report in its place")
    try:
        systemd.wait_jobs_done([systemd.start_unit(reporter_kit.REPORTER_UNIT)])
    except systemd.SystemdError as e:
        log.error(f"reset {req.name}: cannot start {reporter_kit.REPORTER_UNIT}: {e}")
        return False
    return _can_report(reporter_kit.REPORTER_UNIT)


def _can_report(unit: str) -> bool:
    try:
        st = systemd.unit_state(unit)
    except systemd.SystemdError:
        return True  # cannot tell now: keep waiting (and asking)
    return systemd.running(st) and bool(st.get("main_pid"))
