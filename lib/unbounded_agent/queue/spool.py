"""The operation queue on disk: requests waiting, the one being run, results, and reset report gates.

    /var/lib/unbounded-agent-ops/
      spool/incoming/                   requests being written (temp files; renamed into requests/)
      spool/requests/<seq>-<id>.request waiting, oldest first (0600: a request may carry a signed URL)
      spool/requests/<seq>-<id>.claimed the one the dispatcher runs (renamed from .request: the claim)
      results/<id>.json                 how each operation ended (0644, redacted)
      gates/<id>.json, gates/<id>.ack   a reset that waits for its requester to report before the agent goes

``unbounded-agent-requests.path`` starts the dispatcher while ``spool/requests/`` is not empty, so a request
written just before a power cut, or a claim whose dispatcher was killed, runs after the restart. This
directory belongs to the toolset, not to the agent: a reset does not remove it (its own result lives here).

Every file is written under a temporary name and renamed into place (records/fsutil), so readers see
whole files only; an id's result is written before its claimed request is removed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

from .. import fsutil, records
from ..config import ops_dir
from ..reasons import OpsError, Reason

KINDS = ("upgrade", "rollback", "reset", "recover")
SOURCES = ("cli", "systemctl", "machineoperation", "daemon")  # daemon: its ExecStopPost= or its recovery
KEEP_RESULTS = 200
_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?")
_ENTRY = re.compile(r"[0-9]{20}-[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?\.(request|claimed)")


def new_id(kind: str) -> str:
    """A request id: unique, sortable by time, and valid as a unit instance and a file name."""
    return f"{kind}-{time.strftime('%Y%m%dt%H%M%S', time.gmtime())}-{os.urandom(3).hex()}"


@dataclasses.dataclass
class Request:
    id: str
    kind: str
    operation: str = ""  # what the requester calls it (a MachineOperation's name); the id otherwise
    uid: str = ""  # the MachineOperation's uid, when one asked for it (for the journal's fields)
    source: str = "cli"
    submitted_at: str = ""
    url: str = ""  # the full URL: it may carry a signed query, hence mode 0600
    sha256: str | None = None
    force: bool = False
    all_wg: bool = False  # reset: also every wg<N> link
    report_gate: bool = False  # reset: wait for the requester's report before the agent is removed
    target: str | None = None  # recover: the committed upgrade (its request id) whose daemon keeps failing
    detail: str = ""  # recover: why (how the committed daemon failed)
    attempts: int = 0  # runs the dispatcher started for it (a claim interrupted by a crash counts)
    claimed_at: str | None = None
    format: int = 1

    @property
    def name(self) -> str:
        return self.operation or self.id


@dataclasses.dataclass
class Result:
    id: str
    kind: str
    operation: str
    source: str
    succeeded: bool
    reason: str
    message: str
    submitted_at: str = ""
    started_at: str | None = None
    finished_at: str = ""
    queued_seconds: float | None = None  # submitted → claimed
    seconds: float | None = None  # claimed → finished
    from_version: str | None = None
    to_version: str | None = None
    attempts: int = 1  # runs the dispatcher started for it (more than one: a dispatcher was interrupted)
    step: str | None = None  # reset: the step that failed
    failure: dict | None = None  # upgrade: how the new daemon failed (exit detail, journal excerpt)
    # upgrade: committed, then rolled back by a recover request because its daemon kept failing (reason,
    # message, at, request, failure)
    after_commit: dict | None = None
    format: int = 1

    def exit_code(self) -> int:
        if self.succeeded:
            return 0
        try:
            return Reason(self.reason).exit_code
        except ValueError:
            return Reason.EXECUTION_FAILED.exit_code

    def describe(self) -> str:
        verdict = "succeeded" if self.succeeded else f"failed ({self.reason})"
        late = f"; then rolled back after its commit: {self.after_commit.get('message')}" if self.after_commit else ""
        return f"{self.kind} {self.operation} {verdict}: {self.message}{late}"


@dataclasses.dataclass
class Gate:
    """A reset that is about to remove the agent, waiting for its requester (the watcher) to report."""

    id: str
    message: str
    steps: list[dict] = dataclasses.field(default_factory=list)
    at: str = ""


class Spool:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else ops_dir()
        # incoming/ and requests/ share one parent, so that a rename between them never crosses a mount (the
        # daemon's sandbox makes spool/ writable as one bind mount)
        self.incoming = self.root / "spool" / "incoming"
        self.requests = self.root / "spool" / "requests"
        self.results = self.root / "results"
        self.gates = self.root / "gates"
        self.rejected = self.root / "rejected"

    def ensure(self) -> Spool:
        for d, mode in ((self.root, 0o755), (self.incoming, 0o700), (self.requests, 0o700),
                        (self.results, 0o755), (self.gates, 0o755)):
            d.mkdir(mode=mode, parents=True, exist_ok=True)
        return self

    # -- requests -----------------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Queue req (atomically: the path unit never sees half a file). Refuses an unknown kind, a
        malformed or reused id, and anything but a reset while a reset is queued or running."""
        if req.kind not in KINDS:
            raise OpsError(Reason.INVALID_PARAMETERS, f"unknown operation kind {req.kind!r}")
        if not _ID.fullmatch(req.id):
            raise OpsError(Reason.INVALID_PARAMETERS, f"invalid request id {req.id!r}")
        # Only the directories a request goes through: the sandboxed daemon may write nothing else here.
        for d in (self.incoming, self.requests):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.state(req.id) is not None:
            raise OpsError(Reason.INVALID_PARAMETERS, f"request {req.id} exists already")
        if req.kind != "reset":
            reset = next((r for _, r in self.queue() if r.kind == "reset"), None)
            if reset is not None:
                raise OpsError(Reason.SUPERSEDED, f"reset {reset.name} is queued or running on this host: the agent "
                                                  f"is about to be removed; {req.kind} refused")
        req.submitted_at = req.submitted_at or records.now()
        name = f"{time.time_ns():020d}-{req.id}.request"
        tmp = self.incoming / name
        records.save(req, tmp, mode=0o600)
        os.rename(tmp, self.requests / name)
        fsutil.fsync_dir(self.requests)
        return req

    def _entries(self, suffix: str) -> list[Path]:
        try:
            return sorted(p for p in self.requests.iterdir() if p.name.endswith(suffix))
        except FileNotFoundError:
            return []

    def _read(self, path: Path) -> Request | None:
        try:
            return records.load(Request, path)
        except FileNotFoundError:
            return None

    def pending(self) -> list[tuple[Path, Request]]:
        out = []
        for p in self._entries(".request"):
            try:
                req = self._read(p)
            except records.CorruptRecord:
                continue  # the dispatcher fails it when it claims it
            if req is not None:
                out.append((p, req))
        return out

    def claimed(self) -> tuple[Path, Request] | None:
        for p in self._entries(".claimed"):
            try:
                req = self._read(p)
            except records.CorruptRecord:
                req = Request(id=p.name.split("-", 1)[1].rsplit(".", 1)[0], kind="?")
            if req is not None:
                return p, req
        return None

    def queue(self) -> list[tuple[Path, Request]]:
        """The running request (if any) first, then the waiting ones in order."""
        running = self.claimed()
        return ([running] if running else []) + self.pending()

    def claim_next(self) -> tuple[Path, Request | None] | None:
        """Claim the oldest waiting request by renaming it; (path, None) when it cannot be read."""
        for p in self._entries(".request"):
            claimed = p.with_suffix(".claimed")
            try:
                os.rename(p, claimed)
            except FileNotFoundError:
                continue
            fsutil.fsync_dir(self.requests)
            try:
                return claimed, self._read(claimed)
            except records.CorruptRecord:
                return claimed, None
        return None

    def sweep(self) -> list[str]:
        """Move anything in requests/ that is not a request out of the way (to rejected/): the path unit
        starts the dispatcher for as long as the directory is not empty, so a stray file would restart it
        until systemd gives up on the queue."""
        moved: list[str] = []
        try:
            entries = list(self.requests.iterdir())
        except FileNotFoundError:
            return moved
        for p in entries:
            if not _ENTRY.fullmatch(p.name):
                self.rejected.mkdir(mode=0o700, exist_ok=True)
                os.rename(p, self.rejected / f"{time.time_ns():020d}-{p.name}")
                moved.append(p.name)
        if moved:
            fsutil.fsync_dir(self.requests)
        return moved

    def update(self, path: Path, req: Request) -> None:
        records.save(req, path, mode=0o600)

    def state(self, id: str) -> str | None:
        """"queued", "running" or "finished" for a known id, None otherwise."""
        if (self.results / f"{id}.json").exists():
            return "finished"
        if self._entries(f"-{id}.claimed"):
            return "running"
        if self._entries(f"-{id}.request"):
            return "queued"
        return None

    def drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsutil.fsync_dir(path.parent)

    # -- results --------------------------------------------------------------------------------------

    def finish(self, path: Path | None, result: Result) -> None:
        """Write result, then remove the request it answers (with it any secret it carried)."""
        self.results.mkdir(mode=0o755, parents=True, exist_ok=True)
        records.save(result, self.results / f"{result.id}.json", mode=0o644)
        if path is not None:
            self.drop(path)
        self.clear_gate(result.id)
        self._prune()

    def amend_result(self, id: str, **changes) -> Result | None:
        """Add to a result already written (an upgrade rolled back after its commit); None when there is none."""
        result = self.result(id)
        if result is None:
            return None
        for key, value in changes.items():
            setattr(result, key, value)
        records.save(result, self.results / f"{id}.json", mode=0o644)
        return result

    def result(self, id: str) -> Result | None:
        try:
            return records.load(Result, self.results / f"{id}.json")
        except records.CorruptRecord:
            return None

    def recent_results(self, n: int = 5) -> list[Result]:
        try:
            paths = sorted(self.results.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[:n]
        except OSError:
            return []
        out = []
        for p in paths:
            try:
                r = records.load(Result, p)
            except (records.CorruptRecord, OSError):
                continue
            if r is not None:
                out.append(r)
        return out

    def _prune(self) -> None:
        try:
            paths = sorted(self.results.glob("*.json"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for p in paths[:-KEEP_RESULTS]:
            p.unlink(missing_ok=True)

    # -- reset gates --------------------------------------------------------------------------------

    def open_gate(self, gate: Gate) -> None:
        gate.at = gate.at or records.now()
        records.save(gate, self.gates / f"{gate.id}.json", mode=0o644)

    def gate(self, id: str) -> Gate | None:
        try:
            return records.load(Gate, self.gates / f"{id}.json")
        except records.CorruptRecord:
            return None

    def ack(self, id: str) -> None:
        """The requester has reported what the gate says: the reset may remove the agent."""
        fsutil.atomic_write(self.gates / f"{id}.ack", b"", mode=0o644)

    def acked(self, id: str) -> bool:
        return (self.gates / f"{id}.ack").exists()

    def clear_gate(self, id: str) -> None:
        for suffix in (".json", ".ack"):
            (self.gates / f"{id}{suffix}").unlink(missing_ok=True)

    def open_gates(self) -> list[Gate]:
        out: list[Gate] = []
        try:
            paths = sorted(self.gates.glob("*.json"))
        except OSError:
            return out
        for p in paths:
            g = self.gate(p.stem)
            if g is not None and not self.acked(g.id):
                out.append(g)
        return out
