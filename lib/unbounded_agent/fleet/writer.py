"""Everything the fan-out controller writes to the API server, each write only while it holds the Lease.

Every write is conditional, so that even a write sent just before the Lease was lost cannot undo another
leader's: children are created under deterministic names (a second create is 409 AlreadyExists); a child is
withdrawn with the uid and resourceVersion it was seen with (once the agent has started it, 409 Conflict and
it runs on); the parent's status and finalizers are written with its resourceVersion.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable

from ..kube import client as kubeclient
from ..kube import mop
from ..kube.client import ApiError
from . import children

COMPONENT = "unbounded-agent-fleet-controller"


class NotLeader(Exception):
    """The Lease is not held (any more): nothing is written."""


class Writer:
    def __init__(self, kube: Callable[[], kubeclient.Kube], fence: Callable[[], bool], identity: str):
        self.kube = kube
        self.fence = fence
        self.identity = identity
        self.stats = {"created": 0, "exists": 0, "withdrawn": 0, "status_writes": 0, "conflicts": 0, "events": 0}
        self._seq = itertools.count(1)

    def _request(self, method: str, path: str, body=None, content_type: str = "application/json") -> dict:
        if not self.fence():
            raise NotLeader()
        return self.kube().request(method, path, body=body, content_type=content_type)

    def get(self, name: str) -> dict | None:
        try:
            return self.kube().get(f"{kubeclient.MOP_PATH}/{name}")
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def create(self, body: dict) -> tuple[dict | None, bool]:
        """(the child, whether this call created it); (None, False) when its name belongs to another object."""
        try:
            created = self._request("POST", kubeclient.MOP_PATH, body)
            self.stats["created"] += 1
            return created, True
        except ApiError as e:
            if e.code != 409:
                raise
        self.stats["exists"] += 1
        found = self.get(body["metadata"]["name"])
        owner = body["metadata"]["ownerReferences"][0]["uid"]
        return (found, False) if found is not None and children.owner_uid(found) == owner else (None, False)

    def withdraw(self, child: dict) -> bool:
        """Delete a child the agent has not started: True when it is gone (by this call or before)."""
        meta = child["metadata"]
        options = {"apiVersion": "v1", "kind": "DeleteOptions",
                   "preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}}
        try:
            self._request("DELETE", f"{kubeclient.MOP_PATH}/{meta['name']}", options)
        except ApiError as e:
            if e.code == 404:
                return True
            if e.code == 409:  # changed since it was seen (maybe started): decided again from the new version
                self.stats["conflicts"] += 1
                return False
            raise
        self.stats["withdrawn"] += 1
        return True

    def status(self, parent: dict, status: dict) -> dict | None:
        """PUT the status with the parent's resourceVersion; None on 409 (decided again on the next pass)."""
        try:
            new = self._request("PUT", f"{kubeclient.MOP_PATH}/{mop.name(parent)}/status", dict(parent, status=status))
        except ApiError as e:
            if e.code in (404, 409):
                self.stats["conflicts"] += e.code == 409
                return None
            raise
        self.stats["status_writes"] += 1
        return new

    def finalizers(self, parent: dict, finalizers: list[str]) -> dict | None:
        """Set the parent's finalizers (a merge patch, conditional on its resourceVersion); None on 409/404."""
        meta = parent["metadata"]
        body = {"metadata": {"finalizers": finalizers or None, "resourceVersion": meta["resourceVersion"]}}
        try:
            return self._request("PATCH", f"{kubeclient.MOP_PATH}/{meta['name']}", body,
                                 content_type="application/merge-patch+json")
        except ApiError as e:
            if e.code in (404, 409):
                return None
            raise

    def delete(self, parent: dict) -> None:
        """Delete a finished parent whose ttlSecondsAfterFinished has passed."""
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": mop.uid(parent)}}
        try:
            self._request("DELETE", f"{kubeclient.MOP_PATH}/{mop.name(parent)}", options)
        except ApiError as e:
            if e.code not in (404, 409):
                raise

    def event(self, op: dict, reason: str, message: str, warning: bool = False) -> None:
        suffix = f"{int(time.time() * 1000):x}{next(self._seq):x}{secrets.token_hex(2)}"
        ev = mop.event(op, reason, message, warning, self.identity, suffix=suffix, component=COMPONENT)
        try:
            self._request("POST", kubeclient.EVENTS_PATH.format(namespace="default"), ev)
            self.stats["events"] += 1
        except ApiError:
            pass  # an Event refused for good is not worth holding the rollout up
