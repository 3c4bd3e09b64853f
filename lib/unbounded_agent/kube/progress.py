"""The watcher's own memory of each MachineOperation it claimed: one file per operation, by uid.

An operation is *claimed* by writing ``<state dir>/machineoperations/<uid>.json`` before anything is done for
it, and every step is recorded there before it is taken (write-ahead), so a restart, a ``kill -9`` or an
upgrade's daemon restart resumes where it was and never submits a host operation twice. The status to
publish is kept there too, until the server has it. Files are mode 0600: the parameters may hold a
download URL with a signed query.

An AgentReset removes the agent's files, this state directory included, before the daemon reports the
reset ``Complete`` (its daemon stops only after that): once the directory that was there is gone, progress
lives on in memory only, and is never written back (that would put a removed directory back).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import log, records
from ..reasons import OpsError, Reason

PROGRESS_DIR = "machineoperations"

# steps
ACCEPTED = "accepted"
SUBMITTING = "submitting"  # the request id is chosen; the request may or may not be queued yet
SUBMITTED = "submitted"  # the request is queued (or running, or finished): its result decides
DONE = "done"


@dataclasses.dataclass
class OperationProgress:
    uid: str
    name: str
    kind: str
    step: str = ACCEPTED
    operation: str = ""  # the name the host knows it by: <name>@<uid prefix>
    params: dict = dataclasses.field(default_factory=dict)
    generation: int | None = None  # metadata.generation of the version params were read from (published)
    request_id: str | None = None
    claimed_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    want: dict | None = None  # the status to publish (kube.mop.desired), kept until the server has it
    written: bool = False
    gone: bool = False  # deleted from the server: the host finishes what it started, nothing is reported
    upgrade_phase: str | None = None  # the last upgrade phase an Event announced
    acked: bool = False  # reset: the gate before the agent's removal was opened for us and acknowledged
    rolled_back_at: str | None = None  # upgrade: the rollback after its commit that was reported (kube/aftercommit.py)
    updated_at: str = ""
    format: int = 1

    @property
    def done(self) -> bool:
        return self.step == DONE

    def require_request_id(self) -> str:
        """The request id, which every step from submitting on has (it is persisted before the step)."""
        if not self.request_id:
            raise OpsError(Reason.EXECUTION_FAILED, f"corrupt progress record for {self.kind} {self.name}: "
                                                    f"step {self.step} without a request id")
        return self.request_id


class ProgressStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir) / PROGRESS_DIR
        self._seen = self.dir.parent.is_dir()  # the state directory existed (systemd makes it for the daemon)
        self.in_memory = False  # the state directory went (a reset removed it): nothing is written any more

    def path(self, uid: str) -> Path:
        return self.dir / f"{uid}.json"

    def load_all(self) -> dict[str, OperationProgress]:
        out: dict[str, OperationProgress] = {}
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.glob("*.json")):
            try:
                doc = records.load(OperationProgress, p)
            except records.CorruptRecord as e:
                log.warn(f"ignoring {e}")
                continue
            if doc is not None and doc.uid == p.stem:
                out[doc.uid] = doc
        return out

    def save(self, p: OperationProgress) -> None:
        p.updated_at = records.now()
        if self.gone():
            return
        try:
            if self._seen:  # the state directory was there: never make it again (a reset removed it)
                self.dir.mkdir(mode=0o700, exist_ok=True)
            records.save(p, self.path(p.uid), mode=0o600, parents=not self._seen)
        except FileNotFoundError:
            if not self._seen:
                raise
            self._lose()
            return
        self._seen = True

    def remove(self, uid: str) -> None:
        if not self.gone():
            self.path(uid).unlink(missing_ok=True)

    def gone(self) -> bool:
        """Whether the agent's state directory went (a reset removed it): from then on nothing is written."""
        if not self.in_memory and self._seen and not self.dir.parent.is_dir():
            self._lose()
        return self.in_memory

    def _lose(self) -> None:
        log.info(f"{self.dir.parent} is gone (a reset removed the agent's files): the progress of operations is "
                 "kept in memory from now on")
        self.in_memory = True
