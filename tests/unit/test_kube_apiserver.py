"""The Kubernetes manifests, and the test API server (kube_apiserver.py) checked against kubectl and the
`kubernetes` Python client: it must behave as a real API server does, since the watcher is tested against it
and must work unchanged against a real cluster.

kubectl here is Google Cloud SDK's dispatcher: it runs the kubectl whose minor version matches the server's
(/version). So these tests exercise the kubectl for DEFAULT_VERSION (1.32), and a smoke test the others.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import kube_admission
import kube_apiserver
import pytest
import urllib3
import yaml
from kube_apiserver import MANIFESTS, start_apiserver
from kubernetes import client, config, watch

KUBECTL = shutil.which("kubectl")
G, V, P = "unbounded-cloud.io", "v1alpha3", "machineoperations"
CRD_PATH = MANIFESTS / "crd-machineoperations.yaml"
RBAC_PATH = MANIFESTS / "rbac.yaml"
UPGRADE_EXAMPLE = MANIFESTS / "examples" / "upgrade-agent-worker-01.yaml"
RESET_EXAMPLE = MANIFESTS / "examples" / "reset-agent-worker-01.yaml"
POOL_EXAMPLE = MANIFESTS / "examples" / "upgrade-agent-pool-blue.yaml"
AGENT_GROUP = "unbounded-agent-daemons"
REPO_BIN = MANIFESTS.parents[1] / "bin"

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
_names = itertools.count(1)


# ---------------------------------------------------------------------------------------------------------
# Helpers and fixtures

def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def operation(name: str, machine: str = "worker-01", kind: str = "AgentUpgrade", **spec) -> dict:
    spec = {"machineRef": machine, "operationKind": kind, **spec}
    if kind == "AgentUpgrade":
        spec.setdefault("parameters", {"downloadURL": "https://example.com/unbounded-agent-linux-amd64.tar.gz"})
    return {"apiVersion": f"{G}/{V}", "kind": "MachineOperation", "metadata": {"name": name}, "spec": spec}


def unique(prefix: str = "op") -> str:
    return f"{prefix}-{next(_names)}"


def error_body(e: client.ApiException) -> dict:
    return json.loads(e.body)


class Kubectl:
    """kubectl with its own kubeconfig and HOME (so a fresh discovery cache per server)."""

    def __init__(self, kubeconfig: str, home: Path):
        self.env = dict(os.environ, KUBECONFIG=kubeconfig, HOME=str(home))
        self.env.pop("KUBECACHEDIR", None)

    def __call__(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([KUBECTL, *map(str, args)], env=self.env, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(map(str, args))} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen([KUBECTL, *map(str, args)], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


class LineReader:
    """Collects a process's output lines in a thread; wait_for() waits (bounded) until a line matches."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines, self.changed = process, [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, pattern: str, limit: float = 20.0) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: any(re.search(pattern, line) for line in self.lines), timeout=limit)
            return list(self.lines)


def wait_until(predicate, limit: float = 20.0) -> None:
    """Wait (bounded) for something another process does; the assertion that follows says what failed."""
    deadline = time.monotonic() + limit
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server():
    # Bookmarks every 0.2 s instead of every minute, so a test sees one without waiting.
    srv = start_apiserver(bookmark_interval=0.2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin_kubeconfig(server, tmp_path_factory) -> str:
    return server.kubeconfig(tmp_path_factory.mktemp("kube") / "admin.kubeconfig")


@pytest.fixture(scope="module")
def kubectl(admin_kubeconfig, tmp_path_factory) -> Kubectl:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return Kubectl(admin_kubeconfig, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def api_client(admin_kubeconfig) -> client.ApiClient:
    return config.new_client_from_config(admin_kubeconfig)


@pytest.fixture(scope="module")
def api(api_client) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def op(api):
    """A fresh AgentUpgrade operation for worker-01, created through the API."""
    return api.create_cluster_custom_object(G, V, P, operation(unique()))


def set_phase(api, name: str, phase: str) -> dict:
    return api.patch_cluster_custom_object_status(G, V, P, name, {"status": {"phase": phase}})


# ---------------------------------------------------------------------------------------------------------
# The manifests

def walk_schema(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk_schema(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk_schema(schema["additionalProperties"], f"{path}.*")
    if schema.get("items"):
        yield from walk_schema(schema["items"], f"{path}[]")


def test_crd_names_version_and_columns():
    [crd] = load(CRD_PATH)
    assert (crd["apiVersion"], crd["kind"]) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == "machineoperations." + G
    assert spec["names"] == {"kind": "MachineOperation", "listKind": "MachineOperationList",
                             "plural": "machineoperations", "singular": "machineoperation", "shortNames": ["mop"]}
    assert spec["scope"] == "Cluster"
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (V, True, True)
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["jsonPath"], c.get("priority", 0)) for c in version["additionalPrinterColumns"]]
    # The docs' order: NAME (implicit) KIND MACHINE PHASE AGE; REASON only with -o wide.
    assert [c for c in columns if c[2] == 0] == [("Kind", ".spec.operationKind", 0), ("Machine", ".spec.machineRef", 0),
                                                 ("Phase", ".status.phase", 0),
                                                 ("Age", ".metadata.creationTimestamp", 0)]
    assert [c[0] for c in columns if c[2] == 1] == ["Reason", "Rollout"]  # Rollout: a fan-out parent's counts
    assert version["selectableFields"] == [{"jsonPath": ".spec.machineRef"}]


def test_crd_schema_is_structural_and_validates_the_spec():
    [crd] = load(CRD_PATH)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk_schema(schema):
        # Structural: every node has a type, and an object is either a struct or a map, not both.
        assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
        assert not ("properties" in node and "additionalProperties" in node), path
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["operationKind"]
    assert spec["properties"]["operationKind"]["enum"] == [
        "NodeReboot", "AgentUpgrade", "AgentReset", "HostReboot", "HostPowerOff", "HostPowerOn", "HostReplace"]
    assert spec["properties"]["parameters"]["additionalProperties"] == {"type": "string", "maxLength": 8192}
    assert spec["properties"]["ttlSecondsAfterFinished"] == {**spec["properties"]["ttlSecondsAfterFinished"],
                                                             "type": "integer", "format": "int32", "minimum": 0}
    assert spec["properties"]["machineSelector"]["x-kubernetes-map-type"] == "atomic"


def test_crd_status_has_the_fields_the_agent_writes():
    [crd] = load(CRD_PATH)
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    # The upstream status fields (so status written for the upstream CRD is kept here too) plus the reason mirror;
    # targets: the fan-out controller's per-machine record (upstream's, with the wave added).
    assert set(status) == {"phase", "message", "reason", "startedAt", "completedAt", "observedMachineGeneration",
                           "conditions", "targets"}
    targets = status["targets"]
    assert (targets["x-kubernetes-list-type"], targets["x-kubernetes-list-map-keys"]) == ("map", ["machineRef"])
    assert set(targets["items"]["properties"]) == {"machineRef", "wave", "phase", "message"}
    assert status["startedAt"]["format"] == status["completedAt"]["format"] == "date-time"
    conditions = status["conditions"]
    assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == ("map", ["type"])
    condition = conditions["items"]
    assert sorted(condition["required"]) == ["lastTransitionTime", "message", "reason", "status", "type"]
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_rbac_grants_the_watcher_exactly_what_it_needs():
    role, binding = load(RBAC_PATH)
    assert (role["kind"], role["metadata"]["name"]) == ("ClusterRole", "unbounded-agent")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == {
        *((G, "machineoperations", v) for v in ("get", "list", "watch", "delete")),
        *((G, "machineoperations/status", v) for v in ("get", "update", "patch")),
        *((g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")),
        *((G, "machines", v) for v in ("get", "patch")),
    }
    assert not any("*" in str(rule) or rule.get("resourceNames") for rule in role["rules"])
    assert binding["kind"] == "ClusterRoleBinding"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "unbounded-agent"}
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP}]


def test_every_rbac_rule_says_why():
    lines = RBAC_PATH.read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("- apiGroups:")]
    assert len(rules) == 5
    for i in rules:
        assert lines[i - 1].startswith("#"), f"no comment above {lines[i]!r}"


