"""The upgrade record and the files beside it: quarantine, rollback signal, and the request's secret.

The record (``<state dir>/upgrade.json``) describes the upgrade in flight, or the last one finished:

    requested ─► staging ─► staged ─► preflighted ─► switching ─► probation ─► committed
        │           │          │           │             │            │
        └───────────┴──────────┴─────┬─────┴─────────────┘            ▼
                                     ▼ (current never touched)    recovering ─► rolled-back
                                   failed

``failed``, ``committed`` and ``rolled-back`` are terminal. A record left in any other phase by a
``kill -9`` or a power loss is *interrupted*; resume.py decides from the record and the links whether it
failed (before the switch) or goes back on probation. One way leads out of ``committed``: when the committed
daemon keeps failing (crashes.py), a ``recover`` request re-opens the record (``after_commit``) into
``recovering``, and recovery ends it ``rolled-back`` (reason DaemonFailedAfterCommit).

Secrets: the record holds only redacted URLs. The full URL waits in ``upgrade-request.json`` (mode 0600)
until the stage step reads it; it is removed when the operation ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from dataclasses import field
from pathlib import Path

from .. import log, records
from ..config import Config
from ..reasons import OpsError, Reason

FORMAT = 2
RECORD_FILE = "upgrade.json"
REQUEST_FILE = "upgrade-request.json"
QUARANTINE_FILE = "quarantine.json"
SIGNAL_FILE = "rollback-signal.json"

REQUESTED, STAGING, STAGED, PREFLIGHTED = "requested", "staging", "staged", "preflighted"
SWITCHING, PROBATION, RECOVERING = "switching", "probation", "recovering"
COMMITTED, FAILED, ROLLED_BACK = "committed", "failed", "rolled-back"
PHASES = (REQUESTED, STAGING, STAGED, PREFLIGHTED, SWITCHING, PROBATION, RECOVERING, COMMITTED, FAILED, ROLLED_BACK)
TERMINAL = frozenset({COMMITTED, FAILED, ROLLED_BACK})
BEFORE_SWITCH = frozenset({REQUESTED, STAGING, STAGED, PREFLIGHTED})
UPGRADE, ROLLBACK = "upgrade", "rollback"


@dataclasses.dataclass
class Binary:
    """One agent binary as the record knows it: the slot it is in, its digest and version."""

    slot: str | None = None
    digest: str | None = None
    version: str | None = None
    archive_sha256: str | None = None


@dataclasses.dataclass
class PhaseEntry:
    phase: str
    at: str
    t: float  # seconds since the epoch, for durations


@dataclasses.dataclass
class Probation:
    old_invocation: str | None = None  # the daemon's invocation before the restart: a new one must come
    attempts: int = 0  # probation units started for this record (killed ones included)
    started_at: str | None = None


# Failure.cause: why an upgrade was rolled back, in one word each (the label of the rollbacks metric)
EXITED_BEFORE_READY, NOT_READY, STOPPED = "ExitedBeforeReady", "NotReady", "StoppedOnProbation"
INTERRUPTED, FAILED_UNDER_SYSTEMD = "ProbationInterrupted", "FailedUnderSystemd"
NOT_STARTED, RESTARTED_FROM_OUTSIDE, UNRECORDED = "NotStarted", "RestartedFromOutside", "Unrecorded"
CRASHED_AFTER_COMMIT, VERSION_MISMATCH = "CrashedAfterCommit", "VersionMismatch"
CAUSES = (EXITED_BEFORE_READY, NOT_READY, STOPPED, INTERRUPTED, FAILED_UNDER_SYSTEMD, NOT_STARTED,
          RESTARTED_FROM_OUTSIDE, UNRECORDED, CRASHED_AFTER_COMMIT, VERSION_MISMATCH)


@dataclasses.dataclass
class Failure:
    """How the new daemon failed: the exit detail and the journal excerpt of its failed run."""

    detail: str = ""
    cause: str | None = None  # one word for what happened (CAUSES): the rollbacks' metric label
    result: str | None = None
    state: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    journal: list[str] = field(default_factory=list)
    # False when the release is not to blame (the daemon was never started, or restarted from outside too
    # often): it is rolled back to keep a known agent running, but not quarantined.
    blames_release: bool = True

    def text(self) -> str:
        if self.exit_code is not None:
            how = f"exit code {self.exit_code}"
        elif self.signal:
            how = f"signal {self.signal}"
        else:
            return self.detail or "failed"
        return f"{self.detail} ({how})" if self.detail else how


@dataclasses.dataclass
class Download:
    bytes: int = 0
    total: int | None = None


@dataclasses.dataclass
class UpgradeRecord:
    id: str  # the request id: also the instance of the chain's units
    operation: str  # what the requester calls it (a MachineOperation's name, or the id)
    kind: str = UPGRADE
    uid: str = ""  # the MachineOperation's uid, when one asked for it (for the journal's fields)
    url: str = ""  # redacted
    force: bool = False
    phase: str = REQUESTED
    history: list[PhaseEntry] = field(default_factory=list)
    reason: str | None = None
    message: str = ""
    expected_sha256: str | None = None
    from_: Binary | None = field(default=None, metadata={"key": "from"})
    to: Binary | None = None
    last_good_before: Binary | None = None
    probation: Probation | None = None
    failure: Failure | None = None
    progress: Download | None = None
    same_content: bool = False
    restored_daemon: str | None = None
    after_commit: bool = False  # re-opened after its commit: the committed daemon kept failing
    reopened_by: str | None = None  # the recover request that re-opened it
    stage_peak_rss_kib: int | None = None
    requested_at: str = ""
    started_at: str | None = None
    switched_at: str | None = None
    finished_at: str | None = None
    updated_at: str = ""
    format: int = FORMAT

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def in_flight(self) -> bool:
        return self.phase not in TERMINAL

    @property
    def committed(self) -> bool:
        return self.phase == COMMITTED

    def binaries(self) -> tuple[Binary, Binary]:
        """``from_`` and ``to``, which every phase from ``staging`` on has (the stage step records both)."""
        if self.from_ is None or self.to is None:
            raise self._corrupt("its 'from' and 'to' binaries")
        return self.from_, self.to

    def slots(self) -> tuple[str, str]:
        """The slots of ``from_`` and ``to`` (see binaries)."""
        frm, to = self.binaries()
        if not frm.slot or not to.slot:
            raise self._corrupt("the slots of its 'from' and 'to' binaries")
        return frm.slot, to.slot

    def _corrupt(self, what: str) -> OpsError:
        # Our atomic writes never leave such a record: fail clearly rather than guess what it meant.
        return OpsError(Reason.EXECUTION_FAILED, f"corrupt upgrade record for {self.kind} {self.operation} "
                                                 f"(request {self.id}): phase {self.phase} without {what}")

    def phase_time(self, phase: str) -> float | None:
        for h in reversed(self.history):
            if h.phase == phase:
                return h.t
        return None

    def describe(self) -> str:
        """One line for the journal, the CLI and errors (the URL is already redacted)."""
        frm, to = self.from_ or Binary(), self.to or Binary()
        what = f"{self.kind} {self.operation}"
        versions = f"{frm.version or '?'} → {to.version or '?'}"
        late = " after its commit" if self.after_commit else ""
        if self.terminal:
            return f"{what} {self.phase}{late} ({versions}): {self.reason}: {self.message}"
        return f"{what} in phase {self.phase}{late} ({versions}) since {self.updated_at}"

    def reason_enum(self) -> Reason:
        if self.phase == COMMITTED:
            return Reason.SUCCEEDED
        try:
            return Reason(self.reason)
        except ValueError:
            return Reason.DAEMON_FAILED if self.phase == ROLLED_BACK else Reason.EXECUTION_FAILED


def log_context(rec: UpgradeRecord, step: str | None = None) -> None:
    """Tag this process's journal messages with rec's operation (and the step, when given)."""
    frm, to = rec.from_ or Binary(), rec.to or Binary()
    log.bind(operation=rec.operation, request=rec.id, uid=rec.uid, kind=rec.kind, from_version=frm.version,
             to_version=to.version, **({"step": step} if step else {}))


@dataclasses.dataclass
class UpgradeRequest:
    """The part of a request that must not be shown: the full URL (it may carry a signed query)."""

    id: str
    url: str = ""
    sha256: str | None = None
    force: bool = False


@dataclasses.dataclass
class QuarantineEntry:
    digest: str | None = None
    archive_sha256: str | None = None
    version: str | None = None
    operation: str | None = None
    at: str | None = None
    failure: str | None = None

    def message(self) -> str:
        what = f"version {self.version or 'unknown'} (sha256 {short(self.digest)})"
        return (f"{what} was rolled back by operation {self.operation} at {self.at}: {self.failure or 'daemon failed'}; "
                "it is quarantined — request it with --force to try it again")


@dataclasses.dataclass
class Quarantine:
    entries: list[QuarantineEntry] = field(default_factory=list)


@dataclasses.dataclass
class RollbackSignal:
    """What the restored daemon reads to report a rollback (as upstream's signal file)."""

    operation: str
    kind: str = UPGRADE
    request_id: str | None = None  # the upgrade's request (what the watcher's progress names)
    after_commit: bool = False  # the rollback came after the upgrade was committed (and reported Complete)
    reason: str | None = None
    at: str = ""
    failed: Binary | None = None
    restored: Binary | None = None
    failure: Failure | None = None
    failure_message: str = field(default="", metadata={"key": "failureMessage"})


def file_digest(path: str | os.PathLike) -> str:
    import hashlib  # here: most programs that read the record never hash

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def short(digest: str | None) -> str:
    return digest[:12] if digest else "?"


class Store:
    """The upgrade's files under the state dir; every write is atomic (records/fsutil)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.state_dir)
        self.record_path = self.dir / RECORD_FILE
        self.request_path = self.dir / REQUEST_FILE
        self.quarantine_path = self.dir / QUARANTINE_FILE
        self.signal_path = self.dir / SIGNAL_FILE

    def _load(self, cls, path: Path):
        try:
            return records.load(cls, path)
        except records.CorruptRecord as e:
            # A corrupt file cannot come from our atomic writes; treat it as absent but say so.
            log.warn(f"ignoring {e}")
            return None

    # -- the record ---------------------------------------------------------------------------------

    def read(self) -> UpgradeRecord | None:
        try:
            doc = records.read_json(self.record_path)  # its errors name the path
            if doc is not None and not doc.get("id"):  # written by a toolset before request ids: no "id" key
                doc["id"] = doc.get("operation") or ""
            return records.from_dict(UpgradeRecord, doc) if doc is not None else None
        except records.CorruptRecord as e:
            log.warn(f"ignoring {e}" if str(self.record_path) in str(e) else f"ignoring {self.record_path}: {e}")
            return None

    def for_step(self, id: str, phase: str, step: str) -> UpgradeRecord:
        """The record a step of operation id works on: in the phase the step takes it from. One already
        finished for that operation is returned as it is (the step has nothing left to do: the caller checks
        ``terminal``); anything else is an error, and the step changes nothing."""
        rec = self.read()
        if rec is not None and rec.id == id:
            log_context(rec, step)
        else:
            log.bind(request=id, step=step)
        if rec is not None and rec.id == id and (rec.phase == phase or rec.terminal):
            if rec.terminal:
                log.info(f"nothing to {step}: {rec.describe()}")
            return rec
        raise OpsError(Reason.EXECUTION_FAILED, f"operation {id} is not waiting to {step} (in phase {phase}): "
                                                + (rec.describe() if rec else "no upgrade record"))

    def persist(self, write, what: str = "the upgrade record"):
        """write() retried while the state dir refuses writes (records.persist): for verdicts, which must not
        be lost to a full disk for a moment."""
        return records.persist(write, f"{what} in {self.dir}")

    def write(self, rec: UpgradeRecord) -> UpgradeRecord:
        rec.format = FORMAT
        rec.updated_at = records.now()
        records.save(rec, self.record_path, mode=0o644)
        log_context(rec)  # the versions, once the stage step knows them
        return rec

    def advance(self, rec: UpgradeRecord, phase: str, **changes) -> UpgradeRecord:
        """Move rec to phase (appending to its history) and persist it."""
        for key, value in changes.items():
            setattr(rec, key, value)
        if rec.phase != phase or not rec.history:  # a new record starts in its first phase: record it too
            rec.phase = phase
            rec.history.append(PhaseEntry(phase, records.now(), round(time.time(), 3)))
        return self.write(rec)

    def finish(self, rec: UpgradeRecord, phase: str, reason: Reason, message: str, **changes) -> UpgradeRecord:
        assert phase in TERMINAL
        rec = self.advance(rec, phase, reason=reason.value, message=message, finished_at=records.now(), **changes)
        self.remove_request()
        return rec

    @contextlib.contextmanager
    def transaction(self):
        """The record's own mutex, for the moments two actors may decide on the same record (probation's
        verdict and recovery started by the daemon's OnFailure=): an flock on the state directory. Without
        a state directory (the agent was reset away) there is no record, and none is made."""
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.read()
        finally:
            os.close(fd)

    # -- the request's secret (0600) ------------------------------------------------------------------

    def write_request(self, req: UpgradeRequest) -> None:
        records.save(req, self.request_path, mode=0o600)

    def read_request(self, id: str) -> UpgradeRequest | None:
        req = self._load(UpgradeRequest, self.request_path)
        return req if req and req.id == id else None

    def remove_request(self) -> None:
        self.request_path.unlink(missing_ok=True)

    # -- quarantine -------------------------------------------------------------------------------------

    def quarantine(self) -> list[QuarantineEntry]:
        q = self._load(Quarantine, self.quarantine_path)
        return list(q.entries) if q else []

    def quarantined(self, *digests: str | None) -> QuarantineEntry | None:
        wanted = {d for d in digests if d}
        return next((e for e in self.quarantine() if e.digest in wanted or e.archive_sha256 in wanted), None)

    def quarantine_add(self, entry: QuarantineEntry) -> None:
        entries = [e for e in self.quarantine() if e.digest != entry.digest] + [entry]
        records.save(Quarantine(entries), self.quarantine_path, mode=0o644)

    def quarantine_remove(self, digest: str | None) -> bool:
        entries = self.quarantine()
        kept = [e for e in entries if e.digest != digest]
        if len(kept) != len(entries):
            records.save(Quarantine(kept), self.quarantine_path, mode=0o644)
            return True
        return False

    # -- rollback signal -----------------------------------------------------------------------------

    def write_signal(self, signal: RollbackSignal) -> None:
        records.save(signal, self.signal_path, mode=0o644)

    def read_signal(self) -> RollbackSignal | None:
        return self._load(RollbackSignal, self.signal_path)
