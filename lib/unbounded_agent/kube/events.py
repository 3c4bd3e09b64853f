"""The Events the watcher tells each operation's story with, as kubectl users expect them.

- Repeated Events aggregate, as client-go's recorder does: the same operation, type, reason and message a
  second time bumps ``count`` and ``lastTimestamp`` of the Event already written (a merge patch) instead of
  adding another; `kubectl describe mop` then shows ``(x3 over 2m)``.
- Events wait in a journal on disk (``<state dir>/machineoperations/events/journal.json``, mode 0600) until the
  server has them: a restart, a ``kill -9`` or an upgrade's daemon restart loses none. The journal also
  remembers which Event each repeated one aggregates into, so a repeat after a restart still bumps a count.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from .. import log, records
from . import client as kubeclient
from . import mop
from .client import ApiError, Unavailable

MAX_PENDING = 200
FORGET_AFTER = 2 * 3600.0  # seconds; the API server keeps Events for an hour by default


@dataclasses.dataclass
class EventJournal:
    pending: list = dataclasses.field(default_factory=list)  # [{"key", "event"}], oldest first
    posted: dict = dataclasses.field(default_factory=dict)  # key -> {"name", "namespace", "count", "uid", "at"}
    format: int = 1


class Recorder:
    def __init__(self, kube: Callable[[], kubeclient.Kube], machine: str, directory: str | Path,
                 on_disk: Callable[[], bool] = lambda: True):
        self.kube = kube
        self.machine = machine
        self.on_disk = on_disk  # False once a reset removed the agent's state: the journal stays in memory
        self.path = Path(directory) / "journal.json"
        try:
            self.journal = records.load(EventJournal, self.path) or EventJournal()
        except records.CorruptRecord as e:
            log.warn(f"ignoring {e}")
            self.journal = EventJournal()
        self._saved = False
        self.written = 0  # Events created or bumped on the server
        self._seq = itertools.count(1)

    @property
    def pending(self) -> list:
        return self.journal.pending

    def _save(self) -> None:
        if not self.on_disk():  # never make the agent's state directory again
            return
        try:
            if self._saved:
                self.path.parent.mkdir(mode=0o700, exist_ok=True)  # never its parent: the progress directory
            records.save(self.journal, self.path, mode=0o600, parents=not self._saved)
            self._saved = True
        except FileNotFoundError:  # removed under it (a reset): the progress store learns it on its next write
            if not self._saved:
                raise

    def add(self, op: dict, reason: str, message: str, warning: bool = False) -> None:
        """An Event on op, written by the next flush (or counted into the same one still waiting)."""
        ev = mop.event(op, reason, message, warning, self.machine,
                       suffix=f"{int(time.time() * 1000):x}{next(self._seq):x}{secrets.token_hex(2)}")
        key = "/".join((mop.uid(op), ev["type"], reason, ev["message"]))
        waiting = next((item for item in self.pending if item["key"] == key), None)
        if waiting is not None:
            waiting["event"]["count"] += 1
            waiting["event"]["lastTimestamp"] = ev["lastTimestamp"]
        elif len(self.pending) < MAX_PENDING:
            self.pending.append({"key": key, "event": ev})
        else:
            log.warn(f"event {reason} on {mop.name(op)} dropped: {MAX_PENDING} events wait already")
            return
        self._save()

    def flush(self, api_ok: Callable[[], bool], api_failed: Callable[[Exception], None]) -> None:
        """Write what waits, oldest first, while the server answers."""
        while self.pending and api_ok():
            item = self.pending[0]
            try:
                self._write(item)
            except Unavailable as e:
                api_failed(e)
                return
            except ApiError as e:  # refused for good (invalid, forbidden): it would be refused again
                log.warn(f"event {item['event']['reason']} on {item['event']['involvedObject']['name']} "
                         f"dropped: {e}")
            self.pending.pop(0)
            self._save()

    def _write(self, item: dict) -> None:
        ev, key = item["event"], item["key"]
        ns = ev["metadata"]["namespace"]
        seen = self.journal.posted.get(key)
        if seen is not None:
            count = seen["count"] + ev["count"]
            try:
                self.kube().request("PATCH", f"{kubeclient.EVENTS_PATH.format(namespace=ns)}/{seen['name']}",
                                    body={"count": count, "lastTimestamp": ev["lastTimestamp"]},
                                    content_type="application/merge-patch+json")
                seen.update(count=count, at=time.time())
                self.written += 1
                return
            except ApiError as e:
                if e.code != 404:
                    raise
                del self.journal.posted[key]  # expired on the server: a new one
        try:
            self.kube().request("POST", kubeclient.EVENTS_PATH.format(namespace=ns), body=ev,
                                content_type="application/json")
        except ApiError as e:
            if e.code != 409:  # 409: already there (a retry of a create that did arrive)
                raise
        self.written += 1
        self.journal.posted[key] = {"name": ev["metadata"]["name"], "namespace": ns, "count": ev["count"],
                                    "uid": ev["involvedObject"].get("uid") or "", "at": time.time()}

    def drop(self, uid: str) -> None:
        """The operation is gone: what waits to be said about it is not said."""
        kept = [item for item in self.pending if item["event"]["involvedObject"].get("uid") != uid]
        if len(kept) != len(self.pending):
            self.journal.pending = kept
            self._save()

    def forget(self, keep: set[str]) -> None:
        """Drop what aggregates into Events of operations no longer known (keep: their uids) or long gone."""
        now = time.time()
        stale = [k for k, v in self.journal.posted.items() if v.get("uid") not in keep
                 or now - v.get("at", 0) > FORGET_AFTER]
        if stale:
            for k in stale:
                del self.journal.posted[k]
            self._save()
