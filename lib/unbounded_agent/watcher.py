"""The MachineOperation watcher: what `unbounded-agent daemon` runs (DESIGN.md §4, issue 5).

Two threads:
- ``ListWatch`` lists the machine's operations (``fieldSelector=spec.machineRef=<machine>``; where the
  server has no such selectable field it lists all and filters here, and says so once), then watches from
  the list's resourceVersion, resuming from the last one it saw (events and bookmarks) and relisting on
  ``410 Gone``. Errors back off exponentially (with jitter, capped); a watch that ends at once counts as
  an error, so nothing ever busy-loops. It only feeds a queue.
- the main loop (``Watcher.run``) takes what the queue brings and reconciles about once a second:
  level-based, from its cache, the progress files and the host's own state files. It never waits on a
  long host step: the upgrade chain and the reset steps run in their own units, and each pass only asks
  how far they are. Its heartbeat is what the systemd watchdog thread checks (daemon.py).

Exactly once: an operation is *claimed* by writing ``<state dir>/machineoperations/<uid>.json`` before
anything is done for it, and every step is recorded there before it is taken (write-ahead), so a restart,
a ``kill -9`` or an upgrade's daemon restart resumes where it was and never starts a host action twice.
The status to publish is kept there too, until the server has it: a failed or delayed write is retried
(with backoff) until it succeeds, and never holds up anything on the host — except the one place where
the order is the contract: AgentReset's final steps, which stop this daemon, start only once ``Complete``
is on the server (or the operation is gone).

One operation at a time: the others stay ``Pending`` with a message naming the one in progress. Invalid
parameters and unsupported agent kinds fail at once; the Host* kinds are never touched.
"""

from __future__ import annotations

import itertools
import os
import queue
import random
import secrets
import threading
import time
from pathlib import Path

from . import kubeclient, log, mop, state
from .config import Config
from .kubeclient import ApiError, KubeError, Unavailable
from .reasons import OpsError, Reason
from .urls import redact
from .version import VERSION

PROGRESS_DIR = "machineoperations"
TICK = 1.0
WATCH_TIMEOUT = (240, 300)  # seconds, chosen at random per watch, as client-go does
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
RETRY_UPGRADE_BUSY = 5.0
MACHINE_RETRY = 600.0
MAX_PENDING_EVENTS = 200
RESET_PHASE1_ATTEMPTS = 3
MAX_UNEXPECTED_ERRORS = 60  # passes (about a minute) of unexpected errors before an operation is failed

# progress steps
ACCEPTED = "accepted"
UPGRADE_STARTING, UPGRADE_STARTED = "upgrade-starting", "upgrade-started"
RESET_REQUESTING, RESET_PHASE1, RESET_REPORTING, RESET_PHASE2 = (
    "reset-requesting", "reset-phase1", "reset-reporting", "reset-phase2")
DONE = "done"


class Backoff:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped at 30 s; reset on success."""

    def __init__(self, low: float = BACKOFF_MIN, high: float = BACKOFF_MAX):
        self.low, self.high, self.n = low, high, 0

    def next(self) -> float:
        delay = min(self.high, self.low * (2 ** self.n))
        self.n = min(self.n + 1, 16)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.n = 0


def _rv_newer(new: dict, old: dict | None) -> bool:
    """Whether new is at least as recent as old (resourceVersions are opaque, but integers in practice)."""
    if old is None:
        return True
    a, b = new.get("metadata", {}).get("resourceVersion", ""), old.get("metadata", {}).get("resourceVersion", "")
    if a.isdigit() and b.isdigit():
        return int(a) >= int(b)
    return True


# -- progress files ------------------------------------------------------------------------------------


class ProgressStore:
    """One JSON file per claimed operation, by uid; atomic writes (state.write_json), mode 0600 (it may
    hold a download URL with a pre-signed query)."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / PROGRESS_DIR

    def path(self, uid: str) -> Path:
        return self.dir / f"{uid}.json"

    def load_all(self) -> dict[str, dict]:
        out = {}
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.glob("*.json")):
            try:
                doc = state.read_json(p)
            except ValueError as e:
                log.warn(f"ignoring {e}")
                continue
            if doc and doc.get("uid") == p.stem:
                out[doc["uid"]] = doc
        return out

    def save(self, doc: dict) -> None:
        doc["updated_at"] = mop.now()
        state.write_json(self.path(doc["uid"]), doc, mode=0o600)

    def remove(self, uid: str) -> None:
        self.path(uid).unlink(missing_ok=True)