def test_examples_are_valid_operations():
    upgrade, = load(UPGRADE_EXAMPLE)
    reset, = load(RESET_EXAMPLE)
    assert (upgrade["metadata"]["name"], upgrade["spec"]["operationKind"]) == ("upgrade-agent-worker-01",
                                                                               "AgentUpgrade")
    assert set(upgrade["spec"]["parameters"]) == {"downloadURL", "sha256"}
    assert all(isinstance(v, str) for v in upgrade["spec"]["parameters"].values())  # a map of strings
    assert re.fullmatch(r"[0-9a-f]{64}", upgrade["spec"]["parameters"]["sha256"])
    assert upgrade["spec"]["ttlSecondsAfterFinished"] > 0
    assert (reset["metadata"]["name"], reset["spec"]) == ("reset-agent-worker-01",
                                                          {"machineRef": "worker-01", "operationKind": "AgentReset"})
    pool, = load(POOL_EXAMPLE)
    assert set(pool["spec"]) == {"machineSelector", "operationKind", "parameters", "ttlSecondsAfterFinished"}
    assert set(pool["spec"]["parameters"]) == {"downloadURL", "sha256", "canaryCount", "maxInFlight", "failureBudget"}
    assert all(isinstance(v, str) for v in pool["spec"]["parameters"].values())
    [crd] = load(CRD_PATH)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for example in (upgrade, reset, pool):
        errors = []
        kube_apiserver.validate(schema["properties"]["spec"], example["spec"], "spec", errors)
        assert errors == []
        assert kube_admission.crd_rule_failures(schema, example, None) == []


# ---------------------------------------------------------------------------------------------------------
# kubectl against the server

def test_kubectl_runs_the_version_matching_the_server(kubectl, server):
    out = kubectl("version").stdout
    assert f"Server Version: v{server.version}" in out
    # The dispatcher asks /version, then runs kubectl 1.32.x (kubectl's own requests say so).
    agents = {r.user_agent.split(" ")[0] for r in server.find_requests(path="/version")}
    assert "kubectl-dispatcher/v1.0" in agents
    assert any(a.startswith("kubectl/v1.32.") for a in agents)


def test_apply_creates_then_reports_unchanged(kubectl, server, api):
    server.clear_requests()
    assert kubectl("apply", "-f", UPGRADE_EXAMPLE).stdout.strip() == \
        "machineoperation.unbounded-cloud.io/upgrade-agent-worker-01 created"
    # Plain apply: the OpenAPI document told kubectl the server validates, so it asked for strict validation.
    [create] = server.find_requests(verb="create", resource=P)
    assert (create.code, create.query.get("fieldValidation")) == (201, "Strict")
    obj = api.get_cluster_custom_object(G, V, P, "upgrade-agent-worker-01")
    meta = obj["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert "kubectl.kubernetes.io/last-applied-configuration" in meta["annotations"]

    server.clear_requests()
    assert kubectl("apply", "-f", UPGRADE_EXAMPLE).stdout.strip() == \
        "machineoperation.unbounded-cloud.io/upgrade-agent-worker-01 unchanged"
    assert server.count(verb="get", resource=P) == 1
    assert server.count(verb="patch") + server.count(verb="create") + server.count(verb="update") == 0


def test_apply_of_a_changed_file_patches_the_spec(kubectl, api, tmp_path):
    name = unique("apply")
    path = tmp_path / "op.yaml"
    path.write_text(yaml.safe_dump(operation(name, ttlSecondsAfterFinished=60)))
    kubectl("apply", "-f", path)
    path.write_text(yaml.safe_dump(operation(name, ttlSecondsAfterFinished=120)))
    assert kubectl("apply", "-f", path).stdout.strip() == f"machineoperation.unbounded-cloud.io/{name} configured"
    obj = api.get_cluster_custom_object(G, V, P, name)
    assert (obj["spec"]["ttlSecondsAfterFinished"], obj["metadata"]["generation"]) == (120, 2)


def test_get_prints_the_columns_of_the_docs(kubectl, api):
    name = unique("cols")
    api.create_cluster_custom_object(G, V, P, operation(name, machine="worker-07", kind="AgentReset"))
    lines = kubectl("get", "mop", name).stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]
    # Pending before anyone wrote a status: the CRD's default
    assert re.fullmatch(rf"{name}\s+AgentReset\s+worker-07\s+Pending\s+\d+s", lines[1])

    set_phase(api, name, "Failed")
    condition = {"type": "Completed", "status": "False", "reason": "ExecutionFailed", "message": "step 2 failed",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"}
    api.patch_cluster_custom_object_status(G, V, P, name, {"status": {"conditions": [condition]}})
    wide = kubectl("get", "mop", name, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "KIND", "MACHINE", "PHASE", "AGE", "REASON", "ROLLOUT"]
    # ROLLOUT is a fan-out parent's: empty for one machine's operation
    assert wide[1].split()[-1] == "ExecutionFailed" and wide[1].split()[3] == "Failed"


def test_get_watch_shows_phase_changes_made_through_the_status_subresource(kubectl, server, api):
    name = unique("watch")
    api.create_cluster_custom_object(G, V, P, operation(name))
    watches = server.count(verb="watch", resource=P)
    process = kubectl.popen("get", "mop", name, "-w")
    try:
        output = LineReader(process)
        wait_until(lambda: server.count(verb="watch", resource=P) > watches)
        for phase in ("InProgress", "Complete"):
            set_phase(api, name, phase)
        lines = output.wait_for(rf"{name}.*Complete")
    finally:
        process.kill()
        process.wait()
    assert lines[0].split() == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]
    phases = [line.split()[3] if len(line.split()) == 5 else "" for line in lines[1:]]
    # The first row is the GET (Pending: the CRD's default); the watch's synthetic ADDED for the same object is
    # dropped by kubectl.
    assert phases == ["Pending", "InProgress", "Complete"], lines


def test_invalid_operation_kind_is_rejected_with_a_clear_error(kubectl, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(operation("bad-kind", kind="Reboot", ttlSecondsAfterFinished=-5)))
    result = kubectl("apply", "-f", path, check=False)
    assert result.returncode == 1
    assert 'The MachineOperation "bad-kind" is invalid' in result.stderr
    assert 'spec.operationKind: Unsupported value: "Reboot": supported values: "NodeReboot", "AgentUpgrade", ' \
           '"AgentReset", "HostReboot", "HostPowerOff", "HostPowerOn", "HostReplace"' in result.stderr
    assert "spec.ttlSecondsAfterFinished: Invalid value: -5: spec.ttlSecondsAfterFinished in body should be " \
           "greater than or equal to 0" in result.stderr
    assert kubectl("get", "mop", "bad-kind", check=False).returncode == 1


def test_unknown_field_is_rejected_strictly_and_pruned_otherwise(kubectl, api, tmp_path):
    path = tmp_path / "typo.yaml"
    doc = operation("typo", kind="AgentReset")
    doc["spec"]["paramters"] = {"a": "b"}
    path.write_text(yaml.safe_dump(doc))
    result = kubectl("apply", "-f", path, check=False)
    assert result.returncode == 1
    assert 'strict decoding error: unknown field "spec.paramters"' in result.stderr
    # --validate=warn: created, the server warns, and the unknown field is pruned as by a real server.
    result = kubectl("apply", "-f", path, "--validate=warn")
    assert 'Warning: unknown field "spec.paramters"' in result.stderr
    assert "paramters" not in api.get_cluster_custom_object(G, V, P, "typo")["spec"]


