"""The fan-out controller (lib/unbounded_agent/fleet) against the real test API server, for fast tests and the bench.

    with Fleet(tmp_path, machines=5) as f:        # worker-01..05, labelled pool=blue
        f.start()                                 # a controller in a thread (f.spawn(): one as a process)
        f.parent("up", downloadURL=URL, maxInFlight="2")
        kids = f.wait_children("up", 1)
        f.agent(kids["worker-01"]).finish()       # the agent of worker-01 reports, as the agent does
        f.wait_phase("up", "Complete")

The server has what a cluster would: the CRD, the agents' ClusterRole and per-machine admission policy, the
controller's RBAC (packaging/kubernetes/fleet-controller-rbac.yaml). The controller authenticates as the user
unbounded-agent-fleet-controller; each machine's agent as unbounded-agent:<machine>, so every status write of
the fake agents passes the same policy a real agent's does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from kube_apiserver import MANIFESTS, start_apiserver
from waiting import wait_until

from unbounded_agent.fleet import children, controller, settings
from unbounded_agent.fleet.lease import lease_path
from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import mop

REPO = Path(__file__).resolve().parents[2]
CONTROLLER_USER = "unbounded-agent-fleet-controller"
AGENT_GROUP = "unbounded-agent-daemons"
ADMIN_AGENT = "fleet-tests-admin"
PRELOAD = (MANIFESTS / "rbac.yaml", MANIFESTS / "fleet-controller-rbac.yaml", MANIFESTS / "admission-policy.yaml")
LEASE = lease_path(settings.DEFAULT_NAMESPACE, settings.DEFAULT_LEASE)
# Short, so that a failover takes seconds; the order retry < deadline < duration is what matters.
TIMING = {"leaseDurationSeconds": 3, "renewDeadlineSeconds": 2, "retryPeriodSeconds": 0.25}
WAIT = 60.0


def wait_for(what: str, fn, timeout: float = WAIT, poll: float = 0.02):
    return wait_until(what, fn, timeout, poll)


def machine(name: str, **labels) -> dict:
    return {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
            "metadata": {"name": name, "labels": labels}, "spec": {}}


class FakeAgent:
    """What the agent of one machine writes on its operation (kube.mop's status), under its own identity."""

    def __init__(self, fleet: Fleet, child: dict):
        self.fleet, self.name, self.machine = fleet, mop.name(child), mop.machine(child)
        self.kube = fleet.agent_client(self.machine)

    def write(self, phase: str, reason: str, message: str) -> dict:
        op = self.kube.get(f"{kubeclient.MOP_PATH}/{self.name}")
        op["status"] = mop.apply_status(op, mop.desired(phase, reason, message))
        return self.kube.request("PUT", f"{kubeclient.MOP_PATH}/{self.name}/status", body=op,
                                 content_type="application/json")

    def accept(self) -> dict:
        return self.write(mop.PENDING, mop.REASON_PENDING, f"accepted by the agent on {self.machine}")

    def start(self) -> dict:
        return self.write(mop.IN_PROGRESS, mop.REASON_IN_PROGRESS, "staging upgraded host agent binary")

    def finish(self, ok: bool = True, reason: str = "DaemonFailed", message: str = "rolled back") -> dict:
        if ok:
            return self.write(mop.COMPLETE, "Succeeded", "AgentUpgrade completed")
        return self.write(mop.FAILED, reason, message)


class Fleet:
    def __init__(self, tmp: Path, machines: int | dict[str, dict] = 3, **server_kw):
        self.tmp = Path(tmp)
        self.server = start_apiserver(preload=PRELOAD, **server_kw)
        self.admin = kubeclient.build(self.server.kubeconfig(self.tmp / "admin.kubeconfig"))
        self.admin.api.user_agent = ADMIN_AGENT
        self.kubeconfig = self.server.kubeconfig(self.tmp / "controller.kubeconfig", user=CONTROLLER_USER, groups=())
        if isinstance(machines, int):
            machines = {f"worker-{i:02}": {"pool": "blue"} for i in range(1, machines + 1)}
        for name, labels in machines.items():
            self.admin.request("POST", kubeclient.MACHINE_PATH, body=machine(name, **labels),
                               content_type="application/json")
        self.controllers: list[tuple[controller.Controller, threading.Thread]] = []
        self.processes: list[subprocess.Popen] = []
        self._agents: dict[str, kubeclient.Kube] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for c, _ in self.controllers:
            self.stop(c)
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        self.server.stop()

    # -- controllers ---------------------------------------------------------------------------------

    def settings(self, identity: str, **overrides) -> settings.Settings:
        return settings.load(str(self.tmp / "absent.yaml"), {"kubeconfig": self.kubeconfig, "identity": identity,
                                                             **TIMING, **overrides})

    def start(self, identity: str = "controller-a", **overrides) -> controller.Controller:
        c = controller.Controller(self.settings(identity, **overrides))
        t = threading.Thread(target=c.run, daemon=True, name=f"controller-{identity}")
        t.start()
        self.controllers.append((c, t))
        return c

    def stop(self, c: controller.Controller) -> None:
        """Stop a controller in good order (as SIGTERM): it releases the Lease."""
        for cc, t in self.controllers:
            if cc is c:
                c.stop()
                t.join(30)
                assert not t.is_alive()

    def spawn(self, identity: str, env: dict | None = None) -> subprocess.Popen:
        """The controller program (bin/unbounded-agent-fleet-controller) as a process of its own."""
        config = self.tmp / f"{identity}.yaml"
        config.write_text("".join(f"{k}: {v}\n" for k, v in {"kubeconfig": self.kubeconfig, "identity": identity,
                                                              **TIMING}.items()))
        code = (f"import sys; sys.path.insert(0, {str(REPO / 'lib')!r}); from unbounded_agent.fleet import "
                "controller; sys.exit(controller.main(sys.argv[1:]))")
        p = subprocess.Popen([sys.executable, "-c", code, "--config", str(config)],
                             env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        self.processes.append(p)
        return p

    def lease(self) -> dict | None:
        try:
            return self.admin.get(LEASE)
        except kubeclient.ApiError as e:
            if e.code == 404:
                return None
            raise

    def holder(self) -> str:
        return ((self.lease() or {}).get("spec") or {}).get("holderIdentity") or ""

    def requests_of(self, identity: str, mutating: bool = True) -> list:
        """The requests a controller (by the identity in its User-Agent) made; mutating: writes only."""
        return [r for r in self.server.find_requests(user_agent=f"({identity})")
                if not mutating or r.verb in ("create", "update", "patch", "delete")]

    # -- operations ----------------------------------------------------------------------------------

    def parent(self, name: str, kind: str = "AgentUpgrade", selector: dict | None = None, ttl: int | None = None,
               **params) -> dict:
        spec: dict = {"machineSelector": selector if selector is not None else {"matchLabels": {"pool": "blue"}},
                      "operationKind": kind}
        if ttl is not None:
            spec["ttlSecondsAfterFinished"] = ttl
        if kind == "AgentUpgrade":
            params.setdefault("downloadURL", "https://releases.example/unbounded-agent-linux-amd64.tar.gz")
        if params:
            spec["parameters"] = params
        body = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation", "metadata": {"name": name},
                "spec": spec}
        return self.admin.request("POST", kubeclient.MOP_PATH, body=body, content_type="application/json")

    def get(self, name: str) -> dict | None:
        try:
            return self.admin.get(f"{kubeclient.MOP_PATH}/{name}")
        except kubeclient.ApiError as e:
            if e.code == 404:
                return None
            raise

    def phase(self, name: str) -> str:
        op = self.get(name)
        return mop.phase(op) if op else "<deleted>"

    def wait_phase(self, name: str, phase: str) -> dict:
        wait_for(f"{name} to be {phase}", lambda: self.phase(name) == phase)
        return self.get(name)

    def condition(self, name: str, kind: str = mop.CONDITION) -> dict:
        return next(c for c in self.get(name)["status"]["conditions"] if c["type"] == kind)

    def children(self, parent: str) -> dict[str, dict]:
        """The children of parent by machine, as its label finds them."""
        items = self.admin.get(kubeclient.MOP_PATH, {"labelSelector": f"{children.PARENT_LABEL}={parent}"})["items"]
        return {mop.machine(o): o for o in items}

    def wait_children(self, parent: str, n: int) -> dict[str, dict]:
        return wait_for(f"{n} children of {parent}", lambda: (k := self.children(parent)) and len(k) == n and k)

    def delete(self, name: str) -> None:
        self.admin.request("DELETE", f"{kubeclient.MOP_PATH}/{name}")

    def events(self, name: str) -> list[dict]:
        evs = self.admin.get("/api/v1/namespaces/default/events", {"fieldSelector": f"involvedObject.name={name}"})
        return sorted(evs["items"], key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))

    def label(self, machine_name: str, **labels) -> None:
        self.admin.request("PATCH", f"{kubeclient.MACHINE_PATH}/{machine_name}",
                           body={"metadata": {"labels": labels}}, content_type="application/merge-patch+json")

    # -- agents --------------------------------------------------------------------------------------

    def agent_kubeconfig(self, machine_name: str) -> str:
        """The kubeconfig of the agent of machine_name: its own user, in the agents' group."""
        path = self.tmp / f"agent-{machine_name}.kubeconfig"
        if not path.exists():
            self.server.kubeconfig(path, user=f"unbounded-agent:{machine_name}", groups=(AGENT_GROUP,))
        return str(path)

    def agent_client(self, machine_name: str) -> kubeclient.Kube:
        if machine_name not in self._agents:
            self._agents[machine_name] = kubeclient.build(self.agent_kubeconfig(machine_name))
        return self._agents[machine_name]

    def agent(self, child: dict) -> FakeAgent:
        return FakeAgent(self, child)

    def finish_all(self, parent: str, ok: bool = True) -> list[str]:
        """Every child of parent still Pending finishes (ok, or DaemonFailed); returns their machines."""
        done = []
        for m, child in sorted(self.children(parent).items()):
            if mop.phase(child) in ("", mop.PENDING):
                self.agent(child).finish(ok)
                done.append(m)
        return done