# -- list and watch ----------------------------------------------------------------------------------------


class ListWatch(threading.Thread):
    """Feeds ``("sync", [ops])`` after each list and ``("event", type, op)`` for each change into out."""

    def __init__(self, client, machine: str, out: queue.Queue, stop: threading.Event,
                 watch_timeout: tuple[int, int] = WATCH_TIMEOUT):
        super().__init__(name="list-watch", daemon=True)
        self.client = client  # a callable returning a kubeclient.Kube (raises Unavailable)
        self.machine = machine
        self.out = out
        self.stop = stop
        self.watch_timeout = watch_timeout
        self.client_side = False  # the server cannot select on spec.machineRef: filter here
        self.rv: str | None = None
        self.lists = self.watches = self.relists_410 = 0
        self._logged: str | None = None

    def _selector(self) -> dict:
        return {} if self.client_side else {"fieldSelector": f"spec.machineRef={self.machine}"}

    def _say_once(self, text: str, warn: bool = True) -> None:
        if text != self._logged:
            (log.warn if warn else log.info)(text)
            self._logged = text

    def _list(self, kube) -> None:
        try:
            doc = kube.get(kubeclient.MOP_PATH, self._selector())
        except ApiError as e:
            if e.code == 400 and not self.client_side:
                self.client_side = True
                log.warn(f"the API server cannot select MachineOperations by spec.machineRef ({e.message}); "
                         f"listing all of them and filtering for {self.machine} here")
                doc = kube.get(kubeclient.MOP_PATH, self._selector())
            else:
                raise
        self.lists += 1
        items = [o for o in doc.get("items") or [] if mop.machine(o) == self.machine]
        self.rv = (doc.get("metadata") or {}).get("resourceVersion") or None
        self.out.put(("sync", items))

    def run(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                kube = self.client()
                if self.rv is None:
                    self._list(kube)
                    backoff.reset()
                started, n = time.monotonic(), 0
                self.watches += 1
                query = dict(self._selector(), resourceVersion=self.rv, allowWatchBookmarks="true")
                for ev in kube.watch(kubeclient.MOP_PATH, query, random.randint(*self.watch_timeout)):
                    if self.stop.is_set():
                        return
                    kind, obj = ev.get("type"), ev.get("object") or {}
                    if kind == "ERROR":
                        code = obj.get("code")
                        if code == 410:
                            raise ApiError(410, obj.get("reason") or "Expired", obj.get("message") or "")
                        raise Unavailable(f"watch error {code} {obj.get('reason')}: {obj.get('message')}")
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        self.rv = rv
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        n += 1
                        # With client-side filtering every operation comes by: pass it on, the main loop
                        # drops those of other machines (and one moved away from this machine).
                        self.out.put(("event", kind, obj))
                    backoff.reset()
                self._logged = None
                if n == 0 and time.monotonic() - started < 1.0:
                    self.stop.wait(backoff.next())  # a watch that ends at once must not spin
            except ApiError as e:
                if e.code == 410:
                    self.relists_410 += 1
                    log.info(f"resourceVersion {self.rv} is too old (410 Gone): listing again")
                    self.rv = None
                    self.stop.wait(random.uniform(0.05, 0.3))
                    continue
                self._say_once(f"listing/watching MachineOperations failed: {e}")
                self.out.put(("unavailable", str(e)))
                self.stop.wait(backoff.next())
            except Unavailable as e:
                self._say_once(f"the API server is unavailable: {e}; retrying")
                self.out.put(("unavailable", str(e)))
                self.stop.wait(backoff.next())
            except Exception as e:  # a bug, or a client library surprise: never let this thread die
                import traceback

                self._say_once(f"listing/watching MachineOperations failed unexpectedly: "
                               f"{traceback.format_exc().rstrip()}")
                self.rv = None
                self.stop.wait(backoff.next())


# -- the main loop ------------------------------------------------------------------------------------------


class Watcher:
    def __init__(self, cfg: Config, client_factory=None, ops=None, notify=None, tick: float = TICK,
                 watch_timeout: tuple[int, int] = WATCH_TIMEOUT):
        from . import operations

        self.cfg = cfg
        self.machine = cfg.machine_name
        self.ops = ops or operations
        self.notify = notify or (lambda **kw: None)
        self.tick = tick
        self.watch_timeout = watch_timeout
        self._factory = client_factory or (lambda: kubeclient.build(cfg.kubeconfig))
        self._kube: kubeclient.Kube | None = None
        self._kube_lock = threading.Lock()
        self.store = ProgressStore(cfg.state_dir)
        self.progress = self.store.load_all()
        self.cache: dict[str, dict] = {}  # uid -> operation of this machine
        self.synced = False
        self.ready = False
        self.started = time.monotonic()
        self.heartbeat = time.monotonic()
        self.queue: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.listwatch: ListWatch | None = None
        self.events: list[dict] = []
        self.api_retry_at = 0.0  # writes wait until then after the server was unavailable
        self._api_backoff = Backoff(1.0, BACKOFF_MAX)
        self._api_down_logged = False
        self.machine_next = 0.0
        self.machine_generation: int | None = None
        self.machine_annotated = False
        self.phase1_started_here: set[str] = set()
        self.phase2_started_here = False
        self.retry_at: dict[str, float] = {}  # uid -> when to retry a host action that was refused for now
        self.pending_written: dict[str, str] = {}  # uid -> the Pending message written for a waiting op
        self.deleted: set[str] = set()
        self.errors: dict[str, int] = {}  # uid -> unexpected errors in a row
        self._last_error: str | None = None
        self.stats = {"status_writes": 0, "conflicts": 0, "events": 0, "deletes": 0}
        self._event_seq = itertools.count(1)

    # -- the client ----------------------------------------------------------------------------------

    def kube(self) -> kubeclient.Kube:
        """The client, built on first use (by either thread); raises Unavailable until it can be built."""
        with self._kube_lock:
            if self._kube is None:
                self._kube = self._factory()
                log.info(f"talking to the API server at {redact(self._kube.server)} as machine {self.machine}")
            return self._kube

    def _api_ok(self) -> bool:
        return time.monotonic() >= self.api_retry_at

    def _api_failed(self, e: Exception) -> None:
        self.api_retry_at = time.monotonic() + self._api_backoff.next()
        if not self._api_down_logged:
            log.warn(f"the API server is unavailable ({e}); status and events wait and are retried")
            self._api_down_logged = True

    def _api_worked(self) -> None:
        if self._api_down_logged:
            log.info("the API server is reachable again")
        self._api_down_logged = False
        self._api_backoff.reset()
        self.api_retry_at = 0.0

    # -- running -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.progress:
            open_ = [f"{p['kind']} {p['name']} ({p['step']})" for p in self.progress.values() if p["step"] != DONE]
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
            self._api_worked()
            self._set_ready(f"watching MachineOperations for {self.machine}")
        elif item[0] == "event":
            _, kind, obj = item
            u = mop.uid(obj)
            if kind == "DELETED" or mop.machine(obj) != self.machine:
                if self.cache.pop(u, None) is not None and kind == "DELETED":
                    self.deleted.add(u)
            elif _rv_newer(obj, self.cache.get(u)):
                self.cache[u] = obj
        elif item[0] == "unavailable":
            pass

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
            if p["step"] != DONE:
                self._drive(p)
        if self.synced:
            self.admit_new()
        self.flush_status()
        self.flush_events()
        if self.synced:
            self.expire_finished()
            self.collect_garbage()
        self.annotate_machine()

    def active(self) -> dict | None:
        return next((p for p in self.progress.values() if p["step"] != DONE), None)

    def admit_new(self) -> None:
        for op in sorted(self.cache.values(), key=mop.sort_key):
            u, k = mop.uid(op), mop.kind(op)
            if u in self.progress or mop.is_terminal(op):
                continue
            if k not in mop.HANDLED and k not in mop.UNSUPPORTED:
                continue  # Host* kinds (and kinds this agent does not know): another controller's
            if k in mop.UNSUPPORTED:
                self.claim(op, failed=(Reason.UNSUPPORTED_OPERATION,
                                       f"{k} is not implemented by this agent (unbounded-agent {VERSION}); it handles "
                                       f"{' and '.join(sorted(mop.HANDLED))}"))
                continue
            if mop.phase(op) == mop.IN_PROGRESS:
                # InProgress on the server but never claimed here: this host's state was lost (or another
                # agent used this machine name). Running it now could run it twice: fail it, visibly.
                self.claim(op, failed=(Reason.EXECUTION_FAILED,
                                       f"the agent on {self.machine} has no record of starting this operation "
                                       f"(its state in {self.store.dir} was lost); not running it again"))
                continue
            try:
                params = mop.check_parameters(op, self.cfg.allow_insecure_http)
            except OpsError as e:
                self.claim(op, failed=(e.reason, e.message))
                continue
            current = self.active()
            if current is not None:
                text = f"waiting for {current['kind']} {current['name']} (in progress on {self.machine}) to finish"
                self.write_pending(op, text)
                continue
            self.claim(op, params=params)

    def claim(self, op: dict, params: dict | None = None, failed: tuple | None = None) -> dict:
        u, name, k = mop.uid(op), mop.name(op), mop.kind(op)
        p = {"uid": u, "name": name, "kind": k, "step": ACCEPTED, "claimed_at": mop.now(),
             "operation": f"{name}@{u[:8]}", "params": params or {}, "written": False, "gone": False,
             "attempts": 0, "want": None}
        self.pending_written.pop(u, None)
        self.progress[u] = p
        if failed:
            reason, message = failed
            self.store.save(p)  # claimed before anything is written
            log.error(f"{k} {name}: {reason.value}: {message}")
            self.finish(p, mop.FAILED, reason.value, message)
            return p
        log.info(f"{k} {name} accepted (uid {u})")
        self.set_want(p, mop.PENDING, mop.REASON_PENDING, f"accepted by the agent on {self.machine}")
        self.flush_one(p)
        self.event(p, "Accepted", f"accepted by unbounded-agent {VERSION} on {self.machine}")
        self._drive(p)
        return p

    def set_want(self, p: dict, phase: str, reason: str, message: str) -> None:
        started = p.get("started_at")
        if phase != mop.PENDING and not started:
            started = p["started_at"] = mop.now()
        completed = mop.now() if phase in mop.TERMINAL else None
        p["want"] = mop.desired(phase, reason, message, started_at=started if phase != mop.PENDING else None,
                                completed_at=completed, machine_generation=self.machine_generation)
        p["written"] = False
        self.store.save(p)

    def finish(self, p: dict, phase: str, reason: str, message: str) -> None:
        p["step"] = DONE
        p["finished_at"] = mop.now()
        self.set_want(p, phase, reason, message)
        ok = phase == mop.COMPLETE
        (log.info if ok else log.error)(f"{p['kind']} {p['name']} {phase}: {reason}: {message}")
        self.event(p, reason if reason != Reason.SUCCEEDED.value else "Completed", message, warning=not ok)
        self.flush_one(p)

    # -- the two operations ---------------------------------------------------------------------------

    def _drive(self, p: dict) -> None:
        """drive(p), with its errors mapped: an OpsError is the operation's failure; anything else (D-Bus
        unreachable, a bug) is retried on the next passes, and fails the operation only if it persists."""
        try:
            self.drive(p)
            self.errors.pop(p["uid"], None)
        except OpsError as e:
            self.finish(p, mop.FAILED, e.reason.value, e.message)
        except Exception as e:
            n = self.errors[p["uid"]] = self.errors.get(p["uid"], 0) + 1
            if n == 1:
                import traceback

                log.error(f"{p['kind']} {p['name']}: {traceback.format_exc().rstrip()}")
            if n >= MAX_UNEXPECTED_ERRORS:
                self.finish(p, mop.FAILED, Reason.EXECUTION_FAILED.value,
                            f"the agent failed {n} times in a row while running it: {type(e).__name__}: {e}")

    def drive(self, p: dict) -> None:
        if p["kind"] == mop.AGENT_UPGRADE:
            self.drive_upgrade(p)
        elif p["kind"] == mop.AGENT_RESET:
            self.drive_reset(p)

    def _start(self, p: dict, message: str, next_step: str) -> None:
        p["step"] = next_step
        self.set_want(p, mop.IN_PROGRESS, mop.REASON_IN_PROGRESS, message)
        self.flush_one(p)  # one attempt now, so InProgress shows before the host acts; never waited on

    def drive_upgrade(self, p: dict) -> None:
        params = p["params"]
        if p["step"] == ACCEPTED:
            self._start(p, f"staging upgraded host agent binary from {redact(params['downloadURL'])}",
                        UPGRADE_STARTING)
        if p["step"] == UPGRADE_STARTING:
            if time.monotonic() < self.retry_at.get(p["uid"], 0):
                return
            try:
                self.ops.start_upgrade(self.cfg, p["operation"], params["downloadURL"], params.get("sha256"),
                                       bool(params.get("force")))
            except OpsError as e:
                if e.reason == Reason.UPGRADE_IN_PROGRESS:
                    self.retry_at[p["uid"]] = time.monotonic() + RETRY_UPGRADE_BUSY
                    message = "waiting: another upgrade is in progress on this host (unbounded-agent status shows it)"
                    if p["want"]["message"] != message:
                        log.info(f"AgentUpgrade {p['name']} waits: {e.message}")
                        self.set_want(p, mop.IN_PROGRESS, mop.REASON_IN_PROGRESS, message)
                    return
                raise
            p["step"] = UPGRADE_STARTED
            self.store.save(p)
            self.event(p, "UpgradeStarted", f"started the upgrade chain (unbounded-upgrade@.service) for "
                                            f"{redact(params['downloadURL'])}")
        if p["step"] == UPGRADE_STARTED:
            out = self.ops.upgrade_outcome(self.cfg, p["operation"])
            if out is None:
                raise OpsError(Reason.EXECUTION_FAILED,
                               f"the upgrade record no longer describes this operation ({p['operation']}): "
                               "another upgrade replaced it")
            if not out["finished"]:
                if out.get("phase") and p.get("upgrade_phase") != out["phase"]:
                    p["upgrade_phase"] = out["phase"]  # persisted: the restarted daemon does not repeat it
                    self.store.save(p)
                    self.event(p, "UpgradePhase", f"upgrade {out['phase']}")
                return
            self.finish(p, mop.COMPLETE if out["succeeded"] else mop.FAILED, out["reason"], out["message"])

    def drive_reset(self, p: dict) -> None:
        if p["step"] == ACCEPTED:
            self._start(p, "resetting unbounded agent", RESET_REQUESTING)
        if p["step"] == RESET_REQUESTING:
            p["run_id"] = self.ops.request_reset(self.cfg, p["operation"])
            p["step"] = RESET_PHASE1
            p["attempts"] = 1
            self.store.save(p)  # the run id before the units start: their reports carry it
            self.ops.start_reset_phase1(self.cfg, p["run_id"])
            self.phase1_started_here.add(p["uid"])
            self.event(p, "ResetStarted", f"started unbounded-agent-reset-phase1.target (run {p['run_id']})")
            return
        if p["step"] == RESET_PHASE1:
            if self.ops.reset_phase1_busy():
                return
            out = self.ops.reset_phase1_outcome(self.cfg, p["run_id"])
            if out.get("interrupted") and p["uid"] not in self.phase1_started_here:
                # Found after a restart with phase 1 neither running nor finished, a step that never ran and
                # none failed: the run was cut short (the host stopped). Its steps are idempotent and the
                # checkpoint resumes it: start it again (a step that failed is reported, never re-run).
                if p.get("attempts", 1) < RESET_PHASE1_ATTEMPTS:
                    p["attempts"] = p.get("attempts", 1) + 1
                    self.store.save(p)
                    log.info(f"AgentReset {p['name']}: phase 1 of run {p['run_id']} was interrupted; resuming it")
                    self.ops.start_reset_phase1(self.cfg, p["run_id"])
                    self.phase1_started_here.add(p["uid"])
                    return
            for s in self.ops.reset_steps(p["run_id"]):
                self.event(p, "ResetStep", f"step {s['number']} {s['step']}: {s['result']}",
                           warning=s["result"] != "succeeded")
            if not out["succeeded"]:
                self.finish(p, mop.FAILED, Reason.EXECUTION_FAILED.value, out["message"])
                return
            p["step"] = RESET_REPORTING
            self.set_want(p, mop.COMPLETE, Reason.SUCCEEDED.value, out["message"])
            log.info(f"AgentReset {p['name']} Complete: {out['message']}; the final steps start once the API "
                     "server has it")
            self.event(p, "Completed", out["message"])
            self.flush_one(p)
        if p["step"] == RESET_REPORTING:
            if not (p["written"] or p["gone"]):
                return  # Complete must be on the server before the daemon removes itself
            self.flush_events()
            p["step"] = RESET_PHASE2
            self.store.save(p)
            self.phase2_started_here = True
            try:
                self.ops.start_reset_phase2(self.cfg, p["run_id"])
            except OpsError as e:  # the operation is Complete already: say so, do not rewrite it
                log.error(f"AgentReset {p['name']}: {e}; run unbounded-reset to finish")
                p["step"] = DONE
                self.store.save(p)
            return
        if p["step"] == RESET_PHASE2 and not self.phase2_started_here:
            # Started before this process: phase 2 ran (and failed to remove us) or never got going. The
            # operation is Complete; starting phase 2 again is left to the operator (unbounded-reset).
            log.warn(f"AgentReset {p['name']}: the final reset steps were started before but this daemon still "
                     f"runs; see journalctl -u 'unbounded-agent-reset-*' and run unbounded-reset to finish")
            p["step"] = DONE
            self.store.save(p)

    # -- writing to the API --------------------------------------------------------------------------

    def write_pending(self, op: dict, message: str) -> None:
        u = mop.uid(op)
        if self.pending_written.get(u) == message or not self._api_ok():
            return
        want = mop.desired(mop.PENDING, mop.REASON_PENDING, message)
        if mop.status_matches(op, want):
            self.pending_written[u] = message
            return
        if self._put_status(op, want) is not None:
            self.pending_written[u] = message

    def flush_status(self) -> None:
        for p in list(self.progress.values()):
            if p.get("want") and not p["written"] and not p["gone"]:
                if not self._api_ok():
                    return
                self.flush_one(p)

    def flush_one(self, p: dict) -> bool:
        if p["written"] or p["gone"] or not p.get("want") or not self._api_ok():
            return p["written"]
        op = self.cache.get(p["uid"])
        if op is None:
            op = self._get_op(p)
            if op is None:
                return False
        result = self._put_status(op, p["want"], p)
        if result is not None:
            p["written"] = True
            self.store.save(p)
        return p["written"]

    def _get_op(self, p: dict) -> dict | None:
        try:
            op = self.kube().get(f"{kubeclient.MOP_PATH}/{p['name']}")
        except ApiError as e:
            if e.code == 404:
                self._gone(p)
            else:
                self._api_failed(e)
            return None
        except Unavailable as e:
            self._api_failed(e)
            return None
        if mop.uid(op) != p["uid"]:
            self._gone(p)
            return None
        return op

    def _gone(self, p: dict) -> None:
        if not p["gone"]:
            log.info(f"{p['kind']} {p['name']} was deleted; the host finishes what it started, nothing more is "
                     "reported")
            p["gone"] = True
            self.store.save(p)

    def _put_status(self, op: dict, want: dict, p: dict | None = None) -> dict | None:
        """Write want over op's status (PUT .../status with op's resourceVersion); on 409 Conflict read it
        again and retry. Returns the operation as written, None when not written (retried later)."""
        for attempt in range(5):
            if mop.status_matches(op, want):
                return op
            body = dict(op, status=mop.apply_status(op, want))
            try:
                new = self.kube().request("PUT", f"{kubeclient.MOP_PATH}/{mop.name(op)}/status", body=body,
                                          content_type="application/json")
            except ApiError as e:
                if e.code == 409:
                    self.stats["conflicts"] += 1
                    fresh = self._get_op(p) if p else self._get_fresh(op)
                    if fresh is None:
                        return None
                    op = fresh
                    continue
                if e.code == 404:
                    if p:
                        self._gone(p)
                    return None
                log.error(f"writing the status of {mop.name(op)} failed: {e}")
                self._api_failed(e)
                return None
            except Unavailable as e:
                self._api_failed(e)
                return None
            self._api_worked()
            self.stats["status_writes"] += 1
            if mop.machine(new) == self.machine and _rv_newer(new, self.cache.get(mop.uid(new))):
                self.cache[mop.uid(new)] = new
            return new
        return None

    def _get_fresh(self, op: dict) -> dict | None:
        try:
            fresh = self.kube().get(f"{kubeclient.MOP_PATH}/{mop.name(op)}")
        except KubeError as e:
            if not (isinstance(e, ApiError) and e.code == 404):
                self._api_failed(e)
            return None
        return fresh if mop.uid(fresh) == mop.uid(op) else None

    def event(self, p: dict, reason: str, message: str, warning: bool = False) -> None:
        if p.get("gone"):
            return
        op = self.cache.get(p["uid"]) or {"metadata": {"name": p["name"], "uid": p["uid"]}}
        suffix = f"{int(time.time() * 1000):x}{next(self._event_seq):x}{secrets.token_hex(2)}"
        ev = mop.event(op, reason, message, warning, self.machine, suffix=suffix)
        if len(self.events) < MAX_PENDING_EVENTS:
            self.events.append(ev)

    def flush_events(self) -> None:
        while self.events and self._api_ok():
            ev = self.events[0]
            try:
                self.kube().request("POST", kubeclient.EVENTS_PATH.format(namespace=ev["metadata"]["namespace"]),
                                    body=ev, content_type="application/json")
            except Unavailable as e:
                self._api_failed(e)
                return
            except ApiError as e:
                if e.code != 409:  # 409: already there (a retry of a create that did arrive)
                    log.warn(f"event {ev['reason']} on {ev['involvedObject']['name']} dropped: {e}")
            self.stats["events"] += 1
            self.events.pop(0)

    def expire_finished(self) -> None:
        """Delete finished agent operations whose ttlSecondsAfterFinished has passed."""
        now = time.time()
        for op in list(self.cache.values()):
            if mop.kind(op) not in mop.HANDLED | mop.UNSUPPORTED or mop.uid(op) in self.deleted:
                continue
            deadline = mop.ttl_deadline(op)
            if deadline is None or deadline > now or not self._api_ok():
                continue
            try:
                self.kube().request("DELETE", f"{kubeclient.MOP_PATH}/{mop.name(op)}",
                                    body={"apiVersion": "v1", "kind": "DeleteOptions",
                                          "preconditions": {"uid": mop.uid(op)}},
                                    content_type="application/json")
                log.info(f"deleted {mop.kind(op)} {mop.name(op)}: ttlSecondsAfterFinished passed")
                self.stats["deletes"] += 1
            except ApiError as e:
                if e.code not in (404, 409):
                    log.warn(f"deleting {mop.name(op)} after its TTL failed: {e}")
                    self._api_failed(e)
            except Unavailable as e:
                self._api_failed(e)
                return
            self.deleted.add(mop.uid(op))

    def collect_garbage(self) -> None:
        """Forget progress of finished operations that are gone from the server (their uid never returns)."""
        for u, p in list(self.progress.items()):
            if p["step"] == DONE and (p["written"] or p["gone"]) and u not in self.cache:
                self.store.remove(u)
                del self.progress[u]
        for u in list(self.pending_written):
            if u not in self.cache:
                del self.pending_written[u]

    def annotate_machine(self) -> None:
        """unbounded-cloud.io/agent-version on the Machine of this name, if there is one (once per start)."""
        if self.machine_annotated or time.monotonic() < self.machine_next or not self._api_ok() or not self.synced:
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
            self._api_failed(e)
            return
        self.machine_annotated = True
        self.machine_generation = (m.get("metadata") or {}).get("generation")
        log.info(f"annotated Machine {self.machine}: {mop.AGENT_VERSION_ANNOTATION}={VERSION}")


def ready_grace(cfg: Config) -> float:
    """How long after start the daemon reports ready without having listed: readyWithoutApiSeconds, and
    never more than half of readyTimeoutSeconds, so upgrade probation always sees it ready in time."""
    return min(cfg.ready_without_api_seconds, cfg.ready_timeout_seconds / 2)


def run_standalone(cfg: Config, stop: threading.Event, notify) -> None:
    """No cluster configured (no kubeconfig, not in a pod): nothing to watch. Stay up, ready and quiet,
    so that the host-side operations (`unbounded-agent upgrade`, probation) work without a cluster."""
    notify(READY=1, STATUS=f"unbounded-agent {VERSION}: no cluster configured (kubeconfig unset, not in a pod); "
                           "not watching MachineOperations")
    log.info("no kubeconfig configured and no in-cluster service account: not watching MachineOperations")
    stop.wait()


def progress_dir(cfg: Config) -> str:
    return os.fspath(Path(cfg.state_dir) / PROGRESS_DIR)