def test_describe_shows_the_events_of_the_operation(kubectl, api, api_client, op):
    name, uid = op["metadata"]["name"], op["metadata"]["uid"]
    ref = client.V1ObjectReference(api_version=f"{G}/{V}", kind="MachineOperation", name=name, uid=uid)
    now = kube_apiserver.now()
    # One event through each Event API: both land in one store, as on a real server.
    client.CoreV1Api(api_client).create_namespaced_event("default", client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=name + "."), involved_object=ref, reason="Started",
        message="staging the upgrade", type="Normal", first_timestamp=now, last_timestamp=now, count=1,
        source=client.V1EventSource(component="unbounded-agent", host="worker-01")))
    client.EventsV1Api(api_client).create_namespaced_event("default", client.EventsV1Event(
        metadata=client.V1ObjectMeta(generate_name=name + "."), regarding=ref, reason="Failed",
        note="download failed", type="Warning", action="Upgrade", event_time=now,
        reporting_controller="unbounded-cloud.io/agent", reporting_instance="worker-01"))
    other = client.V1ObjectReference(api_version=f"{G}/{V}", kind="MachineOperation", name="someone-else", uid="x")
    client.CoreV1Api(api_client).create_namespaced_event("default", client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="other."), involved_object=other, reason="Unrelated",
        message="not this one", type="Normal"))

    out = kubectl("describe", "mop", name).stdout
    events = out[out.index("Events:"):].splitlines()
    assert events[1].split() == ["Type", "Reason", "Age", "From", "Message"]
    rows = [line.split(None, 4) for line in events[3:] if line.strip()]
    assert sorted((r[0], r[1], r[3], r[4]) for r in rows) == [
        ("Normal", "Started", "unbounded-agent", "staging the upgrade"),
        ("Warning", "Failed", "unbounded-cloud.io/agent", "download failed")]


def test_delete(kubectl, op):
    name = op["metadata"]["name"]
    assert kubectl("delete", "mop", name).stdout.strip() == f'machineoperation.unbounded-cloud.io "{name}" deleted'
    result = kubectl("get", "mop", name, check=False)
    assert result.stderr.strip() == \
        f'Error from server (NotFound): machineoperations.unbounded-cloud.io "{name}" not found'


def test_kubectl_patch_needs_a_patch_type_for_custom_resources(kubectl, op):
    name = op["metadata"]["name"]
    # As on a real server: strategic merge patch is not supported for custom resources (415).
    result = kubectl("patch", "mop", name, "-p", '{"metadata":{"labels":{"a":"b"}}}', check=False)
    assert result.returncode == 1 and "application/strategic-merge-patch+json is not supported" in result.stderr
    kubectl("patch", "mop", name, "--type=merge", "-p", '{"metadata":{"labels":{"a":"b"}}}')
    kubectl("patch", "mop", name, "--subresource=status", "--type=json",
            "-p", '[{"op":"add","path":"/status","value":{"phase":"Complete"}}]')
    assert kubectl("get", "mop", name, "-o", "jsonpath={.metadata.labels.a}/{.status.phase}").stdout == "b/Complete"


def test_field_selector_on_machine_ref(kubectl, api):
    name = unique("sel")
    api.create_cluster_custom_object(G, V, P, operation(name, machine="worker-selected"))
    out = kubectl("get", "mop", "--field-selector", "spec.machineRef=worker-selected", "-o", "name").stdout
    assert out.split() == [f"machineoperation.unbounded-cloud.io/{name}"]
    result = kubectl("get", "mop", "--field-selector", "spec.nothing=x", check=False)
    assert "field label not supported: spec.nothing" in result.stderr


def test_crd_and_rbac_apply_like_on_a_cluster(kubectl):
    # The CRD is served from the start; applying it (as on a real cluster) is accepted.
    assert kubectl("apply", "-f", CRD_PATH).stdout.strip() == \
        "customresourcedefinition.apiextensions.k8s.io/machineoperations.unbounded-cloud.io configured"
    assert kubectl("apply", "-f", CRD_PATH).stdout.strip().endswith(" unchanged")
    kubectl("wait", "--for=condition=Established", "crd/machineoperations.unbounded-cloud.io", "--timeout=10s")
    out = kubectl("apply", "-f", RBAC_PATH).stdout.split("\n")
    assert out[:2] == ["clusterrole.rbac.authorization.k8s.io/unbounded-agent created",
                       "clusterrolebinding.rbac.authorization.k8s.io/unbounded-agent created"]
    can = lambda *a: kubectl("auth", "can-i", *a, "--as=worker-01", f"--as-group={AGENT_GROUP}",  # noqa: E731
                             check=False).stdout.strip()
    assert can("watch", "machineoperations") == "yes"
    assert can("patch", "machineoperations", "--subresource=status") == "yes"
    assert can("create", "events", "-n", "default") == "yes"
    assert can("create", "machineoperations") == "no"
    assert can("update", "machineoperations") == "no"


def test_explain_uses_the_served_openapi(kubectl):
    out = kubectl("explain", "mop.spec").stdout
    assert re.search(r"operationKind\s+<string> -required-", out)
    assert "ttlSecondsAfterFinished" in out


@needs_kubectl
@pytest.mark.parametrize("minor", [27, 28, 29, 30, 31, 33])
def test_other_kubectl_versions_apply_and_get(minor, tmp_path):
    if not Path(KUBECTL).resolve().with_name(f"kubectl.1.{minor}").exists():
        pytest.skip(f"no kubectl 1.{minor} next to the dispatcher")
    # kubectl 1.27 and 1.28 validate on the client with /openapi/v2 in protobuf, which is not served.
    validate = ["--validate=false"] if minor <= 28 else []
    with start_apiserver(version=f"1.{minor}.0") as srv:
        kubectl = Kubectl(srv.kubeconfig(tmp_path / "kc"), tmp_path)
        assert kubectl("apply", "-f", RESET_EXAMPLE, *validate).stdout.strip().endswith(" created")
        assert kubectl("get", "mop").stdout.splitlines()[0].split() == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]
        assert any(r.user_agent.startswith(f"kubectl/v1.{minor}.") for r in srv.requests)


# ---------------------------------------------------------------------------------------------------------
# The Python client (what the watcher uses)

def test_list_carries_kind_version_and_resource_version(api, op):
    listed = api.list_cluster_custom_object(G, V, P)
    assert (listed["kind"], listed["apiVersion"]) == ("MachineOperationList", f"{G}/{V}")
    assert int(listed["metadata"]["resourceVersion"]) >= int(op["metadata"]["resourceVersion"])
    assert all(item["kind"] == "MachineOperation" for item in listed["items"])


def test_list_with_field_selector_returns_only_that_machine(api):
    mine, theirs = unique("mine"), unique("theirs")
    api.create_cluster_custom_object(G, V, P, operation(mine, machine="worker-fs"))
    api.create_cluster_custom_object(G, V, P, operation(theirs, machine="worker-other"))
    listed = api.list_cluster_custom_object(G, V, P, field_selector="spec.machineRef=worker-fs")
    assert [i["metadata"]["name"] for i in listed["items"]] == [mine]
    listed = api.list_cluster_custom_object(G, V, P, field_selector=f"metadata.name={theirs}")
    assert [i["spec"]["machineRef"] for i in listed["items"]] == ["worker-other"]


