"""Fast-test helpers for the watcher: a fake of lib/unbounded_agent/operations.py (the host side only —
the API server is the real test server, tests/kube_apiserver.py) and a harness that runs a Watcher
in a thread against it.

    with Harness(tmp_path) as h:                 # server + watcher for machine worker-01
        h.create("up-1", "AgentUpgrade", downloadURL="https://x/a.tar.gz")
        h.wait_phase("up-1", "InProgress")
        h.ops.finish_upgrade("up-1@...", ok=True)
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from kube_apiserver import start_apiserver
from waiting import wait_until

LIB = Path(__file__).resolve().parent.parent / "lib"
if str(LIB) not in sys.path:
    sys.path.insert(0, str(LIB))

from unbounded_agent import config, kubeclient, mop, watcher  # noqa: E402
from unbounded_agent.reasons import OpsError, Reason  # noqa: E402

MACHINE = "worker-01"
WAIT = 30.0  # a bound on waits only; nothing asserts how long anything took


def wait_for(what: str, fn, timeout: float = WAIT, poll: float = 0.02):
    return wait_until(what, fn, timeout, poll)


class FakeOps:
    """The functions of operations.py, recording each call; outcomes are set by the test."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[tuple] = []
        self.upgrades: dict[str, dict] = {}  # operation -> outcome
        self.refuse_upgrade: OpsError | None = None
        self.busy_upgrade = 0  # refuse this many starts with UpgradeInProgress
        self.phase1_busy = False
        self.phase1_result = {"finished": True, "succeeded": True, "reason": "Succeeded",
                              "message": "AgentReset completed"}
        self.runs = 0

    def _call(self, *args):
        with self.lock:
            self.calls.append(args)

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)

    # AgentUpgrade
    def start_upgrade(self, cfg, operation, url, sha256, force):
        self._call("start_upgrade", operation, url, sha256, force)
        if self.busy_upgrade:
            self.busy_upgrade -= 1
            raise OpsError(Reason.UPGRADE_IN_PROGRESS, "upgrade local-1 in phase staging")
        if self.refuse_upgrade:
            raise self.refuse_upgrade
        self.upgrades.setdefault(operation, {"finished": False, "succeeded": False, "phase": "requested",
                                             "reason": "", "message": "requested"})

    def upgrade_outcome(self, cfg, operation):
        return self.upgrades.get(operation)

    def set_upgrade(self, operation: str, phase: str, ok: bool | None = None, reason: str = "", message: str = ""):
        finished = ok is not None
        self.upgrades[operation] = {"finished": finished, "succeeded": bool(ok), "phase": phase,
                                    "reason": reason or ("Succeeded" if ok else ""), "message": message or phase}

    # AgentReset
    def request_reset(self, cfg, operation):
        self.runs += 1
        self._call("request_reset", operation)
        return f"run-{self.runs}"

    def start_reset_phase1(self, cfg, run_id):
        self._call("start_reset_phase1", run_id)

    def reset_phase1_busy(self):
        return self.phase1_busy

    def reset_phase1_outcome(self, cfg, run_id):
        return dict(self.phase1_result)

    def reset_steps(self, run_id):
        return [{"step": "stop-machines", "number": 1, "result": "succeeded", "removed": 0}]

    def start_reset_phase2(self, cfg, run_id):
        self._call("start_reset_phase2", run_id)


