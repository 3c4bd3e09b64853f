"""A cache of one kind of cluster-scoped object, kept by list and watch: what the controller decides from.

``Informer`` lists the objects, then watches from the list's resourceVersion (bookmarks, resuming from the last
version seen, listing again on ``410 Gone``), with the same backoff as the agent's own list-watch. Each change
calls ``on_change``; the controller's own writes are put in at once (``put``), so that a decision never waits
for the watch to bring back what was just written (a newer version is never replaced by an older one).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from .. import log
from ..kube.client import ApiError, Unavailable
from ..kube.listwatch import WATCH_TIMEOUT, Backoff, rv_newer


class Informer(threading.Thread):
    def __init__(self, client, path: str, what: str, stop: threading.Event, on_change: Callable[[], None],
                 watch_timeout: tuple[int, int] = WATCH_TIMEOUT):
        super().__init__(name=f"informer-{what}", daemon=True)
        self.client = client  # a callable returning a kube.client.Kube (raises Unavailable)
        self.path = path
        self.what = what
        self.stop = stop
        self.on_change = on_change
        self.watch_timeout = watch_timeout
        self.objects: dict[str, dict] = {}
        self.synced = False
        self.rv: str | None = None
        self.lists = self.watches = 0
        self.lock = threading.Lock()
        self._logged: str | None = None

    def snapshot(self) -> dict[str, dict]:
        with self.lock:
            return dict(self.objects)

    def get(self, name: str) -> dict | None:
        with self.lock:
            return self.objects.get(name)

    def put(self, obj: dict) -> None:
        """An object as the server answered one of our writes."""
        name = obj.get("metadata", {}).get("name", "")
        with self.lock:
            if rv_newer(obj, self.objects.get(name)):
                self.objects[name] = obj

    def forget(self, name: str, uid: str) -> None:
        """An object we deleted (a watch event may still bring an older version: it is gone all the same)."""
        with self.lock:
            if (self.objects.get(name) or {}).get("metadata", {}).get("uid") == uid:
                del self.objects[name]

    def _list(self, kube) -> None:
        doc = kube.get(self.path)
        self.lists += 1
        items = {o["metadata"]["name"]: o for o in doc.get("items") or []}
        with self.lock:
            self.objects = items
            self.rv = (doc.get("metadata") or {}).get("resourceVersion") or None
        if not self.synced:
            log.info(f"listed {len(items)} {self.what}")
        self.synced = True
        self.on_change()

    def _event(self, kind: str, obj: dict) -> None:
        name = obj.get("metadata", {}).get("name", "")
        with self.lock:
            if kind == "DELETED":
                old = self.objects.get(name)
                if old is not None and old["metadata"].get("uid") == obj["metadata"].get("uid"):
                    del self.objects[name]
            elif rv_newer(obj, self.objects.get(name)):
                self.objects[name] = obj
        self.on_change()

    def _say_once(self, text: str) -> None:
        if text != self._logged:
            log.warn(text)
            self._logged = text

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
                query = {"resourceVersion": self.rv, "allowWatchBookmarks": "true"}
                for ev in kube.watch(self.path, query, random.randint(*self.watch_timeout)):
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
                        self._event(kind, obj)
                    backoff.reset()
                self._logged = None
                if n == 0 and time.monotonic() - started < 1.0:
                    self.stop.wait(backoff.next())  # a watch that ends at once must not spin
            except (ApiError, Unavailable) as e:
                if self.stop.is_set():
                    return  # stopping: a watch cut short is expected
                if isinstance(e, Unavailable):
                    self._say_once(f"the API server is unavailable ({self.what}): {e}; retrying")
                    self.stop.wait(backoff.next())
                    continue
                if e.code == 410:
                    self.rv = None
                    self.stop.wait(random.uniform(0.05, 0.3))
                    continue
                self._say_once(f"listing/watching {self.what} failed: {e}; retrying")
                self.stop.wait(backoff.next())
            except Exception:  # a bug, or a client library surprise: never let this thread die
                import traceback

                self._say_once(f"listing/watching {self.what} failed unexpectedly: {traceback.format_exc().rstrip()}")
                self.rv = None
                self.stop.wait(backoff.next())
