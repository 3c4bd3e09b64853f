"""Per-machine authorization (packaging/kubernetes/admission-policy.yaml), applied with kubectl to the test API
server, which evaluates its CEL as kube-apiserver does (kube_admission.py). worker-01's agent — a client
certificate with CN=unbounded-agent:worker-01, O=unbounded-agent-daemons — has the rights of the ClusterRole
(`kubectl auth can-i` says so), but cannot speak for worker-02: a forged status write, a TTL delete or a Machine
patch for another machine is denied with a 403 naming the policy, while everything the agent itself writes
passes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kube_apiserver import start_apiserver
from watcher_fakes import AGENT, AGENT_GROUP, MACHINE, Harness, wait_for

from unbounded_agent.kube import client as kubeclient

MANIFESTS = Path(__file__).resolve().parents[2] / "packaging" / "kubernetes"
KUBECTL = shutil.which("kubectl")
POLICY = "unbounded-agent-own-machine"
DENIED = f"ValidatingAdmissionPolicy '{POLICY}' with binding '{POLICY}' denied request"

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


class Kubectl:
    def __init__(self, kubeconfig, home: Path):
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig), HOME=str(home))
        self.env.pop("KUBECACHEDIR", None)

    def __call__(self, *args, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([KUBECTL, *map(str, args)], env=self.env, capture_output=True, text=True, timeout=60,
                           input=stdin)
        if check and r.returncode:
            raise AssertionError(f"kubectl {' '.join(map(str, args))}: {r.stdout}{r.stderr}")
        return r


def operation(name: str, machine: str) -> dict:
    return {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation", "metadata": {"name": name},
            "spec": {"machineRef": machine, "operationKind": "AgentReset"}}


def machine(name: str) -> dict:
    return {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
            "metadata": {"name": name, "labels": {"pool": "a"}}, "spec": {"providerID": f"test://{name}"}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A TLS server with the CRD, RBAC and the policy applied by kubectl; kubectl as admin and as worker-01."""
    tmp = tmp_path_factory.mktemp("policy")
    srv = start_apiserver(tls=True)
    admin = Kubectl(srv.kubeconfig(tmp / "admin"), tmp)
    for manifest in ("rbac.yaml", "admission-policy.yaml"):
        admin("apply", "-f", MANIFESTS / manifest)
    crt, key, _ = srv.issue_client_cert(tmp, AGENT, [AGENT_GROUP])
    worker1 = Kubectl(srv.kubeconfig(tmp / "worker-01", user=AGENT,
                                     credential={"client-certificate": crt, "client-key": key}), tmp)
    for name in ("worker-01", "worker-02"):
        admin("apply", "-f", "-", stdin=json.dumps(machine(name)))
        admin("apply", "-f", "-", stdin=json.dumps(operation(f"reset-{name}", name)))
    yield srv, admin, worker1, tmp
    srv.stop()


def test_the_policy_and_its_binding_are_served_as_kubectl_applied_them(cluster):
    _, admin, _, _ = cluster
    out = admin("get", "validatingadmissionpolicies,validatingadmissionpolicybindings").stdout
    assert POLICY in out and "validatingadmissionpolicybinding" in out


