"""What the dispatcher calls to run an upgrade or a rollback, while it holds the host for the operation.

    rec = api.run(cfg, Spec(id, operation, kind, url, sha256, force))   # blocks until the record is terminal

``run`` checks what can be checked at once (URL, digest, quarantine: a refusal changes nothing and raises
OpsError), records the request, starts the operation's chain of units and follows the record to its end.
When no unit of the operation is at work and the record is still in flight — a step was killed, the host
stopped, the dispatcher itself was restarted — it decides the record (resume.resolve), so every operation
ends in a terminal record. Deciding is retried with a growing pause, a bounded number of times: a record
that no unit can bring to an end (the state dir refuses writes) ends the operation with StateUnwritable
(or ExecutionFailed) instead of holding the host for ever; the dispatcher decides it again before it runs
anything else.

    rec, note = api.recover(cfg, request_id, target, detail)   # a recover request (crashes.py)
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

from .. import layout, log, records, systemd
from ..config import Config
from ..reasons import OpsError, Reason
from . import crashes, record, resume, units
from .record import Store, UpgradeRecord, UpgradeRequest

POLL_SECONDS = 0.1
IDLE_SECONDS = 1.0  # no unit of the operation at work for this long: it was interrupted
DECIDE_BACKOFF_MAX = 30.0  # the pause before deciding again grows to this
MAX_DECISIONS = 8  # decided this often and still in flight: the operation ends without the record
MAX_REFUSALS = 2  # decided this often while the state dir refused writes: it ends sooner (StateUnwritable)


@dataclasses.dataclass(frozen=True)
class Spec:
    id: str
    operation: str
    kind: str = record.UPGRADE
    url: str = ""
    sha256: str | None = None
    force: bool = False
    uid: str = ""  # the MachineOperation's, when one asked for it


def check(cfg: Config, spec: Spec) -> tuple[str, str | None]:
    """The request's redacted URL and expected digest; OpsError (InvalidParameters, Quarantined, no agent to
    upgrade) otherwise. Nothing is written before this passes."""
    from .. import layout, urls

    lay = layout.Layout(cfg.bin_dir)
    if lay.link_target(layout.CURRENT) is None:
        # After a reset, say: an upgrade must not bring the agent's directories back.
        raise OpsError(Reason.EXECUTION_FAILED, f"no agent is installed on this host ({lay.path(layout.CURRENT)} is "
                       "missing): nothing to upgrade or roll back")
    if spec.kind == record.ROLLBACK:
        return "", None
    url = (spec.url or "").strip()
    if not url:
        raise OpsError(Reason.INVALID_PARAMETERS, 'missing required parameter "downloadURL"')
    urls.validate(url, allow_http=cfg.allow_insecure_http)
    expected = urls.parse_sha256(spec.sha256)
    entry = Store(cfg).quarantined(expected)
    if entry and not spec.force:
        raise OpsError(Reason.QUARANTINED, entry.message())
    return urls.redact(url), expected


def begin(cfg: Config, spec: Spec) -> UpgradeRecord:
    """Record the request and start its chain. Raises OpsError (nothing recorded) when it is refused."""
    store = Store(cfg)
    redacted, expected = check(cfg, spec)
    current = store.read()
    if current is not None and current.in_flight and current.id != spec.id:
        # Its units, links and last-good are in the middle of a change: staging over them would lose the
        # binary its rollback needs. The dispatcher converges it (orphan) before it runs anything else.
        raise OpsError(Reason.UPGRADE_IN_PROGRESS, f"{current.describe()}: it must end before {spec.kind} "
                                                   f"{spec.operation} can begin")
    rec = UpgradeRecord(id=spec.id, operation=spec.operation, kind=spec.kind, uid=spec.uid, url=redacted, force=spec.force,
                        expected_sha256=expected, requested_at=records.now())
    if spec.kind == record.UPGRADE:
        store.write_request(UpgradeRequest(id=spec.id, url=spec.url.strip(), sha256=expected, force=spec.force))
    rec = store.advance(rec, record.REQUESTED)
    unit = units.chain_start(spec.id)
    try:
        systemd.start_unit(unit)
    except systemd.SystemdError as e:
        return store.finish(rec, record.FAILED, Reason.EXECUTION_FAILED, f"cannot start {unit}: {e}")
    log.info(f"{spec.kind} {spec.operation} requested{' from ' + redacted if redacted else ''}: started {unit}")
    return rec


def run(cfg: Config, spec: Spec, on_change: Callable[[UpgradeRecord], None] | None = None) -> UpgradeRecord:
    """Run (or, after a restart of the dispatcher, go on with) operation spec.id to a terminal record."""
    store = Store(cfg)
    rec = store.read()
    if rec is not None and rec.id == spec.id:
        if rec.in_flight:
            log.info(f"going on with {rec.describe()}")
        return follow(store, spec.id, on_change)
    begin(cfg, spec)
    return follow(store, spec.id, on_change)


def follow(store: Store, id: str, on_change: Callable[[UpgradeRecord], None] | None = None) -> UpgradeRecord:
    """Wait until the record of operation id is terminal, deciding it when its units are all gone."""
    seen = None
    idle_since: float | None = None
    next_check = 0.0
    decisions, refusals, pause, last_error = 0, 0, IDLE_SECONDS, ""
    while True:
        rec = store.read()
        if rec is None or rec.id != id:
            raise OpsError(Reason.EXECUTION_FAILED, f"the upgrade record no longer describes operation {id}")
        if on_change and (rec.phase, rec.updated_at) != seen:
            seen = (rec.phase, rec.updated_at)
            on_change(rec)
        if rec.terminal:
            return rec
        now = time.monotonic()
        if now >= next_check:  # asking systemd costs more than reading the record: not every poll
            next_check = now + IDLE_SECONDS / 4
            try:
                busy = units.busy_units(rec)
            except systemd.SystemdError as e:
                log.warn(f"cannot tell which units of {id} are at work: {e}")
                busy = ["?"]
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= pause:
                rec = store.read()
                if rec is not None and rec.id == id and rec.in_flight:
                    if decisions >= MAX_DECISIONS or refusals >= MAX_REFUSALS:
                        raise _stuck(store, rec, decisions, last_error)
                    decisions += 1
                    pause = min(IDLE_SECONDS * 2 ** decisions, DECIDE_BACKOFF_MAX)
                    # decided all the same: recovery rolls back from the links even when it cannot write
                    refusals = refusals + 1 if _unwritable(store.dir) else 0
                    log.info(f"no unit of {id} is at work: deciding {rec.describe()}")
                    try:
                        resume.resolve(store, rec, restart_daemon=not resume.daemon_starting())
                    except (systemd.SystemdError, OpsError, OSError) as e:
                        # e.g. probation cannot start (masked): the daemon's OnFailure= recovery may still end
                        # it; decide again after a longer pause.
                        last_error = str(e)
                        log.warn(f"cannot go on with {id} now: {e}; deciding again in {pause:g} s")
                idle_since = None
        time.sleep(POLL_SECONDS)


def _stuck(store: Store, rec: UpgradeRecord, decisions: int, last_error: str) -> OpsError:
    """The end of an operation whose record no unit could bring to an end."""
    unwritable = _unwritable(store.dir)
    why = f"the state dir refuses writes ({unwritable})" if unwritable else (last_error or "its units ended without a verdict")
    return OpsError(Reason.STATE_UNWRITABLE if unwritable else Reason.EXECUTION_FAILED,
                    f"{rec.describe()}: still not ended after deciding it {decisions} times: {why}; the host is "
                    "released, and the dispatcher decides it again before it runs another operation "
                    "(journalctl -u unbounded-upgrade-probation -u unbounded-agent-daemon-recovery)")


def _unwritable(directory) -> str | None:
    """Why a small file cannot be written in directory now (None when it can)."""
    probe = os.path.join(directory, f".probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def recover(cfg: Config, request_id: str, target: str, detail: str) -> tuple[UpgradeRecord | None, str]:
    """A recover request (crashes.py): re-open the committed upgrade ``target`` into ``recovering`` and follow
    recovery to its end. (None, why) when there is nothing to recover: the record moved on, its binary is no
    longer current, or there is no last-good to go back to (left to systemd)."""
    store = Store(cfg)
    lay = layout.Layout(cfg.bin_dir)
    with store.transaction() as rec:
        if rec is not None and rec.id == target and rec.reopened_by == request_id:
            pass  # this request re-opened it already (the dispatcher was restarted): follow it to its end
        elif rec is None or rec.id != target or not rec.committed:
            return None, "nothing to recover: " + (rec.describe() if rec else "no upgrade record")
        else:
            current = lay.resolves(layout.CURRENT)
            if current is None or record.file_digest(current) != (rec.to.digest if rec.to else None):
                return None, f"nothing to recover: {layout.CURRENT} no longer selects the binary {rec.operation} committed"
            if crashes.last_good(lay, rec) is None:
                return None, f"nothing to roll back to ({layout.LAST_GOOD} holds no other binary): left to systemd"
            failure = crashes.failure(store, rec, detail)
            rec = store.persist(lambda: store.advance(rec, record.RECOVERING, failure=failure, after_commit=True,
                                                      reopened_by=request_id, finished_at=None))
            log.error(f"{rec.kind} {rec.operation}: {detail}; rolling back to {layout.LAST_GOOD}")
    if rec.in_flight:
        systemd.start_unit(units.RECOVERY_UNIT)
    return follow(store, rec.id), ""


def orphan(cfg: Config) -> UpgradeRecord | None:
    """An in-flight record that no queued operation owns (left by an older toolset): the dispatcher
    follows it to its end under its own id before anything else runs."""
    rec = Store(cfg).read()
    return rec if rec is not None and rec.in_flight else None