def test_a_server_without_selectable_fields_rejects_the_selector(tmp_path):
    # Kubernetes 1.30 (feature gate off) ignores selectableFields: the watcher must fall back to client-side
    # filtering when it sees this 400.
    with start_apiserver(version="1.30.0") as srv:
        api = client.CustomObjectsApi(config.new_client_from_config(srv.kubeconfig(tmp_path / "kc")))
        with pytest.raises(client.ApiException) as e:
            api.list_cluster_custom_object(G, V, P, field_selector="spec.machineRef=worker-01")
        assert (e.value.status, error_body(e.value)["reason"]) == (400, "BadRequest")
        assert error_body(e.value)["message"] == "field label not supported: spec.machineRef"


def test_label_selector_and_pagination(api):
    names = [unique("page") for _ in range(3)]
    for name in names:
        body = operation(name)
        body["metadata"]["labels"] = {"batch": "pages"}
        api.create_cluster_custom_object(G, V, P, body)
    first = api.list_cluster_custom_object(G, V, P, label_selector="batch=pages", limit=2)
    assert len(first["items"]) == 2 and first["metadata"]["remainingItemCount"] == 1
    rest = api.list_cluster_custom_object(G, V, P, label_selector="batch=pages", limit=2,
                                          _continue=first["metadata"]["continue"])
    assert sorted(i["metadata"]["name"] for i in first["items"] + rest["items"]) == sorted(names)
    assert api.list_cluster_custom_object(G, V, P, label_selector="batch in (other)")["items"] == []


def stream(api, until: int | None = None, **kwargs) -> list[tuple[str, str, str]]:
    """A watch as (type, name, resourceVersion) tuples: `until` events, or all until timeoutSeconds (1 by
    default) ends it on the server."""
    kwargs.setdefault("timeout_seconds", 10 if until else 1)
    w, events = watch.Watch(), []
    for e in w.stream(api.list_cluster_custom_object, G, V, P, **kwargs):
        events.append((e["type"], e["raw_object"]["metadata"].get("name"),
                       e["raw_object"]["metadata"]["resourceVersion"]))
        if len(events) == until:
            w.stop()
    return events


def test_watch_resumes_from_a_resource_version(api):
    machine = unique("worker-resume")
    a, b, c = unique("a"), unique("b"), unique("c")
    api.create_cluster_custom_object(G, V, P, operation(a, machine=machine))
    api.create_cluster_custom_object(G, V, P, operation(c, machine=machine))
    rv = api.list_cluster_custom_object(G, V, P)["metadata"]["resourceVersion"]
    set_phase(api, a, "InProgress")
    api.create_cluster_custom_object(G, V, P, operation(b, machine=machine))
    api.delete_cluster_custom_object(G, V, P, c)
    events = stream(api, until=3, field_selector=f"spec.machineRef={machine}", resource_version=rv)
    assert [(t, n) for t, n, _ in events] == [("MODIFIED", a), ("ADDED", b), ("DELETED", c)]
    assert [int(r) for _, _, r in events] == sorted(int(r) for _, _, r in events)
    # Resuming from the second event's version gives what came after it: the first event is the third.
    assert [(t, n) for t, n, _ in stream(api, until=1, field_selector=f"spec.machineRef={machine}",
                                         resource_version=events[1][2])] == [("DELETED", c)]


def test_watch_without_resource_version_starts_with_the_existing_objects(api):
    machine = unique("worker-initial")
    names = sorted(unique("init") for _ in range(2))
    for name in names:
        api.create_cluster_custom_object(G, V, P, operation(name, machine=machine))
    for rv in ("0", None):
        kwargs = {"resource_version": rv} if rv else {}
        assert [(t, n) for t, n, _ in stream(api, until=2, field_selector=f"spec.machineRef={machine}",
                                             **kwargs)] == [("ADDED", n) for n in names]


def test_watch_sees_objects_enter_and_leave_its_selector(api):
    name = unique("move")
    api.create_cluster_custom_object(G, V, P, operation(name, machine="worker-x"))
    rv = api.list_cluster_custom_object(G, V, P)["metadata"]["resourceVersion"]
    api.patch_cluster_custom_object(G, V, P, name, {"spec": {"machineRef": "worker-y"}})
    api.patch_cluster_custom_object(G, V, P, name, {"spec": {"machineRef": "worker-x"}})
    assert [(t, n) for t, n, _ in stream(api, until=2, field_selector="spec.machineRef=worker-x",
                                         resource_version=rv)] == [("DELETED", name), ("ADDED", name)]


def test_watch_from_an_expired_resource_version_is_410_gone(server, api, op):
    old = op["metadata"]["resourceVersion"]
    set_phase(api, op["metadata"]["name"], "InProgress")
    server.compact()  # as etcd compaction would: old versions leave the window
    with pytest.raises(client.ApiException) as e:
        stream(api, resource_version=old)
    assert e.value.status == 410 and e.value.reason.startswith("Expired: too old resource version")
    # A list at exactly that version is gone too; the watcher relists (no resourceVersion) and watches on.
    with pytest.raises(client.ApiException) as e:
        api.list_cluster_custom_object(G, V, P, resource_version=old, resource_version_match="Exact")
    assert (e.value.status, error_body(e.value)["reason"]) == (410, "Expired")
    fresh = api.list_cluster_custom_object(G, V, P)["metadata"]["resourceVersion"]
    assert stream(api, resource_version=fresh) == []


def test_watch_sends_bookmarks_when_asked(server, api, op):
    w = watch.Watch()
    seen = []
    for event in w.stream(api.list_cluster_custom_object, G, V, P, allow_watch_bookmarks=True,
                          resource_version=op["metadata"]["resourceVersion"], timeout_seconds=30):
        seen.append(event)
        if event["type"] == "BOOKMARK":
            w.stop()
    bookmark = seen[-1]["raw_object"]
    assert (bookmark["kind"], bookmark["apiVersion"]) == ("MachineOperation", f"{G}/{V}")
    assert int(bookmark["metadata"]["resourceVersion"]) >= int(op["metadata"]["resourceVersion"])
    # Without allowWatchBookmarks there are none.
    assert all(t != "BOOKMARK" for t, _, _ in stream(api, resource_version=server.rv))


def test_watch_ends_at_timeout_seconds(server, api):
    started = server.count(verb="watch")
    assert stream(api, resource_version=str(server.rv), timeout_seconds=1) == []
    assert server.count(verb="watch") == started + 1  # one request, ended by the server


def test_update_with_a_stale_resource_version_is_409(api, op):
    name = op["metadata"]["name"]
    first = copy.deepcopy(op)
    first["status"] = {"phase": "InProgress"}
    api.replace_cluster_custom_object_status(G, V, P, name, first)
    first["status"] = {"phase": "Failed"}  # still the old resourceVersion
    with pytest.raises(client.ApiException) as e:
        api.replace_cluster_custom_object_status(G, V, P, name, first)
    body = error_body(e.value)
    assert (e.value.status, body["reason"]) == (409, "Conflict")
    assert body["message"] == (f'Operation cannot be fulfilled on machineoperations.unbounded-cloud.io "{name}": '
                               "the object has been modified; please apply your changes to the latest version and "
                               "try again")
    assert api.get_cluster_custom_object(G, V, P, name)["status"] == {"phase": "InProgress"}


def test_update_of_a_custom_resource_needs_a_resource_version(api, op):
    body = copy.deepcopy(op)
    del body["metadata"]["resourceVersion"]
    with pytest.raises(client.ApiException) as e:
        api.replace_cluster_custom_object(G, V, P, op["metadata"]["name"], body)
    assert e.value.status == 422
    assert "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update" in error_body(e.value)[
        "message"]


