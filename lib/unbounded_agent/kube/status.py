"""Everything the watcher writes to the API server: operation status, Events, TTL deletions and the
Machine's agent-version annotation.

Status is written with PUT on the status subresource and the object's resourceVersion; on 409 Conflict
the object is read again and the write retried. Backoff is per operation: a write the server refuses (a 4xx
such as 403 from an admission policy, or 422) is recorded as a Warning Event on that operation and retried
later for that operation only, so it never delays the others. Only an unreachable server (no answer, 5xx)
holds up every write, with one backoff for all. Nothing here holds up anything on the host. Events wait in
a journal on disk (events.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .. import log
from ..version import VERSION
from . import client as kubeclient
from . import mop
from .client import ApiError, KubeError, Unavailable
from .events import Recorder
from .listwatch import BACKOFF_MAX, Backoff, rv_newer
from .progress import DONE, SUBMITTED, OperationProgress, ProgressStore

MACHINE_RETRY = 600.0


class ApiWriter:
    def __init__(self, kube: Callable[[], kubeclient.Kube], machine: str, cache: Callable[[], dict],
                 store: ProgressStore):
        self.kube = kube
        self.machine = machine
        self.cache = cache  # uid -> the latest copy of each operation of this machine (the watcher's)
        self.store = store
        self.recorder = Recorder(kube, machine, store.dir / "events", on_disk=lambda: not store.gone())
        self.api_retry_at = 0.0  # every write waits until then after the server was unavailable
        self._api_backoff = Backoff(1.0, BACKOFF_MAX)
        self._api_down_logged = False
        self.refused: dict[str, tuple[Backoff, float]] = {}  # uid -> its backoff, and when to write it again
        self.pending_written: dict[str, str] = {}  # uid -> the Pending message written for a waiting op
        self.deleted: set[str] = set()
        self.machine_next = 0.0
        self.machine_generation: int | None = None
        self.machine_annotated = False
        self.stats = {"status_writes": 0, "conflicts": 0, "refused": 0, "deletes": 0}

    @property
    def events(self) -> list:
        """Events not yet on the server."""
        return self.recorder.pending

    def api_ok(self) -> bool:
        return time.monotonic() >= self.api_retry_at

    def api_failed(self, e: Exception) -> None:
        self.api_retry_at = time.monotonic() + self._api_backoff.next()
        if not self._api_down_logged:
            log.warn(f"the API server is unavailable ({e}); status and events wait and are retried")
            self._api_down_logged = True

    def api_worked(self) -> None:
        if self._api_down_logged:
            log.info("the API server is reachable again")
        self._api_down_logged = False
        self._api_backoff.reset()
        self.api_retry_at = 0.0

    def op_ok(self, uid: str) -> bool:
        """Whether a status write for this operation may be tried now."""
        return self.api_ok() and time.monotonic() >= self.refused.get(uid, (None, 0.0))[1]

    def op_refused(self, op: dict, e: ApiError) -> None:
        """The server refused this operation's status write: say so on it (an Event, aggregated when it repeats)
        and try it again later; the other operations are not held up."""
        backoff = self.refused.get(mop.uid(op), (Backoff(1.0, BACKOFF_MAX), 0.0))[0]
        self.refused[mop.uid(op)] = (backoff, time.monotonic() + backoff.next())
        self.stats["refused"] += 1
        if backoff.n == 1:
            log.error(f"writing the status of {mop.name(op)} was refused: {e}; retried with backoff")
        self.recorder.add(op, "StatusRefused", f"the agent on {self.machine} could not write this status: {e}",
                          warning=True)

    def write_pending(self, op: dict, message: str) -> None:
        u = mop.uid(op)
        if self.pending_written.get(u) == message or not self.op_ok(u):
            return
        want = mop.desired(mop.PENDING, mop.REASON_PENDING, message, observed_generation=mop.generation(op))
        if mop.status_matches(op, want):
            self.pending_written[u] = message
            return
        if self.put_status(op, want) is not None:
            self.pending_written[u] = message

    def flush_status(self, progress) -> None:
        for p in list(progress):
            if p.want and not p.written and not p.gone:
                if not self.api_ok():
                    return
                self.flush_one(p)

    def flush_one(self, p: OperationProgress) -> bool:
        if p.written or p.gone or not p.want or not self.op_ok(p.uid):
            return p.written
        op = self.cache().get(p.uid)
        if op is None:
            op = self.get_op(p)
            if op is None:
                return False
        result = self.put_status(op, p.want, p)
        if result is not None:
            p.written = True
            self.store.save(p)
        return p.written

    def get_op(self, p: OperationProgress) -> dict | None:
        try:
            op = self.kube().get(f"{kubeclient.MOP_PATH}/{p.name}")
        except ApiError as e:
            if e.code == 404:
                self.gone(p)
            else:
                self.api_failed(e)
            return None
        except Unavailable as e:
            self.api_failed(e)
            return None
        if mop.uid(op) != p.uid:
            self.gone(p)
            return None
        return op

    def gone(self, p: OperationProgress) -> None:
        if not p.gone:
            log.info(f"{p.kind} {p.name} was deleted" + ("; the host finishes what it started, nothing more is "
                                                         "reported" if p.step in (SUBMITTED, DONE) else ""))
            p.gone = True
            self.store.save(p)
            self.recorder.drop(p.uid)

    def put_status(self, op: dict, want: dict, p: OperationProgress | None = None) -> dict | None:
        """Write want over op's status (PUT .../status with op's resourceVersion); on 409 Conflict read it
        again and retry. Returns the operation as written, None when not written (retried later)."""
        for _ in range(5):  # 409s in a row: give up for this pass
            if mop.status_matches(op, want):
                return op
            body = dict(op, status=mop.apply_status(op, want))
            try:
                new = self.kube().request("PUT", f"{kubeclient.MOP_PATH}/{mop.name(op)}/status", body=body,
                                          content_type="application/json")
            except ApiError as e:
                if e.code == 409:
                    self.stats["conflicts"] += 1
                    fresh = self.get_op(p) if p else self.get_fresh(op)
                    if fresh is None:
                        return None
                    op = fresh
                    continue
                if e.code == 404:
                    if p:
                        self.gone(p)
                    return None
                self.op_refused(op, e)
                return None
            except Unavailable as e:
                self.api_failed(e)
                return None
            self.api_worked()
            self.refused.pop(mop.uid(op), None)
            self.stats["status_writes"] += 1
            if mop.machine(new) == self.machine and rv_newer(new, self.cache().get(mop.uid(new))):
                self.cache()[mop.uid(new)] = new
            return new
        return None

    def get_fresh(self, op: dict) -> dict | None:
        try:
            fresh = self.kube().get(f"{kubeclient.MOP_PATH}/{mop.name(op)}")
        except KubeError as e:
            if not (isinstance(e, ApiError) and e.code == 404):
                self.api_failed(e)
            return None
        return fresh if mop.uid(fresh) == mop.uid(op) else None

    def event(self, p: OperationProgress, reason: str, message: str, warning: bool = False) -> None:
        if p.gone:
            return
        op = self.cache().get(p.uid) or {"metadata": {"name": p.name, "uid": p.uid}}
        self.recorder.add(op, reason, message, warning)

    def flush_events(self) -> None:
        self.recorder.flush(self.api_ok, self.api_failed)

    def expire_finished(self) -> None:
        """Delete finished agent operations whose ttlSecondsAfterFinished has passed."""
        now = time.time()
        for op in list(self.cache().values()):
            if mop.kind(op) not in mop.HANDLED | mop.UNSUPPORTED or mop.uid(op) in self.deleted:
                continue
            deadline = mop.ttl_deadline(op)
            if deadline is None or deadline > now or not self.api_ok():
                continue
            try:
                self.kube().request("DELETE", f"{kubeclient.MOP_PATH}/{mop.name(op)}",
                                    body={"apiVersion": "v1", "kind": "DeleteOptions",
                                          "preconditions": {"uid": mop.uid(op)}},
                                    content_type="application/json")
                log.info(f"deleted {mop.kind(op)} {mop.name(op)}: ttlSecondsAfterFinished passed")
                self.stats["deletes"] += 1
            except ApiError as e:
                if e.code not in (404, 409):  # refused (e.g. forbidden): not tried again
                    log.warn(f"deleting {mop.name(op)} after its TTL failed: {e}")
            except Unavailable as e:
                self.api_failed(e)
                return
            self.deleted.add(mop.uid(op))

    def annotate_machine(self) -> None:
        """unbounded-cloud.io/agent-version on the Machine of this name, if there is one (once per start)."""
        if self.machine_annotated or time.monotonic() < self.machine_next or not self.api_ok():
            return
        body = {"metadata": {"annotations": {mop.AGENT_VERSION_ANNOTATION: VERSION}}}
        try:
            m = self.kube().request("PATCH", f"{kubeclient.MACHINE_PATH}/{self.machine}", body=body,
                                    content_type="application/merge-patch+json")
        except ApiError as e:
            self.machine_next = time.monotonic() + MACHINE_RETRY
            if e.code == 404:
                log.info(f"no Machine {self.machine} (or no Machine type) on the server: not annotating one")
            else:
                log.warn(f"annotating Machine {self.machine} failed: {e}")
            return
        except Unavailable as e:
            self.api_failed(e)
            return
        self.machine_annotated = True
        self.machine_generation = (m.get("metadata") or {}).get("generation")
        log.info(f"annotated Machine {self.machine}: {mop.AGENT_VERSION_ANNOTATION}={VERSION}")
