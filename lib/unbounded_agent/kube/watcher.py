"""The MachineOperation watcher: what `unbounded-agent daemon` runs (DESIGN.md §4).

It turns MachineOperations into requests and results into status, and nothing more: the host operations
themselves are run by the dispatcher (queue/dispatch.py), so this process never starts a unit, never
writes the bin dir, and runs in the tightest sandbox the daemon unit can give it.

Two threads: ``ListWatch`` (listwatch.py) feeds a queue; the main loop (``Watcher.run``) reconciles about
once a second — level-based, from its cache, its progress files (progress.py), and the queue's results —
and never waits on a host step. Its heartbeat is what the systemd watchdog thread checks (daemon.py).

One operation at a time per machine: the others stay ``Pending`` with a message naming the one in
progress. The cache only says which operation to look at next: every decision about it is made from a
fresh read (``begin``) — deleted, it never starts; invalid, it fails; otherwise the parameters of that read
are what runs, and its generation is what the status publishes — and the request is queued only after a
fresh read showed it still exists. Unsupported agent kinds fail at once; the Host* kinds and operations
that select machines (``machineSelector``, fanned out by a controller) are never touched.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from .. import log
from ..config import Config
from ..queue.spool import Request, Spool
from ..reasons import OpsError, Reason
from ..version import VERSION
from . import adoption, aftercommit, mop, reset_driver, upgrade_driver
from . import client as kubeclient
from .listwatch import WATCH_TIMEOUT, ListWatch, rv_newer
from .progress import ACCEPTED, DONE, SUBMITTED, SUBMITTING, OperationProgress, ProgressStore
from .status import ApiWriter

TICK = 1.0
MAX_UNEXPECTED_ERRORS = 60  # passes (about a minute) of unexpected errors before an operation is failed
DRIVERS = {mop.AGENT_UPGRADE: upgrade_driver, mop.AGENT_RESET: reset_driver}
HOST_KINDS = {mop.AGENT_UPGRADE: "upgrade", mop.AGENT_RESET: "reset"}  # the kind of the request each queues


class Watcher:
    def __init__(self, cfg: Config, client_factory=None, spool: Spool | None = None, notify=None, tick: float = TICK,
                 watch_timeout: tuple[int, int] = WATCH_TIMEOUT):
        self.cfg = cfg
        self.machine = cfg.machine_name
        self.spool = spool or Spool()
        self.notify = notify or (lambda **kw: None)
        self.tick = tick
        self.watch_timeout = watch_timeout
        self.client = kubeclient.Client(client_factory or (lambda: kubeclient.build(cfg.kubeconfig)), self._built)
        self.store = ProgressStore(cfg.state_dir)
        self.progress: dict[str, OperationProgress] = self.store.load_all()
        self.cache: dict[str, dict] = {}  # uid -> operation of this machine
        self.api = ApiWriter(self.kube, self.machine, lambda: self.cache, self.store)
        self.synced = False
        self.ready = False
        self.started = time.monotonic()
        self.heartbeat = time.monotonic()
        self.queue: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.listwatch: ListWatch | None = None
        self.errors: dict[str, int] = {}  # uid -> unexpected errors in a row
        self.signal_seen: int | None = None  # the rollback signal last looked at (kube/aftercommit.py)
        self._last_error: str | None = None

    @property
    def stats(self) -> dict:
        return self.api.stats

    # -- the client ----------------------------------------------------------------------------------

    def kube(self) -> kubeclient.Kube:
        """The client (either thread), built again when its credentials rotate; raises Unavailable until it
        can be built."""
        return self.client()

    def _built(self, kube: kubeclient.Kube, why: str) -> None:
        from ..urls import redact

        if why == "first use":
            log.info(f"talking to the API server at {redact(kube.server)} as machine {self.machine}")
        else:
            log.info(f"{why}: loaded the credentials again")

    # -- running -------------------------------------------------------------------------------------

    def start(self) -> None:
        open_ = [f"{p.kind} {p.name} ({p.step})" for p in self.progress.values() if not p.done]
        if open_:
            log.info(f"resuming from {self.store.dir}: {', '.join(open_)}")
        self.listwatch = ListWatch(self.kube, self.machine, self.queue, self.stop_event, self.watch_timeout)
        self.listwatch.start()

    def run(self, stop: threading.Event | None = None) -> None:
        """The main loop, until stop (or self.stop_event) is set."""
        stop = stop or self.stop_event
        self.start()
        try:
            while not stop.is_set() and not self.stop_event.is_set():
                self.heartbeat = time.monotonic()
                self._drain(self.tick)
                try:
                    self.reconcile()
                except Exception as e:  # e.g. the state dir unwritable: say so, keep the loop (and systemd) going
                    text = f"{type(e).__name__}: {e}"
                    if text != self._last_error:
                        import traceback

                        log.error(f"reconcile failed (retried every pass): {traceback.format_exc().rstrip()}")
                        self._last_error = text
                else:
                    self._last_error = None
        finally:
            self.stop_event.set()

    def stop(self) -> None:
        self.stop_event.set()

    def _drain(self, wait: float) -> None:
        try:
            item = self.queue.get(timeout=wait)
        except queue.Empty:
            return
        while True:
            self._take(item)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return

    def _take(self, item: tuple) -> None:
        if item[0] == "sync":
            self.cache = {mop.uid(o): o for o in item[1] if mop.machine(o) == self.machine}
            if not self.synced:
                log.info(f"listed {len(self.cache)} MachineOperation(s) for machine {self.machine}")
            self.synced = True
            self.api.api_worked()
            self._set_ready(f"watching MachineOperations for {self.machine}")
        elif item[0] == "event":
            _, kind, obj = item
            u = mop.uid(obj)
            if kind == "DELETED" or mop.machine(obj) != self.machine:
                if self.cache.pop(u, None) is not None and kind == "DELETED":
                    self.api.deleted.add(u)
            elif rv_newer(obj, self.cache.get(u)):
                self.cache[u] = obj

    def _set_ready(self, text: str) -> None:
        if not self.ready:
            self.ready = True
            self.notify(READY=1, STATUS=f"unbounded-agent {VERSION}: {text}")
            log.info(f"ready: {text}")

    # -- reconcile -----------------------------------------------------------------------------------

    def reconcile(self) -> None:
        if not self.ready and time.monotonic() - self.started >= ready_grace(self.cfg):
            # The host side does not need the API: an unreachable server must not fail an upgrade's probation.
            self._set_ready(f"the API server is unreachable; retrying (machine {self.machine})")
        for p in list(self.progress.values()):
            if not p.done:
                self._drive(p)
        aftercommit.report(self)
        if self.synced:
            self.admit_new()
        self.api.flush_status(self.progress.values())
        self.api.flush_events()
        self.ack_gates()
        if self.synced:
            self.api.expire_finished()
            self.collect_garbage()
            self.api.annotate_machine()

    def active(self) -> OperationProgress | None:
        return next((p for p in self.progress.values() if not p.done), None)

    def waiting(self) -> list[dict]:
        """Operations of this machine the agent handles that are neither claimed nor finished, oldest first."""
        return [op for op in sorted(self.cache.values(), key=mop.sort_key)
                if mop.uid(op) not in self.progress and not mop.is_terminal(op)
                and (mop.kind(op) in mop.HANDLED or mop.kind(op) in mop.UNSUPPORTED)]

    def admit_new(self) -> None:
        for op in self.waiting():
            k = mop.kind(op)
            if k in mop.UNSUPPORTED:
                self.claim(op, failed=(Reason.UNSUPPORTED_OPERATION,
                                       f"{k} is not implemented by this agent (unbounded-agent {VERSION}); it handles "
                                       f"{' and '.join(sorted(mop.HANDLED))}"))
                continue
            if mop.phase(op) == mop.IN_PROGRESS:
                if adoption.adopt(self, op):  # the host's queue still knows it: follow it from there
                    continue
                # InProgress on the server but never claimed here: this host's state was lost (or another agent
                # used this machine name). Running it now could run it twice: fail it, visibly.
                self.claim(op, failed=(Reason.EXECUTION_FAILED,
                                       f"the agent on {self.machine} has no record of starting this operation "
                                       f"(its state in {self.store.dir} was lost); not running it again"))
                continue
            try:
                mop.check_parameters(op, self.cfg.allow_insecure_http)
            except OpsError:
                # Invalid parameters fail at once, even behind another operation; but only as a fresh read has them.
                fresh = self.api.get_fresh(op)
                if fresh is None:
                    continue
                try:
                    mop.check_parameters(fresh, self.cfg.allow_insecure_http)
                except OpsError as e:
                    self.claim(fresh, failed=(e.reason, e.message))
                    continue
                op = fresh
            current = self.active()
            if current is not None:
                self.api.write_pending(op, f"waiting for {current.kind} {current.name} (in progress on "
                                           f"{self.machine}) to finish")
                continue
            self.claim(op)

    def claim(self, op: dict, failed: tuple | None = None) -> OperationProgress:
        u, name, k = mop.uid(op), mop.name(op), mop.kind(op)
        p = OperationProgress(uid=u, name=name, kind=k, claimed_at=mop.now(), operation=f"{name}@{u[:8]}",
                              generation=mop.generation(op))
        with tagged(p):
            return self._claim(p, failed)

    def _claim(self, p: OperationProgress, failed: tuple | None) -> OperationProgress:
        u, name, k = p.uid, p.name, p.kind
        self.api.pending_written.pop(u, None)
        self.progress[u] = p
        if failed:
            reason, message = failed
            self.store.save(p)  # claimed before anything is written
            log.error(f"{k} {name}: {reason.value}: {message}")
            self.finish(p, mop.FAILED, reason.value, message)
            return p
        log.info(f"{k} {name} accepted (uid {u})")
        self.set_want(p, mop.PENDING, mop.REASON_PENDING, f"accepted by the agent on {self.machine}")
        self.api.flush_one(p)
        self.event(p, "Accepted", f"accepted by unbounded-agent {VERSION} on {self.machine}")
        self._drive(p)
        return p

    def set_want(self, p: OperationProgress, phase: str, reason: str, message: str) -> None:
        started = p.started_at
        if phase != mop.PENDING and not started:
            started = p.started_at = mop.now()
        completed = mop.now() if phase in mop.TERMINAL else None
        p.want = mop.desired(phase, reason, message, started_at=started if phase != mop.PENDING else None,
                             completed_at=completed, machine_generation=self.api.machine_generation,
                             observed_generation=p.generation)
        p.written = False
        self.store.save(p)

    def finish(self, p: OperationProgress, phase: str, reason: str, message: str) -> None:
        p.step = DONE
        p.finished_at = mop.now()
        self.set_want(p, phase, reason, message)
        ok = phase == mop.COMPLETE
        (log.info if ok else log.error)(f"{p.kind} {p.name} {phase}: {reason}: {message}",
                                        result="succeeded" if ok else "failed", reason=reason)
        self.event(p, reason if reason != Reason.SUCCEEDED.value else "Completed", message, warning=not ok)
        self.api.flush_one(p)

    def begin(self, p: OperationProgress, message: Callable[[dict], str],
              request: Callable[[dict], Request]) -> bool:
        """What every kind does first: a fresh read (``_read``), InProgress with message(params), and the
        request(params) queued — after one more fresh read if a restart came between. True once, when the
        request has just been queued (step SUBMITTED); False while it cannot be yet, or never will."""
        read_now = p.step == ACCEPTED
        if p.step == ACCEPTED:
            if not self._read(p):
                return False
            self.start_operation(p, message(p.params), SUBMITTING)
        if p.step != SUBMITTING:
            return False
        if self.spool.state(p.require_request_id()) is None:
            if p.gone or not (read_now or self._read(p)):  # the InProgress write may have found it gone
                self._never_started(p)
                return False
            self.spool.submit(request(p.params))
        p.step = SUBMITTED
        self.store.save(p)
        return True

    def _read(self, p: OperationProgress) -> bool:
        """The operation as the server has it now: its generation and checked parameters (OpsError when they
        are invalid: the operation fails). False when it cannot be read now, or is gone."""
        op = self.fresh(p)
        if op is None:
            self._never_started(p)
            return False
        p.generation = mop.generation(op)
        p.params = mop.check_parameters(op, self.cfg.allow_insecure_http)
        self.store.save(p)
        if p.want and p.want.get("phase") == mop.IN_PROGRESS and p.want.get("observedGeneration") != p.generation:
            self.set_want(p, mop.IN_PROGRESS, mop.REASON_IN_PROGRESS, p.want["message"])
        return True

    def _never_started(self, p: OperationProgress) -> None:
        if p.gone and p.step != DONE:  # deleted before it started: it never starts
            log.info(f"{p.kind} {p.name} was deleted before it started: not running it")
            p.step = DONE
            self.store.save(p)

    def start_operation(self, p: OperationProgress, message: str, next_step: str) -> None:
        """InProgress (one write attempt now, so it shows before the host acts; never waited on), and the
        request id chosen and persisted before anything is submitted under it."""
        from ..queue.spool import new_id

        p.step = next_step
        p.request_id = p.request_id or new_id("mop")
        log.bind(request=p.request_id)  # inside the operation's log.context: for its lines only
        self.set_want(p, mop.IN_PROGRESS, mop.REASON_IN_PROGRESS, message)
        self.api.flush_one(p)

    def result(self, p: OperationProgress):
        """The result of p's request, None while it is queued or running; a request that left the host's
        queue without one (its directory was wiped) fails the operation rather than leave it InProgress."""
        request_id = p.require_request_id()
        result = self.spool.result(request_id)
        if result is None and self.spool.state(request_id) is None:
            raise OpsError(Reason.EXECUTION_FAILED, f"request {request_id} left this host's queue without a result "
                                                    f"(see journalctl -u unbounded-agent-dispatch)")
        return result

    def fresh(self, p: OperationProgress) -> dict | None:
        """The operation as the server has it now (never the cache): None when it cannot be read now, or
        when it is gone (then p.gone is set)."""
        return self.api.get_op(p)

    def event(self, p: OperationProgress, reason: str, message: str, warning: bool = False) -> None:
        self.api.event(p, reason, message, warning)

    def _drive(self, p: OperationProgress) -> None:
        """The operation's driver, with its errors mapped: an OpsError is the operation's failure; anything
        else (a bug, the state dir unwritable) is retried on the next passes, and fails the operation only
        if it persists."""
        with tagged(p):
            self._drive_tagged(p)

    def _drive_tagged(self, p: OperationProgress) -> None:
        try:
            DRIVERS[p.kind].drive(self, p)
            self.errors.pop(p.uid, None)
        except OpsError as e:
            self.finish(p, mop.FAILED, e.reason.value, e.message)
        except Exception as e:
            n = self.errors[p.uid] = self.errors.get(p.uid, 0) + 1
            if n == 1:
                import traceback

                log.error(f"{p.kind} {p.name}: {traceback.format_exc().rstrip()}")
            if n >= MAX_UNEXPECTED_ERRORS:
                self.finish(p, mop.FAILED, Reason.EXECUTION_FAILED.value,
                            f"the agent failed {n} times in a row while running it: {type(e).__name__}: {e}")

    def all_reported_except(self, skip: OperationProgress | None = None) -> bool:
        """Whether every finished operation's status (but skip's) and every Event is on the server (or gone)."""
        return not self.api.events and all(p.written or p.gone for p in self.progress.values()
                                           if p is not skip and p.done and p.want)

    def ack_gates(self) -> None:
        """A reset someone else asked for waits before removing the agent: let it go once everything this
        agent has to say (the operations that reset superseded, above all) is on the server."""
        mine = {p.request_id for p in self.progress.values() if p.request_id}
        # A result that came in after this pass drove its operation (one the reset superseded) is not reported yet.
        unread = any(not p.done and p.request_id and self.spool.result(p.request_id) for p in self.progress.values())
        for gate in self.spool.open_gates():  # what there is to report is known only from the first list on
            if self.synced and gate.id not in mine and not unread and self.all_reported_except():
                log.info(f"reset {gate.id} removes the agent next: everything is reported")
                self.spool.ack(gate.id)

    def collect_garbage(self) -> None:
        """Forget progress of finished operations that are gone from the server (their uid never returns)."""
        for u, p in list(self.progress.items()):
            if p.done and (p.written or p.gone) and u not in self.cache:
                self.store.remove(u)
                del self.progress[u]
        for u in list(self.api.pending_written):
            if u not in self.cache:
                del self.api.pending_written[u]
        for u in list(self.api.refused):
            if u not in self.cache:
                del self.api.refused[u]
        self.api.recorder.forget(set(self.cache) | set(self.progress))


def tagged(p: OperationProgress):
    """The journal's fields of operation p (log.context) for what the watcher logs about it."""
    return log.context(operation=p.operation, uid=p.uid, kind=HOST_KINDS.get(p.kind, p.kind), request=p.request_id)


def ready_grace(cfg: Config) -> float:
    """How long after start the daemon reports ready without having listed: readyWithoutApiSeconds, and never
    more than half of readyTimeoutSeconds, so upgrade probation always sees it ready in time."""
    return min(cfg.ready_without_api_seconds, cfg.ready_timeout_seconds / 2)