def test_status_subresource_semantics(api, op):
    name = op["metadata"]["name"]
    # Status writes do not change the generation; the main resource ignores status.
    obj = set_phase(api, name, "InProgress")
    assert obj["metadata"]["generation"] == 1
    obj = api.patch_cluster_custom_object(G, V, P, name, {"status": {"phase": "Complete"}})
    assert obj["status"] == {"phase": "InProgress"}
    # ...and the status subresource ignores the spec and metadata.
    obj = api.patch_cluster_custom_object_status(G, V, P, name, {"spec": {"machineRef": "elsewhere"},
                                                                 "metadata": {"labels": {"x": "y"}}})
    assert obj["spec"]["machineRef"] == "worker-01" and "labels" not in obj["metadata"]
    # A spec change bumps the generation (while Pending: the CRD's rules keep a started operation as it was).
    other = api.create_cluster_custom_object(G, V, P, operation(unique()))
    obj = api.patch_cluster_custom_object(G, V, P, other["metadata"]["name"], {"spec": {"ttlSecondsAfterFinished": 5}})
    assert obj["metadata"]["generation"] == 2
    # Status sent with a create is dropped: the status is the CRD's default.
    created = api.create_cluster_custom_object(G, V, P, {**operation(unique()), "status": {"phase": "Complete"}})
    assert created["status"] == {"phase": "Pending"}


def test_a_no_op_write_keeps_the_resource_version(api, op):
    obj = set_phase(api, op["metadata"]["name"], "Pending")
    again = set_phase(api, op["metadata"]["name"], "Pending")
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_status_is_validated_against_the_schema(api, op):
    name = op["metadata"]["name"]
    bad = {"type": "Completed", "status": "Maybe", "reason": "not camel case", "message": "m",
           "lastTransitionTime": "yesterday"}
    with pytest.raises(client.ApiException) as e:
        api.patch_cluster_custom_object_status(G, V, P, name, {"status": {"conditions": [bad]}})
    body = error_body(e.value)
    assert (e.value.status, body["reason"]) == (422, "Invalid")
    fields = {c["field"]: c["reason"] for c in body["details"]["causes"]}
    assert fields == {"status.conditions[0].status": "FieldValueNotSupported",
                      "status.conditions[0].reason": "FieldValueInvalid",
                      "status.conditions[0].lastTransitionTime": "FieldValueInvalid"}
    dup = {"type": "Completed", "status": "True", "reason": "Succeeded", "message": "",
           "lastTransitionTime": "2025-01-01T00:00:00Z"}
    with pytest.raises(client.ApiException) as e:
        api.patch_cluster_custom_object_status(G, V, P, name, {"status": {"conditions": [dup, dup]}})
    assert "status.conditions[1]: Duplicate value" in error_body(e.value)["message"]


def test_unknown_status_fields_are_pruned_with_a_warning(api, op):
    # The Python client sends no fieldValidation, so the server's default applies: Warn, and prune.
    _, code, headers = api.patch_cluster_custom_object_status_with_http_info(
        G, V, P, op["metadata"]["name"], {"status": {"phase": "Failed", "phaze": "typo"}})
    assert code == 200 and headers["Warning"] == '299 - "unknown field \\"status.phaze\\""'
    assert api.get_cluster_custom_object(G, V, P, op["metadata"]["name"])["status"] == {"phase": "Failed"}


def test_patch_types_are_chosen_by_content_type(api, api_client, op):
    name = op["metadata"]["name"]
    path = f"/apis/{G}/{V}/{P}/{name}/status"

    def patch(content_type: str, body) -> None:
        api_client.call_api(path, "PATCH", header_params={"Content-Type": content_type}, body=body)

    patch("application/json-patch+json", [{"op": "add", "path": "/status", "value": {"phase": "InProgress"}}])
    # A failed "test" operation makes the whole patch fail: a compare-and-swap of the phase.
    with pytest.raises(client.ApiException) as e:
        patch("application/json-patch+json", [{"op": "test", "path": "/status/phase", "value": "Pending"},
                                              {"op": "replace", "path": "/status/phase", "value": "Complete"}])
    assert e.value.status == 422
    # Strategic merge is for built-in types only; server-side apply is not implemented by the test server.
    for unsupported, body in (("application/strategic-merge-patch+json", {"status": {"phase": "Complete"}}),
                              ("application/apply-patch+yaml", "status: {phase: Complete}")):
        with pytest.raises(client.ApiException) as e:
            patch(unsupported, body)
        assert (e.value.status, error_body(e.value)["reason"]) == (415, "UnsupportedMediaType")
    assert api.get_cluster_custom_object(G, V, P, name)["status"]["phase"] == "InProgress"


def test_errors_are_status_objects_with_reasons(api, op):
    with pytest.raises(client.ApiException) as e:
        api.get_cluster_custom_object(G, V, P, "absent")
    assert error_body(e.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound",
        "message": 'machineoperations.unbounded-cloud.io "absent" not found', "code": 404,
        "details": {"name": "absent", "group": G, "kind": P}}
    with pytest.raises(client.ApiException) as e:
        api.create_cluster_custom_object(G, V, P, operation(op["metadata"]["name"]))
    assert (e.value.status, error_body(e.value)["reason"]) == (409, "AlreadyExists")
    with pytest.raises(client.ApiException) as e:
        api.create_cluster_custom_object(G, V, P, operation("Not_A_Name"))
    assert (e.value.status, error_body(e.value)["details"]["causes"][0]["field"]) == (422, "metadata.name")
    with pytest.raises(client.ApiException) as e:
        api.delete_cluster_custom_object(G, V, P, op["metadata"]["name"],
                                         body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="x")))
    assert (e.value.status, error_body(e.value)["reason"]) == (409, "Conflict")
    with pytest.raises(client.ApiException) as e:  # the status subresource is only read and written
        api.api_client.call_api(f"/apis/{G}/{V}/{P}/{op['metadata']['name']}/status", "DELETE")
    assert (e.value.status, error_body(e.value)["reason"]) == (405, "MethodNotAllowed")


def test_delete_answers_a_status_and_finalizers_delay_it(api):
    name = unique("fin")
    body = operation(name)
    body["metadata"]["finalizers"] = ["unbounded-cloud.io/agent"]
    api.create_cluster_custom_object(G, V, P, body)
    marked = api.delete_cluster_custom_object(G, V, P, name)
    assert marked["metadata"]["deletionTimestamp"] and marked["metadata"]["generation"] == 2
    api.patch_cluster_custom_object(G, V, P, name, {"metadata": {"finalizers": None}})
    with pytest.raises(client.ApiException) as e:
        api.get_cluster_custom_object(G, V, P, name)
    assert e.value.status == 404
    plain = api.create_cluster_custom_object(G, V, P, operation(unique("del")))
    gone = api.delete_cluster_custom_object(G, V, P, plain["metadata"]["name"])
    assert (gone["kind"], gone["status"], gone["details"]["uid"]) == ("Status", "Success", plain["metadata"]["uid"])


def test_tables_come_from_the_printer_columns(api_client, op):
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    for path, watch_query in ((f"/apis/{G}/{V}/{P}/{op['metadata']['name']}", []),
                              (f"/apis/{G}/{V}/{P}", []),
                              (f"/apis/{G}/{V}/{P}", [("watch", "true"),
                                                      ("fieldSelector", f"metadata.name={op['metadata']['name']}")])):
        response = api_client.call_api(path, "GET", query_params=watch_query, header_params={"Accept": accept},
                                       _preload_content=False, _return_http_data_only=True)
        if watch_query:  # a watch sends one event a chunk; this one does not end by itself
            table = json.loads(next(response.stream()).decode().splitlines()[0])["object"]
            response.close()
        else:
            table = json.loads(response.data)
        assert table["kind"] == "Table"
        assert [(c["name"], c["priority"]) for c in table["columnDefinitions"]] == [
            ("Name", 0), ("Kind", 0), ("Machine", 0), ("Phase", 0), ("Age", 0), ("Reason", 1), ("Rollout", 1)]
        row = next(r for r in table["rows"] if r["cells"][0] == op["metadata"]["name"])
        assert row["cells"][1:4] == ["AgentUpgrade", "worker-01", "Pending"]
        assert row["object"]["kind"] == "PartialObjectMetadata"


