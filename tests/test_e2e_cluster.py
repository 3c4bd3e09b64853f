"""`make e2e-cluster`: the watcher against a real cluster named by KUBECONFIG (kind on a laptop, say);
skipped when KUBECONFIG is unset.

The cluster gets the project's CRD and RBAC (`kubectl apply -f packaging/kubernetes/...`, so the
KUBECONFIG user must be allowed to install them). The watcher runs in this process as the agent would, with
the agent's rights only — it impersonates a user in group unbounded-agent-daemons — for a machine name of
its own (e2e-<random>), so nothing of a real machine is touched. The host side is the fake of
operations.py: this checks what the cluster sees (statuses, conditions, Events, columns, RBAC,
field selectors, TTL), not the host; the test-host tests (test_mop_*.py) check the host.
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

from watcher_fakes import FakeOps, wait_for
from unbounded_agent import config, kubeclient, mop, watcher

REPO = Path(__file__).resolve().parent.parent
KUBECTL = os.environ.get("KUBECTL", "/usr/bin/kubectl")
URL = "https://releases.example.com/unbounded-agent-linux-amd64.tar.gz"

# Opt-in twice: a KUBECONFIG left in a developer's shell must never turn `make test` into writes to a
# real cluster; `make e2e-cluster` sets UNBOUNDED_E2E_CLUSTER.
pytestmark = pytest.mark.skipif(not (os.environ.get("KUBECONFIG") and os.environ.get("UNBOUNDED_E2E_CLUSTER")),
                                reason="no cluster to test: run `make e2e-cluster` with KUBECONFIG set")


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([KUBECTL, *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {r.stderr}")
    return r


class Cluster:
    def __init__(self, tmp: Path):
        self.machine = f"e2e-{secrets.token_hex(3)}"
        self.names: list[str] = []
        self.ops = FakeOps()
        self.cfg = config.Config(machine_name=self.machine, kubeconfig=os.environ["KUBECONFIG"].split(":")[0],
                                 bin_dir=tmp / "bin", state_dir=tmp / "state")
        self.watcher: watcher.Watcher | None = None

    def agent_client(self) -> kubeclient.Kube:
        kube = kubeclient.build(self.cfg.kubeconfig)
        kube.api.set_default_header("Impersonate-User", f"unbounded-agent-{self.machine}")
        kube.api.set_default_header("Impersonate-Group", "unbounded-agent-daemons")
        return kube

    def start(self) -> None:
        self.watcher = watcher.Watcher(self.cfg, client_factory=self.agent_client, ops=self.ops, tick=0.2)
        threading.Thread(target=self.watcher.run, daemon=True).start()
        wait_for("the first list", lambda: self.watcher.synced, timeout=60)

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
        return f"{name}@{self.get(name)['metadata']['uid'][:8]}"

    def cleanup(self) -> None:
        if self.watcher:
            self.watcher.stop()
        for name in self.names:
            kubectl("delete", "mop", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kubectl("apply", "-f", str(REPO / "packaging" / "kubernetes" / "crd-machineoperations.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/machineoperations.unbounded-cloud.io", "--timeout=60s")
    kubectl("apply", "-f", str(REPO / "packaging" / "kubernetes" / "rbac.yaml"))
    c = Cluster(tmp_path_factory.mktemp("e2e-cluster"))
    c.start()
    yield c
    c.cleanup()


def test_columns_are_those_of_the_docs(cluster):
    cluster.apply(f"{cluster.machine}-columns", "HostReboot")  # never touched by the agent
    header = kubectl("get", "mop", f"{cluster.machine}-columns").stdout.splitlines()[0].split()
    assert header == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]


def test_upgrade_goes_pending_inprogress_complete(cluster):
    name = f"{cluster.machine}-upgrade"
    cluster.apply(name, "AgentUpgrade", downloadURL=URL + "?sig=secret")
    wait_for("InProgress", lambda: cluster.phase(name) == "InProgress", timeout=60)
    wait_for("the upgrade to start", lambda: cluster.ops.count("start_upgrade"), timeout=60)
    cluster.ops.set_upgrade(cluster.operation(name), "committed", ok=True, message="upgraded from 1 to 2")
    wait_for("Complete", lambda: cluster.phase(name) == "Complete", timeout=60)
    cond = cluster.condition(name)
    assert (cond["status"], cond["reason"]) == ("True", "Succeeded")
    describe = kubectl("describe", "mop", name).stdout
    assert "Accepted" in describe and "UpgradeStarted" in describe
    assert "secret" not in json.dumps(cluster.get(name)["status"])


def test_invalid_and_unsupported_fail_at_once(cluster):
    cluster.apply(f"{cluster.machine}-nourl", "AgentUpgrade")
    cluster.apply(f"{cluster.machine}-reboot", "NodeReboot")
    wait_for("both to fail", lambda: cluster.phase(f"{cluster.machine}-nourl") == "Failed"
             and cluster.phase(f"{cluster.machine}-reboot") == "Failed", timeout=60)
    assert cluster.condition(f"{cluster.machine}-nourl")["reason"] == "InvalidParameters"
    assert cluster.condition(f"{cluster.machine}-reboot")["reason"] == "UnsupportedOperation"


def test_other_machines_operations_are_untouched(cluster):
    other = f"{cluster.machine}-other"
    cluster.apply(other, "AgentReset", machine=f"{cluster.machine}-elsewhere")
    marker = f"{cluster.machine}-marker"
    cluster.apply(marker, "NodeReboot")
    wait_for("the marker to fail", lambda: cluster.phase(marker) == "Failed", timeout=60)
    assert not (cluster.get(other) or {}).get("status")


def test_ttl_deletes_the_finished_operation(cluster):
    name = f"{cluster.machine}-ttl"
    cluster.apply(name, "NodeReboot", ttl=0)
    wait_for("the operation to be deleted", lambda: cluster.get(name) is None, timeout=60)


def test_reset_reports_complete_before_its_final_steps(cluster):
    name = f"{cluster.machine}-reset"
    cluster.apply(name, "AgentReset")
    wait_for("the final steps", lambda: cluster.ops.count("start_reset_phase2"), timeout=60)
    assert cluster.phase(name) == "Complete"