def test_auth_can_i_shows_the_role_the_policy_narrows(cluster):
    """RBAC cannot tell machines apart: worker-01 may update any operation's status as far as RBAC goes."""
    _, _, worker1, _ = cluster
    assert worker1("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout == AGENT
    for args, answer in ((("update", "machineoperations/reset-worker-01", "--subresource=status"), "yes"),
                         (("update", "machineoperations/reset-worker-02", "--subresource=status"), "yes"),
                         (("patch", "machines/worker-02"), "yes"),
                         (("update", "machineoperations/reset-worker-02"), "no"),
                         (("create", "machineoperations"), "no"),
                         (("patch", "machines/worker-02", "--subresource=status"), "no")):
        r = worker1("auth", "can-i", *args, check=False)
        assert r.stdout.strip() == answer, (args, r.stdout, r.stderr)


def test_a_forged_status_write_for_another_machine_is_denied_naming_the_policy(cluster):
    _, admin, worker1, _ = cluster
    forged = '{"status": {"phase": "Complete", "message": "AgentReset completed"}}'
    r = worker1("patch", "mop", "reset-worker-02", "--subresource=status", "--type=merge", "-p", forged, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        'Error from server (Forbidden): machineoperations.unbounded-cloud.io "reset-worker-02" is forbidden: '
        f"{DENIED}: user {AGENT} may report only on the MachineOperations of its own machine, and "
        "reset-worker-02 is not one of them")
    assert admin("get", "mop", "reset-worker-02", "-o", "jsonpath={.status.phase}").stdout == "Pending"
    # its own passes
    worker1("patch", "mop", "reset-worker-01", "--subresource=status", "--type=merge", "-p",
            '{"status": {"phase": "InProgress", "message": "resetting unbounded agent"}}')
    # so does a delete of its own, and not of another's
    r = worker1("delete", "mop", "reset-worker-02", check=False)
    assert r.returncode == 1 and "(Forbidden)" in r.stderr and DENIED in r.stderr


def test_only_the_agent_version_annotation_of_its_own_machine(cluster):
    _, admin, worker1, _ = cluster
    mine = {"metadata": {"annotations": {"unbounded-cloud.io/agent-version": "2.0.0"}}}
    worker1("patch", "machine", "worker-01", "--type=merge", "-p", json.dumps(mine))
    r = worker1("patch", "machine", "worker-02", "--type=merge", "-p", json.dumps(mine), check=False)
    assert r.returncode == 1 and DENIED in r.stderr and "only the Machine of its own name" in r.stderr
    for change in ({"metadata": {"labels": {"pool": "b"}}}, {"spec": {"providerID": "test://elsewhere"}},
                   {"metadata": {"annotations": {"other": "x"}}}, {"metadata": {"finalizers": ["x.io/keep"]}}):
        r = worker1("patch", "machine", "worker-01", "--type=merge", "-p", json.dumps(change), check=False)
        assert r.returncode == 1 and DENIED in r.stderr and "only the unbounded-cloud.io/agent-version" in r.stderr
    got = json.loads(admin("get", "machine", "worker-01", "-o", "json").stdout)
    assert got["metadata"]["labels"] == {"pool": "a"} and got["spec"] == {"providerID": "test://worker-01"}
    assert got["metadata"]["annotations"]["unbounded-cloud.io/agent-version"] == "2.0.0"
    assert set(got["metadata"]["annotations"]) == {"unbounded-cloud.io/agent-version",
                                                   "kubectl.kubernetes.io/last-applied-configuration"}
    # the admin (not in the agents' group) is not concerned
    admin("label", "machine", "worker-02", "pool=b", "--overwrite")


def test_an_agent_whose_name_does_not_follow_the_convention_may_write_nothing(cluster):
    srv, _, _, tmp = cluster
    crt, key, _ = srv.issue_client_cert(tmp, "worker-01", [AGENT_GROUP], name="unconventional")
    odd = Kubectl(srv.kubeconfig(tmp / "odd", user="odd", credential={"client-certificate": crt,
                                                                       "client-key": key}), tmp)
    r = odd("patch", "mop", "reset-worker-01", "--subresource=status", "--type=merge", "-p",
            '{"status": {"message": "x"}}', check=False)
    assert r.returncode == 1 and DENIED in r.stderr


def test_the_agents_own_writes_pass_the_policy(tmp_path):
    """A whole upgrade and reset through the watcher, with the policy installed: every write is its own."""
    with Harness(tmp_path, client_cert=True, policy=True) as h:
        h.admin.request("POST", kubeclient.MACHINE_PATH, content_type="application/json",
                        body={"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                              "metadata": {"name": MACHINE}, "spec": {}})
        h.start()
        h.create("up", "AgentUpgrade", downloadURL="https://releases.example.com/a.tar.gz", ttl=0)
        h.finish_upgrade("up")
        wait_for("the TTL delete", lambda: h.get("up") is None)
        h.create("reset", "AgentReset")
        h.finish_reset("reset")
        h.wait_phase("reset", "Complete")
        wait_for("the annotation", lambda: h.agent_requests(verb="patch", resource="machines"))
        writes = [r for r in h.agent_requests() if r.verb in ("update", "patch", "delete")]
        assert {r.resource for r in writes} == {"machineoperations/status", "machines", "machineoperations"}
        assert all(r.code == 200 for r in writes), [str(r) for r in writes]


def test_the_policy_document_is_valid_yaml_with_a_binding():
    docs = list(yaml.safe_load_all((MANIFESTS / "admission-policy.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    assert docs[1]["spec"] == {"policyName": POLICY, "validationActions": ["Deny"]}
    assert all(v.get("reason") == "Forbidden" for v in docs[0]["spec"]["validations"])