def test_events_are_validated_like_a_real_server(api_client, op):
    events = client.EventsV1Api(api_client)
    ref = client.V1ObjectReference(api_version=f"{G}/{V}", kind="MachineOperation", name=op["metadata"]["name"],
                                   uid=op["metadata"]["uid"])
    event = client.EventsV1Event(metadata=client.V1ObjectMeta(generate_name="e."), regarding=ref, reason="Started",
                                 note="x" * 1025, type="Normal", action="Upgrade", event_time=kube_apiserver.now(),
                                 reporting_instance="worker-01")
    with pytest.raises(client.ApiException) as e:
        events.create_namespaced_event("default", event)
    causes = {c["field"] for c in error_body(e.value)["details"]["causes"]}
    assert e.value.status == 422 and causes == {"reportingController", "note"}
    core = client.CoreV1Api(api_client)
    with pytest.raises(client.ApiException) as e:  # a cluster-scoped object's events belong in "default"
        core.create_namespaced_event("kube-public", client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="e."), involved_object=ref, reason="R", message="m"))
    assert e.value.status == 422
    with pytest.raises(client.ApiException) as e:
        core.create_namespaced_event("no-such-namespace", client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="e."), involved_object=ref, reason="R", message="m"))
    assert e.value.status == 404
    created = core.create_namespaced_event("default", client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="e."), involved_object=ref, reason="R", message="m", count=1))
    patched = core.patch_namespaced_event(created.metadata.name, "default", {"count": 2})
    assert patched.count == 2


def test_machines_can_be_annotated_and_may_be_absent(api, tmp_path):
    machine = {"apiVersion": f"{G}/{V}", "kind": "Machine", "metadata": {"name": "worker-01"}, "spec": {}}
    api.create_cluster_custom_object(G, V, "machines", machine)
    patched = api.patch_cluster_custom_object(G, V, "machines", "worker-01", {
        "metadata": {"annotations": {"unbounded-cloud.io/agent-version": "1.2.3"}}})
    assert patched["metadata"]["annotations"] == {"unbounded-cloud.io/agent-version": "1.2.3"}
    with pytest.raises(client.ApiException) as e:
        api.get_cluster_custom_object(G, V, "machines", "worker-99")
    assert error_body(e.value)["message"] == 'machines.unbounded-cloud.io "worker-99" not found'
    # A cluster without the Machine CRD: the resource itself is unknown (a different 404).
    with start_apiserver(machines=False) as srv:
        bare = client.CustomObjectsApi(config.new_client_from_config(srv.kubeconfig(tmp_path / "kc")))
        with pytest.raises(client.ApiException) as e:
            bare.get_cluster_custom_object(G, V, "machines", "worker-01")
        assert (e.value.status, error_body(e.value)["message"]) == (
            404, "the server could not find the requested resource")


# ---------------------------------------------------------------------------------------------------------
# Identity and RBAC, TLS, outages, the request log

def test_the_agent_role_allows_the_watcher_and_nothing_more(tmp_path):
    with start_apiserver(tls=True, preload=[RBAC_PATH]) as srv:
        admin = config.new_client_from_config(srv.kubeconfig(tmp_path / "admin"))
        client.CustomObjectsApi(admin).create_cluster_custom_object(G, V, P, operation("job", machine="worker-01"))
        client.CustomObjectsApi(admin).create_cluster_custom_object(
            G, V, "machines", {"apiVersion": f"{G}/{V}", "kind": "Machine", "metadata": {"name": "worker-01"}})

        # What the watcher does, as a member of the agents' group: each call would raise on 403.
        agent_client = config.new_client_from_config(srv.kubeconfig(tmp_path / "agent", user="worker-01",
                                                                    groups=[AGENT_GROUP]))
        agent = client.CustomObjectsApi(agent_client)
        listed = agent.list_cluster_custom_object(G, V, P, field_selector="spec.machineRef=worker-01")
        stream(agent, resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=1)
        job = agent.get_cluster_custom_object(G, V, P, "job")
        agent.replace_cluster_custom_object_status(G, V, P, "job", {**job, "status": {"phase": "InProgress"}})
        agent.patch_cluster_custom_object_status(G, V, P, "job", {"status": {"phase": "Complete"}})
        agent.get_cluster_custom_object(G, V, "machines", "worker-01")
        agent.patch_cluster_custom_object(G, V, "machines", "worker-01",
                                          {"metadata": {"annotations": {"unbounded-cloud.io/agent-version": "1"}}})
        event = client.CoreV1Api(agent_client).create_namespaced_event("default", client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="job."), reason="Started", message="m", count=1,
            involved_object=client.V1ObjectReference(kind="MachineOperation", name="job")))
        client.CoreV1Api(agent_client).patch_namespaced_event(event.metadata.name, "default", {"count": 2})
        agent.delete_cluster_custom_object(G, V, P, "job")

        # And nothing more.
        with pytest.raises(client.ApiException) as e:
            agent.create_cluster_custom_object(G, V, P, operation("mine"))
        assert (e.value.status, error_body(e.value)["message"]) == (403, (
            'machineoperations.unbounded-cloud.io is forbidden: User "worker-01" cannot create resource '
            '"machineoperations" in API group "unbounded-cloud.io" at the cluster scope'))
        for forbidden in (lambda: agent.patch_cluster_custom_object(G, V, P, "x", {"spec": {}}),
                          lambda: client.CoreV1Api(agent_client).list_namespaced_event("default"),
                          lambda: agent.list_cluster_custom_object(G, V, "machines")):
            with pytest.raises(client.ApiException) as e:
                forbidden()
            assert (e.value.status, error_body(e.value)["reason"]) == (403, "Forbidden")


def test_tls_and_bearer_tokens(tmp_path):
    with start_apiserver(tls=True) as srv:
        assert srv.url.startswith("https://")
        kubeconfig = srv.kubeconfig(tmp_path / "kc")
        if KUBECTL:  # kubectl sends credentials only over TLS: this is how it meets RBAC
            who = Kubectl(kubeconfig, tmp_path)("auth", "whoami").stdout.split()
            assert who[who.index("Username") + 1] == "admin"
        api_client = config.new_client_from_config(kubeconfig)
        assert client.VersionApi(api_client).get_code().git_version == f"v{srv.version}"
        api = client.CustomObjectsApi(api_client)
        api_client.configuration.api_key = {"authorization": "Bearer not-a-token"}
        with pytest.raises(client.ApiException) as e:
            api.list_cluster_custom_object(G, V, P)
        assert (e.value.status, error_body(e.value)["reason"]) == (401, "Unauthorized")
        api_client.configuration.api_key = {}  # no credentials over TLS: system:anonymous, who may do nothing
        with pytest.raises(client.ApiException) as e:
            api.list_cluster_custom_object(G, V, P)
        assert e.value.status == 403 and 'User "system:anonymous"' in error_body(e.value)["message"]


