"""`make e2e-cluster`: the watcher against a real cluster named by KUBECONFIG (kind on a laptop, say);
skipped when KUBECONFIG is unset.

The cluster gets the project's CRD and RBAC (`kubectl apply -f packaging/kubernetes/...`, so the
KUBECONFIG user must be allowed to install them). The watcher runs in this process as the agent would, with
the agent's rights only — it impersonates a user in group unbounded-agent-daemons — for a machine name of
its own (e2e-<random>), so nothing of a real machine is touched. The host side is the queue: the watcher
submits real request files to a real spool in a temporary directory, and the test plays the dispatcher on
the other side of it (watcher_fakes.FakeDispatcher), answering with results and the reset's gate. This
checks what the cluster sees (statuses, conditions, Events, columns, RBAC, field selectors, TTL), not the
host; the test-host tests (tests/host/test_mop_*.py) check the host.
Everything the tests create is deleted at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from pathlib import Path

import pytest
from waiting import wait_until
from watcher_fakes import FakeDispatcher

from unbounded_agent import config
from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import watcher
from unbounded_agent.queue.spool import Spool

REPO = Path(__file__).resolve().parents[2]
KUBECTL = os.environ.get("KUBECTL", "/usr/bin/kubectl")
URL = "https://releases.example.com/unbounded-agent-linux-amd64.tar.gz"
WAIT = 60.0  # a bound on waits only; nothing asserts how long anything took

# Opt-in twice: a KUBECONFIG left in a developer's shell must never turn `make test` into writes to a
# real cluster; `make e2e-cluster` sets UNBOUNDED_E2E_CLUSTER.
pytestmark = pytest.mark.skipif(not (os.environ.get("KUBECONFIG") and os.environ.get("UNBOUNDED_E2E_CLUSTER")),
                                reason="no cluster to test: run `make e2e-cluster` with KUBECONFIG set")


def wait_for(what: str, fn):
    return wait_until(what, fn, WAIT, 0.2)


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([KUBECTL, *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {r.stderr}")
    return r


class Cluster:
    def __init__(self, tmp: Path):
        self.machine = f"e2e-{secrets.token_hex(3)}"
        self.names: list[str] = []
        self.cfg = config.Config(machine_name=self.machine, kubeconfig=os.environ["KUBECONFIG"].split(":")[0],
                                 bin_dir=tmp / "bin", state_dir=tmp / "state")
        self.spool = Spool(tmp / "ops")
        self.dispatcher = FakeDispatcher(self.spool, self.cfg)
        self.watcher: watcher.Watcher | None = None
        self.thread: threading.Thread | None = None

    def agent_client(self) -> kubeclient.Kube:
        kube = kubeclient.build(self.cfg.kubeconfig)
        kube.api.set_default_header("Impersonate-User", f"unbounded-agent:{self.machine}")
        kube.api.set_default_header("Impersonate-Group", "unbounded-agent-daemons")
        return kube

    def start(self) -> None:
        w = self.watcher = watcher.Watcher(self.cfg, client_factory=self.agent_client, spool=self.spool, tick=0.2)
        self.thread = threading.Thread(target=w.run, daemon=True)
        self.thread.start()
        wait_for("the first list", lambda: w.synced)

    def apply(self, name: str, kind: str, machine: str | None = None, ttl: int | None = None, **params) -> None:
        spec = {"machineRef": machine or self.machine, "operationKind": kind}
        if params:
            spec["parameters"] = params
        if ttl is not None:
            spec["ttlSecondsAfterFinished"] = ttl
        manifest = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation",
                    "metadata": {"name": name}, "spec": spec}
        self.names.append(name)
        r = subprocess.run([KUBECTL, "apply", "-f", "-"], input=json.dumps(manifest), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    def get(self, name: str) -> dict | None:
        r = kubectl("get", "mop", name, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def phase(self, name: str) -> str:
        return ((self.get(name) or {}).get("status") or {}).get("phase") or ""

    def condition(self, name: str) -> dict:
        return next(c for c in self.get(name)["status"]["conditions"] if c["type"] == "Completed")

    def operation(self, name: str) -> str:
        """What the watcher calls name on the host (the request's operation): <name>@<uid prefix>."""
        return f"{name}@{self.get(name)['metadata']['uid'][:8]}"

    def cleanup(self) -> None:
        if self.watcher:
            self.watcher.stop()
            self.thread.join(30)
        for name in self.names:
            kubectl("delete", "mop", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kubectl("apply", "-f", str(REPO / "packaging" / "kubernetes" / "crd-machineoperations.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/machineoperations.unbounded-cloud.io", "--timeout=60s")
    kubectl("apply", "-f", str(REPO / "packaging" / "kubernetes" / "rbac.yaml"))
    c = Cluster(tmp_path_factory.mktemp("e2e-cluster"))
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


def test_columns_are_those_of_the_docs(cluster):
    cluster.apply(f"{cluster.machine}-columns", "HostReboot")  # never touched by the agent
    header = kubectl("get", "mop", f"{cluster.machine}-columns").stdout.splitlines()[0].split()
    assert header == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]


def test_upgrade_goes_pending_inprogress_complete(cluster):
    name = f"{cluster.machine}-upgrade"
    cluster.apply(name, "AgentUpgrade", downloadURL=URL + "?sig=secret")
    wait_for("InProgress", lambda: cluster.phase(name) == "InProgress")
    req = cluster.dispatcher.wait_request(cluster.operation(name))
    # the host gets the URL as asked (its signed query included); the cluster never sees the secret
    assert (req.kind, req.source, req.url) == ("upgrade", "machineoperation", URL + "?sig=secret")
    assert cluster.phase(name) == "InProgress"  # nothing is Complete before the host's result
    cluster.dispatcher.succeed(req, "upgraded from 1.0.0 to 2.0.0")
    wait_for("Complete", lambda: cluster.phase(name) == "Complete")
    cond = cluster.condition(name)
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "Succeeded", "upgraded from 1.0.0 to 2.0.0")
    # Events are written beside the status, not with it: wait for them (the wait fails if they never come)
    events = wait_for("the Accepted and UpgradeStarted Events in kubectl describe",
                      lambda: (out := kubectl("describe", "mop", name).stdout.partition("\nEvents:")[2])
                      and "Accepted" in out and "UpgradeStarted" in out and out)
    assert "secret" not in json.dumps(cluster.get(name)["status"]) and "secret" not in events


def test_invalid_and_unsupported_fail_at_once(cluster):
    submitted = set(cluster.dispatcher.submitted())
    cluster.apply(f"{cluster.machine}-nourl", "AgentUpgrade")
    cluster.apply(f"{cluster.machine}-reboot", "NodeReboot")
    wait_for("both to fail", lambda: cluster.phase(f"{cluster.machine}-nourl") == "Failed"
             and cluster.phase(f"{cluster.machine}-reboot") == "Failed")
    assert cluster.condition(f"{cluster.machine}-nourl")["reason"] == "InvalidParameters"
    assert cluster.condition(f"{cluster.machine}-reboot")["reason"] == "UnsupportedOperation"
    assert set(cluster.dispatcher.submitted()) == submitted  # the host was never asked


def test_other_machines_operations_are_untouched(cluster):
    other = f"{cluster.machine}-other"
    cluster.apply(other, "AgentReset", machine=f"{cluster.machine}-elsewhere")
    marker = f"{cluster.machine}-marker"
    cluster.apply(marker, "NodeReboot")
    # the marker was created after the other operation: once it failed, the watcher is past the other one
    wait_for("the marker to fail", lambda: cluster.phase(marker) == "Failed")
    assert (cluster.get(other) or {}).get("status") in (None, {}, {"phase": "Pending"})  # at most the default
    assert not cluster.dispatcher.submitted(cluster.operation(other))


def test_ttl_deletes_the_finished_operation(cluster):
    name = f"{cluster.machine}-ttl"
    cluster.apply(name, "NodeReboot", ttl=0)
    wait_for("the operation to be deleted", lambda: cluster.get(name) is None)


def test_reset_reports_complete_before_its_final_steps(cluster):
    name = f"{cluster.machine}-reset"
    cluster.apply(name, "AgentReset")
    req = cluster.dispatcher.wait_request(cluster.operation(name))
    assert (req.kind, req.source, req.report_gate) == ("reset", "machineoperation", True)
    cluster.dispatcher.open_gate(req)  # phase 1 done: the agent (and this daemon) is removed next
    wait_for("the gate's ack", lambda: cluster.dispatcher.acked(req))
    # what the cluster had when the reset was let go on to remove the agent
    assert cluster.phase(name) == "Complete"
    cond = cluster.condition(name)
    assert (cond["status"], cond["reason"]) == ("True", "Succeeded")
    cluster.dispatcher.succeed(req, "AgentReset completed")  # phase 2: in real life the daemon is gone now
