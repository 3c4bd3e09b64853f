"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection package does it: of all the
controllers that run, one acts.

- A candidate takes the Lease when nobody holds it, or when the holder has not renewed it for
  leaseDurationSeconds — measured on the candidate's own clock from the moment it last saw the Lease change,
  so clocks that disagree between hosts do not matter.
- Every take and renewal is an update with the resourceVersion read (or a create): two candidates cannot both
  succeed.
- The leader renews every retryPeriod and acts only while its last successful renewal, counted from the moment
  that renewal was sent, is younger than renewDeadline (``held()``). renewDeadline is shorter than
  leaseDurationSeconds: a leader that cannot renew (killed, cut off, stalled) has stopped acting before anybody
  else may take the Lease.
- Stopping in good order releases the Lease (holder emptied), so a standby takes over at once.
"""

from __future__ import annotations

import datetime
import random
import threading
import time
from collections.abc import Callable

from .. import log
from ..kube.client import ApiError, KubeError

COORDINATION = "/apis/coordination.k8s.io/v1"


def micro_time() -> str:
    """metav1.MicroTime, as the Lease's acquireTime and renewTime are written."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_path(namespace: str, name: str = "") -> str:
    return f"{COORDINATION}/namespaces/{namespace}/leases" + (f"/{name}" if name else "")


class Elector:
    def __init__(self, kube: Callable, namespace: str, name: str, identity: str, duration: float,
                 renew_deadline: float, retry_period: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[bool], None] | None = None):
        if not 0 < retry_period < renew_deadline < duration:
            raise ValueError("leader election needs retryPeriod < renewDeadline < leaseDurationSeconds")
        self.kube = kube
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration, self.renew_deadline, self.retry_period = duration, renew_deadline, retry_period
        self.clock = clock
        self.on_change = on_change or (lambda leader: None)
        self.renewed_at: float | None = None  # when the last successful take/renewal was sent
        self.observed: tuple | None = None  # (holder, renewTime, resourceVersion) as last seen
        self.observed_at = 0.0  # when it last changed
        self.holder = ""  # the holder as last seen
        self.transitions = 0
        self._lease: dict | None = None  # the Lease as last read or written
        self._was_leader = False
        self._logged: str | None = None

    @property
    def path(self) -> str:
        return lease_path(self.namespace, self.name)

    def held(self) -> bool:
        """Whether this instance may act now."""
        return self.renewed_at is not None and self.clock() < self.renewed_at + self.renew_deadline

    def _observe(self, lease: dict) -> dict:
        self._lease = lease
        spec = lease.get("spec") or {}
        seen = (spec.get("holderIdentity") or "", spec.get("renewTime"), lease["metadata"].get("resourceVersion"))
        if seen != self.observed:
            self.observed, self.observed_at = seen, self.clock()
        self.holder = seen[0]
        return spec

    def _renew_fast(self, kube, sent: float, now: str) -> bool | None:
        """The leader renews with the Lease it wrote last, without reading it first (as client-go does): None
        when that was not possible (read it, then decide)."""
        if self._lease is None or not self.held():
            return None
        body = dict(self._lease, spec=dict(self._lease["spec"], renewTime=now))
        try:
            updated = kube.request("PUT", self.path, body=body, content_type="application/json")
        except ApiError as e:
            if e.code in (404, 409):
                return None
            raise
        self._observe(updated)
        self.renewed_at = sent
        return True

    def try_acquire_or_renew(self) -> bool:
        sent = self.clock()
        kube = self.kube()
        now = micro_time()
        fast = self._renew_fast(kube, sent, now)
        if fast is not None:
            return fast
        try:
            lease = kube.get(self.path)
        except ApiError as e:
            if e.code != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}
            try:
                created = kube.request("POST", lease_path(self.namespace), body=body, content_type="application/json")
            except ApiError as e2:
                if e2.code == 409:  # another candidate created it first
                    return False
                raise
            self._observe(created)
            self.renewed_at = sent
            return True
        spec = self._observe(lease)
        holder = spec.get("holderIdentity") or ""
        if holder != self.identity:
            self.renewed_at = None  # whatever the clock says: somebody else's now (or nobody's)
        duration = spec.get("leaseDurationSeconds") or self.duration
        if holder and holder != self.identity and self.clock() < self.observed_at + duration:
            return False  # held by another, renewed recently enough
        new = dict(spec, holderIdentity=self.identity, leaseDurationSeconds=int(self.duration), renewTime=now)
        if holder != self.identity:
            new["acquireTime"] = now
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        body = dict(lease, spec=new)
        try:
            updated = kube.request("PUT", self.path, body=body, content_type="application/json")
        except ApiError as e:
            if e.code == 409:  # someone else wrote it since the read
                return False
            raise
        self._observe(updated)
        self.transitions = int(new.get("leaseTransitions") or 0)
        self.renewed_at = sent
        return True

    def release(self) -> None:
        """Give the Lease up (stopping in good order): a standby takes it at its next try."""
        if not self.held():
            return
        self.renewed_at = None
        try:
            kube = self.kube()
            lease = kube.get(self.path)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = micro_time()
            spec = dict(lease["spec"], holderIdentity="", leaseDurationSeconds=1, renewTime=now, acquireTime=now)
            kube.request("PUT", self.path, body=dict(lease, spec=spec), content_type="application/json")
            log.info(f"released the lease {self.namespace}/{self.name}")
        except KubeError as e:
            log.warn(f"releasing the lease {self.namespace}/{self.name} failed: {e} (it expires by itself)")

    def step(self) -> bool:
        """One try (take or renew); says when leadership changed. Returns held()."""
        try:
            self.try_acquire_or_renew()
            self._logged = None
        except KubeError as e:
            text = f"the lease {self.namespace}/{self.name} could not be read or written: {e}"
            if text != self._logged:
                log.warn(text)
                self._logged = text
        leader = self.held()
        if leader != self._was_leader:
            self._was_leader = leader
            if leader:
                log.info(f"acquired the lease {self.namespace}/{self.name} as {self.identity}: acting")
            else:
                log.warn(f"lost the lease {self.namespace}/{self.name}: not acting (holder now "
                         f"{self.holder or 'nobody'})")
            self.on_change(leader)
        return leader

    def run(self, stop: threading.Event) -> None:
        """Try every retryPeriod (a candidate with some jitter, so that candidates do not move in step) until
        stop. The owner releases the Lease once it has stopped acting (release())."""
        while not stop.is_set():
            leader = self.step()
            stop.wait(self.retry_period * (1.0 if leader else random.uniform(1.0, 1.2)))