def test_pause_refuses_connections_and_ends_watches(server, api, op):
    name = op["metadata"]["name"]
    ended = threading.Event()

    def watch_until_dropped():
        try:
            stream(api, resource_version=str(server.rv), timeout_seconds=60)
        except Exception:  # however the client reports the dropped connection
            pass
        ended.set()

    watches = server.count(verb="watch")
    threading.Thread(target=watch_until_dropped, daemon=True).start()
    wait_until(lambda: server.count(verb="watch") > watches)
    server.pause()
    try:
        assert ended.wait(20)  # the open watch ended with the outage, long before its 60 s
        with pytest.raises(urllib3.exceptions.MaxRetryError):  # connection refused
            api.get_cluster_custom_object(G, V, P, name, _request_timeout=2)
    finally:
        server.resume()
    assert api.get_cluster_custom_object(G, V, P, name)["metadata"]["uid"] == op["metadata"]["uid"]
    server.pause(mode="503")
    try:
        with pytest.raises(client.ApiException) as e:
            api.get_cluster_custom_object(G, V, P, name)
        assert (e.value.status, error_body(e.value)["reason"]) == (503, "ServiceUnavailable")
    finally:
        server.resume()


def test_pause_for_a_while_resumes_by_itself(tmp_path):
    with start_apiserver() as srv:
        api = client.CustomObjectsApi(config.new_client_from_config(srv.kubeconfig(tmp_path / "kc")))
        srv.pause(seconds=0.5)
        wait_until(lambda: srv.paused is None)
        assert api.list_cluster_custom_object(G, V, P)["items"] == []


def test_request_log_counts_requests_per_verb_and_resource(server, api, op):
    server.clear_requests()
    set_phase(api, op["metadata"]["name"], "InProgress")
    api.get_cluster_custom_object(G, V, P, op["metadata"]["name"])
    assert server.count(verb="patch", resource=f"{P}/status", name=op["metadata"]["name"]) == 1
    assert server.count(verb="get", resource=P) == 1
    assert [str(r) for r in server.requests] == [
        f"patch {P}/status {op['metadata']['name']} -> 200", f"get {P} {op['metadata']['name']} -> 200"]


def test_cli_serves_until_interrupted(tmp_path):
    kubeconfig = tmp_path / "kc"
    process = subprocess.Popen([sys.executable, kube_apiserver.__file__, "--port", "0", "--kubeconfig",
                                str(kubeconfig)], stdout=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert re.fullmatch(r"serving Kubernetes v1\.32\.\d+ API at http://127\.0\.0\.1:\d+\n", first)
        assert process.stdout.readline() == f"export KUBECONFIG={kubeconfig}\n"
        api = client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))
        assert api.list_cluster_custom_object(G, V, P)["kind"] == "MachineOperationList"
    finally:
        process.terminate()
        process.wait(10)


# ---------------------------------------------------------------------------------------------------------
# CEL rules of the CRD, defaults, partitions

def test_the_crds_rules_refuse_a_bad_operation_with_their_message(kubectl, tmp_path):
    path = tmp_path / "bad.yaml"
    both = operation(unique("both"), kind="AgentReset", machineSelector={"matchLabels": {"pool": "a"}})
    neither = operation(unique("neither"), kind="AgentReset")
    del neither["spec"]["machineRef"]
    no_url = operation(unique("no-url"), parameters={"sha256": "ab" * 32})
    for obj, message in ((both, "exactly one of machineRef and machineSelector must be set"),
                         (neither, "exactly one of machineRef and machineSelector must be set"),
                         (no_url, "AgentUpgrade needs parameters.downloadURL, the URL of the release tarball")):
        path.write_text(yaml.safe_dump(obj))
        r = kubectl("apply", "-f", path, check=False)
        assert r.returncode == 1
        assert r.stderr.strip() == (f'The MachineOperation "{obj["metadata"]["name"]}" is invalid: '
                                    f'spec: Invalid value: "object": {message}')
    selected = operation(unique("selected"), kind="AgentReset", machineSelector={"matchLabels": {"pool": "a"}})
    del selected["spec"]["machineRef"]
    path.write_text(yaml.safe_dump(selected))
    kubectl("apply", "-f", path)  # a selector alone is fine


def test_the_spec_cannot_change_once_the_operation_has_started(api, op):
    name = op["metadata"]["name"]
    api.patch_cluster_custom_object(G, V, P, name, {"spec": {"ttlSecondsAfterFinished": 60}})  # Pending: fine
    set_phase(api, name, "InProgress")
    with pytest.raises(client.ApiException) as e:
        api.patch_cluster_custom_object(G, V, P, name, {"spec": {"ttlSecondsAfterFinished": 5}})
    body = error_body(e.value)
    assert (e.value.status, body["details"]["causes"][0]["field"]) == (422, "spec")
    assert "spec cannot change once the operation has started" in body["message"]
    # the status and the metadata still can
    set_phase(api, name, "Complete")
    api.patch_cluster_custom_object(G, V, P, name, {"metadata": {"labels": {"done": "yes"}}})


def test_schema_defaults_apply_on_create_and_on_every_read(tmp_path):
    crd = yaml.safe_load(CRD_PATH.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    no_default = copy.deepcopy(crd)
    ns = no_default["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    ns.pop("default")
    ns["properties"]["phase"].pop("default")
    (tmp_path / "crd.yaml").write_text(yaml.safe_dump(no_default))
    with start_apiserver(crds=[tmp_path / "crd.yaml"]) as srv:
        api = client.CustomObjectsApi(config.new_client_from_config(srv.kubeconfig(tmp_path / "kc")))
        before = api.create_cluster_custom_object(G, V, P, operation("before"))
        assert "status" not in before
        # the CRD gains its defaults: objects stored before show them on every read, as kube-apiserver does
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
        api_client = api.api_client
        stored = json.loads(api_client.call_api(path, "GET", _preload_content=False,
                                                _return_http_data_only=True).data)
        stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"] = status
        api_client.call_api(path, "PUT", body=stored, header_params={"Content-Type": "application/json"},
                            _preload_content=False)
        assert api.get_cluster_custom_object(G, V, P, "before")["status"] == {"phase": "Pending"}
        listed = api.list_cluster_custom_object(G, V, P)["items"]
        assert [o["status"] for o in listed] == [{"phase": "Pending"}]
        assert api.create_cluster_custom_object(G, V, P, operation("after"))["status"] == {"phase": "Pending"}


def test_a_partition_cuts_off_only_the_clients_it_names(server, api, tmp_path):
    other = config.new_client_from_config(server.kubeconfig(tmp_path / "other"))
    other.user_agent = "cut-off/1.0"
    cut = client.CustomObjectsApi(other)
    cut.list_cluster_custom_object(G, V, P)
    server.partition(lambda headers: headers.get("User-Agent", "").startswith("cut-off/"))
    try:
        with pytest.raises(Exception) as e:  # the connection is dropped unanswered
            cut.list_cluster_custom_object(G, V, P, _request_timeout=5)
        assert not isinstance(e.value, client.ApiException)
        api.list_cluster_custom_object(G, V, P)  # everyone else is served
    finally:
        server.partition(None)
    cut.list_cluster_custom_object(G, V, P)


# ---------------------------------------------------------------------------------------------------------
# Leases, namespaced RBAC and the garbage collector (what the fan-out controller relies on)

FLEET_RBAC_PATH = MANIFESTS / "fleet-controller-rbac.yaml"
FLEET_DEPLOYMENT_PATH = MANIFESTS / "fleet-controller-deployment.yaml"
FLEET_USER = "unbounded-agent-fleet-controller"


def lease_body(name: str, holder: str, **spec) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, **spec}}


