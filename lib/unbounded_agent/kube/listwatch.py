"""List and watch the MachineOperations of this machine, and feed what comes into a queue for the main loop.

``ListWatch`` lists the machine's operations (``fieldSelector=spec.machineRef=<machine>``; where the server
has no such selectable field it lists all and filters here, and says so once), then watches from the
list's resourceVersion, resuming from the last one it saw (events and bookmarks) and relisting on
``410 Gone``. Errors back off exponentially (with jitter, capped); a watch that ends at once counts as an
error, so nothing ever busy-loops. It only feeds the queue; the watcher's main loop acts.
"""

from __future__ import annotations

import queue
import random
import threading
import time

from .. import log
from . import client as kubeclient
from . import mop
from .client import ApiError, Unavailable

WATCH_TIMEOUT = (240, 300)  # seconds, chosen at random per watch, as client-go does
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


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


def rv_newer(new: dict, old: dict | None) -> bool:
    """Whether new is at least as recent as old (resourceVersions are opaque, but integers in practice)."""
    if old is None:
        return True
    a, b = new.get("metadata", {}).get("resourceVersion", ""), old.get("metadata", {}).get("resourceVersion", "")
    if a.isdigit() and b.isdigit():
        return int(a) >= int(b)
    return True


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
            except Exception:  # a bug, or a client library surprise: never let this thread die
                import traceback

                self._say_once(f"listing/watching MachineOperations failed unexpectedly: "
                               f"{traceback.format_exc().rstrip()}")
                self.rv = None
                self.stop.wait(backoff.next())