class SimulatedAgents:
    """Machines whose agents are the real watcher (kube/watcher.py), one per machine, in threads of this process;
    only the host side is faked: each machine's spool is answered by a FakeDispatcher (watcher_fakes.py), all of
    them driven by one thread that finishes each upgrade request `seconds` after it was queued, as
    outcome(machine) says ((ok, reason, message); default: success).

    kubeconfigs: machine -> the agent's kubeconfig (its own user, unbounded-agent:<machine>)."""

    def __init__(self, tmp: Path, kubeconfigs: dict[str, str], seconds: float = 0.2, tick: float = 0.05,
                 outcome=None, poll: float = 0.05):
        from watcher_fakes import FakeDispatcher

        from unbounded_agent import config
        from unbounded_agent.queue.spool import Spool

        self.tmp, self.seconds, self.tick, self.poll = Path(tmp), seconds, tick, poll
        self.outcome = outcome or (lambda machine: (True, "Succeeded", "upgraded from 1.0.0 to 2.0.0"))
        self.machines = sorted(kubeconfigs)
        self.cfgs, self.dispatchers = {}, {}
        for m in self.machines:
            self.cfgs[m] = config.Config(machine_name=m, kubeconfig=kubeconfigs[m], bin_dir=self.tmp / m / "bin",
                                         state_dir=self.tmp / m / "state", ready_timeout_seconds=60,
                                         ready_without_api_seconds=30)
            self.dispatchers[m] = FakeDispatcher(Spool(self.tmp / m / "ops"), self.cfgs[m])
        self.watchers: dict = {}
        self.threads: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self.seen: dict[str, float] = {}
        self.ran: dict[str, list[str]] = {m: [] for m in self.machines}  # machine -> operations it ran

    def start(self) -> None:
        from unbounded_agent.kube import watcher

        for m in self.machines:
            w = watcher.Watcher(self.cfgs[m], spool=self.dispatchers[m].spool, notify=lambda **f: None,
                                tick=self.tick)
            self.watchers[m] = w
            t = threading.Thread(target=w.run, daemon=True, name=f"agent-{m}")
            t.start()
            self.threads.append(t)
        t = threading.Thread(target=self._dispatch, daemon=True, name="fake-dispatchers")
        t.start()
        self.threads.append(t)

    def synced(self) -> bool:
        return all(w.synced for w in self.watchers.values())

    def _dispatch(self) -> None:
        import time

        while not self.stop_event.wait(self.poll):
            now = time.monotonic()
            for m, d in self.dispatchers.items():
                for req in d.queued():
                    first = self.seen.setdefault(req.id, now)
                    if now - first < self.seconds:
                        continue
                    ok, reason, message = self.outcome(m)
                    self.ran[m].append(req.operation)
                    d.finish(req, ok, reason, message)

    def stop(self) -> None:
        self.stop_event.set()
        for w in self.watchers.values():
            w.stop()
        for t in self.threads:
            t.join(30)