def test_leases_are_served_with_their_holder_and_validated(kubectl, api_client):
    coordination = client.CoordinationV1Api(api_client)
    created = coordination.create_namespaced_lease("default", lease_body("elect", "a", renewTime="2025-01-01T00:00:00Z"))
    assert created.spec.holder_identity == "a"
    raw = api_client.call_api("/apis/coordination.k8s.io/v1/namespaces/default/leases/elect", "GET",
                              _preload_content=False, _return_http_data_only=True).data
    assert json.loads(raw)["spec"]["renewTime"] == "2025-01-01T00:00:00.000000Z"  # MicroTime
    lines = kubectl("get", "lease", "elect", "-n", "default").stdout.splitlines()
    assert lines[0].split() == ["NAME", "HOLDER", "AGE"] and lines[1].split()[:2] == ["elect", "a"]
    stale = copy.deepcopy(created)
    created.spec.holder_identity = "b"
    coordination.replace_namespaced_lease("elect", "default", created)
    stale.spec.holder_identity = "c"
    with pytest.raises(client.ApiException) as e:  # a second candidate that read before: 409
        coordination.replace_namespaced_lease("elect", "default", stale)
    assert e.value.status == 409
    with pytest.raises(client.ApiException) as e:
        coordination.create_namespaced_lease("default", lease_body("bad", "a", leaseDurationSeconds=0))
    assert e.value.status == 422 and "spec.leaseDurationSeconds" in error_body(e.value)["message"]


def test_role_bindings_grant_in_their_namespace_only(tmp_path):
    with start_apiserver(preload=[FLEET_RBAC_PATH]) as srv:
        user = kube_apiserver.User(FLEET_USER, [])
        sa = kube_apiserver.User("system:serviceaccount:unbounded-system:unbounded-agent-fleet-controller",
                                 ["system:serviceaccounts"])
        for who in (user, sa):
            allowed, why = srv.authorize(who, "update", "coordination.k8s.io", "leases", "",
                                         "unbounded-agent-fleet-controller", "unbounded-system")
            assert allowed and why.startswith('RBAC: allowed by RoleBinding "unbounded-agent-fleet-controller/'
                                              'unbounded-system" of Role "unbounded-agent-fleet-controller"')
            assert not srv.authorize(who, "update", "coordination.k8s.io", "leases", "",
                                     "unbounded-agent-fleet-controller", "kube-system")[0]
        assert not srv.authorize(kube_apiserver.User("someone", []), "get", "coordination.k8s.io", "leases", "",
                                 "unbounded-agent-fleet-controller", "unbounded-system")[0]


def test_deleting_an_owner_deletes_its_dependents_or_orphans_them(api):
    owner = api.create_cluster_custom_object(G, V, P, operation(unique("owner")))
    ref = {"apiVersion": f"{G}/{V}", "kind": "MachineOperation", "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    names = [unique("dependent") for _ in range(3)]
    for n in names:
        body = operation(n)
        body["metadata"]["ownerReferences"] = [ref]
        api.create_cluster_custom_object(G, V, P, body)
    held = operation(unique("held"))  # a dependent with a finalizer of its own waits for it
    held["metadata"].update(ownerReferences=[ref], finalizers=["example.com/keep"])
    held = api.create_cluster_custom_object(G, V, P, held)
    api.delete_cluster_custom_object(G, V, P, owner["metadata"]["name"])  # background, as kubectl delete
    left = {o["metadata"]["name"]: o for o in api.list_cluster_custom_object(G, V, P)["items"]}
    assert not set(names) & set(left)
    assert left[held["metadata"]["name"]]["metadata"]["deletionTimestamp"]
    api.patch_cluster_custom_object(G, V, P, held["metadata"]["name"], {"metadata": {"finalizers": None}})
    # Orphan: the dependents stay, without the reference
    owner = api.create_cluster_custom_object(G, V, P, operation(unique("owner")))
    body = operation(unique("orphan"))
    body["metadata"]["ownerReferences"] = [dict(ref, name=owner["metadata"]["name"], uid=owner["metadata"]["uid"])]
    orphan = api.create_cluster_custom_object(G, V, P, body)
    api.delete_cluster_custom_object(G, V, P, owner["metadata"]["name"], propagation_policy="Orphan")
    kept = api.get_cluster_custom_object(G, V, P, orphan["metadata"]["name"])
    assert "ownerReferences" not in kept["metadata"]
    with pytest.raises(client.ApiException) as e:
        api.delete_cluster_custom_object(G, V, P, orphan["metadata"]["name"], propagation_policy="Foreground")
    assert e.value.status == 400


def test_the_fleet_controllers_rbac_applies_with_kubectl_and_allows_what_it_does(kubectl):
    out = kubectl("apply", "-f", FLEET_RBAC_PATH).stdout.splitlines()
    assert out == ["namespace/unbounded-system created",
                   "clusterrole.rbac.authorization.k8s.io/unbounded-agent-fleet-controller created",
                   "clusterrolebinding.rbac.authorization.k8s.io/unbounded-agent-fleet-controller created",
                   "role.rbac.authorization.k8s.io/unbounded-agent-fleet-controller created",
                   "rolebinding.rbac.authorization.k8s.io/unbounded-agent-fleet-controller created"]
    can = lambda *a: kubectl("auth", "can-i", *a, f"--as={FLEET_USER}", check=False).stdout.strip()  # noqa: E731
    assert [can("create", "machineoperations"), can("watch", "machines"), can("update", "machineoperations",
                                                                               "--subresource=status"),
            can("update", "leases/unbounded-agent-fleet-controller", "-n", "unbounded-system"),
            can("update", "leases/another", "-n", "unbounded-system"), can("patch", "machines"),
            can("update", "machineoperations")] == ["yes", "yes", "yes", "yes", "no", "no", "no"]


def test_the_fleet_deployment_runs_the_program_under_the_bound_service_account():
    [sa, deployment] = load(FLEET_DEPLOYMENT_PATH)
    rbac = load(FLEET_RBAC_PATH)
    bound = {(s["kind"], s.get("namespace"), s["name"]) for doc in rbac if doc["kind"].endswith("Binding")
             for s in doc["subjects"]}
    assert ("ServiceAccount", sa["metadata"]["namespace"], sa["metadata"]["name"]) in bound
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert deployment["spec"]["replicas"] >= 2  # a standby: the point of the Lease
    [container] = pod["containers"]
    program = Path(container["command"][0])
    assert program.parent == Path("/usr/libexec/unbounded-agent") and (REPO_BIN / program.name).is_file()
    assert {e["name"] for e in container["env"]} == {"POD_NAMESPACE", "POD_NAME"}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()


def test_the_crd_rules_keep_the_rollouts_parameters_to_operations_with_a_selector(kubectl, tmp_path):
    def apply(spec):
        path = tmp_path / "op.yaml"
        path.write_text(yaml.safe_dump({"apiVersion": f"{G}/{V}", "kind": "MachineOperation",
                                        "metadata": {"name": unique("rule")}, "spec": spec}))
        return kubectl("apply", "-f", path, check=False)

    url = {"downloadURL": "https://example.com/a.tar.gz"}
    sel = {"matchLabels": {"pool": "blue"}}
    r = apply({"machineRef": "w", "operationKind": "AgentUpgrade", "parameters": {**url, "maxInFlight": "2"}})
    assert r.returncode == 1 and "set the rollout of an operation with machineSelector" in r.stderr
    r = apply({"machineSelector": sel, "operationKind": "AgentUpgrade", "parameters": {**url, "canaryCount": "x"}})
    assert r.returncode == 1 and "must be whole numbers from 0 to 99999" in r.stderr
    r = apply({"machineSelector": sel, "operationKind": "AgentUpgrade", "parameters": {**url, "maxInFlight": "0"}})
    assert r.returncode == 1 and "maxInFlight must be at least 1" in r.stderr
    r = apply({"machineSelector": sel, "operationKind": "AgentUpgrade",
               "parameters": {**url, "canaryCount": "0", "maxInFlight": "50", "failureBudget": "2"}})
    assert r.returncode == 0, r.stderr