class Harness:
    """A test API server, an admin client to it, and watchers for MACHINE on one state dir."""

    def __init__(self, tmp: Path, version: str = "1.32.4", ops: FakeOps | None = None, **server_kw):
        self.tmp = Path(tmp)
        self.server = start_apiserver(version=version, **server_kw)
        self.admin = kubeclient.build(self.server.kubeconfig(self.tmp / "admin.kubeconfig"))
        # The agent's own credential: the RBAC of packaging/kubernetes/rbac.yaml, nothing more.
        self.apply_rbac()
        agent_kc = self.server.kubeconfig(self.tmp / "agent.kubeconfig", user=f"agent-{MACHINE}",
                                          groups=("unbounded-agent-daemons",))
        self.cfg = config.Config(machine_name=MACHINE, kubeconfig=agent_kc, bin_dir=self.tmp / "bin",
                                 state_dir=self.tmp / "state", ready_timeout_seconds=60,
                                 ready_without_api_seconds=30)
        self.ops = ops or FakeOps()
        self.watcher: watcher.Watcher | None = None
        self.thread: threading.Thread | None = None
        self.notified: list[dict] = []

    def apply_rbac(self):
        import yaml

        rbac = Path(__file__).resolve().parent.parent / "packaging" / "kubernetes" / "rbac.yaml"
        for doc in yaml.safe_load_all(rbac.read_text()):
            plural = "clusterroles" if doc["kind"] == "ClusterRole" else "clusterrolebindings"
            self.admin.request("POST", f"/apis/rbac.authorization.k8s.io/v1/{plural}", body=doc,
                               content_type="application/json")

    # -- the watcher -------------------------------------------------------------------------------

    def start(self, **kw) -> watcher.Watcher:
        w = watcher.Watcher(self.cfg, ops=self.ops, notify=lambda **f: self.notified.append(f), tick=0.05, **kw)
        self.watcher = w
        self.thread = threading.Thread(target=w.run, daemon=True)
        self.thread.start()
        return w

    def stop(self) -> None:
        """Stop the watcher as SIGTERM would (a 'restart' is stop() then start())."""
        if self.watcher:
            self.watcher.stop()
            self.thread.join(10)
            assert not self.thread.is_alive()
            self.watcher = None

    def restart(self) -> watcher.Watcher:
        self.stop()
        return self.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.server.stop()

    # -- operations --------------------------------------------------------------------------------

    def create(self, name: str, kind: str, machine: str = MACHINE, ttl: int | None = None, **params) -> dict:
        spec = {"machineRef": machine, "operationKind": kind}
        if params:
            spec["parameters"] = params
        if ttl is not None:
            spec["ttlSecondsAfterFinished"] = ttl
        body = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation",
                "metadata": {"name": name}, "spec": spec}
        return self.admin.request("POST", kubeclient.MOP_PATH, body=body, content_type="application/json")

    def get(self, name: str) -> dict | None:
        try:
            return self.admin.get(f"{kubeclient.MOP_PATH}/{name}")
        except kubeclient.ApiError as e:
            if e.code == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        self.admin.request("DELETE", f"{kubeclient.MOP_PATH}/{name}")

    def phase(self, name: str) -> str:
        op = self.get(name)
        return mop.phase(op) if op else "<deleted>"

    def wait_phase(self, name: str, phase: str) -> dict:
        wait_for(f"{name} to be {phase}", lambda: self.phase(name) == phase)
        return self.get(name)

    def operation(self, name: str) -> str:
        """The upgrade record's operation name the watcher uses for name."""
        op = self.get(name)
        return f"{name}@{mop.uid(op)[:8]}"

    def condition(self, name: str) -> dict:
        op = self.get(name)
        return next(c for c in op["status"]["conditions"] if c["type"] == "Completed")

    def events(self, name: str) -> list[dict]:
        evs = self.admin.get("/api/v1/namespaces/default/events",
                             {"fieldSelector": f"involvedObject.name={name}"})["items"]
        return sorted(evs, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))

    def status_writes(self, name: str) -> int:
        return self.server.count(verb="update", resource="machineoperations/status", name=name)

    def phases_written(self, name: str) -> list[str]:
        """Every phase the object went through, in order, from the server's own change history."""
        with self.server.lock:
            history = [e for e in self.server.history if e.store.endswith("machineoperations")
                       and e.obj.get("metadata", {}).get("name") == name]
        phases = [(e.obj.get("status") or {}).get("phase") or "" for e in history]
        return [p for i, p in enumerate(phases) if p and (i == 0 or p != phases[i - 1])]
