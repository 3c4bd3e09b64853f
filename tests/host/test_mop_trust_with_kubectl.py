"""MachineOperations you can trust, on a test host with kubectl, as an operator meets them:

- `kubectl get mop NAME -w` right after `kubectl apply` shows Pending first, before the agent said anything;
- `kubectl apply` of a bad operation is refused with the CRD rule's message; against a CRD without the rules
  (the upstream one), the same operations end Failed/InvalidParameters through the agent;
- an operation deleted while it waits behind another never runs, even across a 30 s partition between the
  agent and the API server (kubectl still reaches the server);
- the agent's client certificate rotates while the daemon runs and the old one is revoked: status writes resume
  without a restart;
- with the per-machine admission policy installed, this host's agent cannot speak for another machine
  (`kubectl auth can-i`, and a forged status write denied by the policy), while its own writes pass.
The API server listens in a network namespace of the tests (testnet.py), never in the machine's own.
"""

import json
import time

import pytest
import releases
import yaml
from mop_host import AGENT_CONFIG_DIR, MANIFESTS, KubeLink, agent_user, daemon_state, journal_of, mop, wait_until
from upgrade_host import hold, release_hold, unhold, wait_held
from watcher_fakes import crd_without_rules

pytestmark = pytest.mark.testhost

PARTITION = 30.0
OPS = "/var/lib/unbounded-agent-ops"
PROGRESS = "/var/lib/unbounded-agent/machineoperations"
POLICY = "unbounded-agent-own-machine"


@pytest.fixture(scope="module")
def env(testhost_factory, tmp_path_factory):
    with testhost_factory("worker-01", installed=True) as host:
        kube = KubeLink.start(host, tmp_path_factory.mktemp("kube"))
        try:
            kube.configure_agent(host)
            out = tmp_path_factory.mktemp("releases")
            host.urls = {"refused": host.serve(releases.script_release(out / "refused.tar.gz", version="9.0.0",
                                                                       version_behaviour="exit42"),
                                               "agent-refused.tar.gz")}
            yield host, kube
        finally:
            kube.stop()


def phase(kube, name):
    return ((kube.get(name) or {}).get("status") or {}).get("phase")


def agent_kubeconfig(kube, host) -> str:
    """The agent's own credential (its client certificate on the host), for kubectl run by the test."""
    return kube.server.kubeconfig(kube.workdir / "as-the-agent.kubeconfig", user=agent_user(host), credential={
        "client-certificate": str(host.path(f"{AGENT_CONFIG_DIR}/agent.crt")),
        "client-key": str(host.path(f"{AGENT_CONFIG_DIR}/agent.key"))})


def test_get_watch_right_after_apply_shows_pending_first(env):
    host, kube = env
    kube.cut(host)  # the agent cannot have written anything: Pending is the CRD's own
    try:
        kube.apply(mop("pending-first", host.name, "NodeReboot"))
        with kube.watch("pending-first") as w:
            wait_until("the first line", lambda: w.rows("pending-first"), timeout=30)
        assert w.header == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]
        first = w.rows("pending-first")[0]
        assert (first["KIND"], first["MACHINE"], first["PHASE"]) == ("NodeReboot", host.name, "Pending")
    finally:
        kube.mend(host)
    wait_until("the agent to fail it", lambda: phase(kube, "pending-first") == "Failed", timeout=120)


def test_kubectl_apply_of_a_bad_operation_is_refused_with_the_rules_message(env, capsys):
    host, kube = env
    no_url = mop("upgrade-no-url", host.name, "AgentUpgrade")
    both = mop("reset-both", host.name, "AgentReset")
    both["spec"]["machineSelector"] = {"matchLabels": {"pool": "blue"}}
    refused = {}
    for manifest, rule in ((no_url, "AgentUpgrade needs parameters.downloadURL, the URL of the release tarball"),
                           (both, "exactly one of machineRef and machineSelector must be set")):
        r = kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest), check=False)
        assert r.returncode == 1 and kube.get(manifest["metadata"]["name"]) is None
        assert r.stderr.strip().endswith(f'spec: Invalid value: "object": {rule}'), r.stderr
        refused[manifest["metadata"]["name"]] = r.stderr.strip()
    with capsys.disabled():
        print("\n" + "\n".join(refused.values()))
    # The upstream CRD has no rules: the API server takes them, and the agent fails them itself.
    kube.kubectl("apply", "-f", str(crd_without_rules(kube.workdir)))
    try:
        for manifest in (no_url, both):
            kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
        for name, words in (("upgrade-no-url", 'missing required parameter "downloadURL"'),
                            ("reset-both", "machineRef and machineSelector are both set")):
            wait_until(f"{name} to end", lambda n=name: phase(kube, n) in ("Complete", "Failed"), timeout=120)
            cond = kube.condition(name)
            assert (phase(kube, name), cond["reason"]) == ("Failed", "InvalidParameters") and words in cond["message"]
    finally:
        kube.kubectl("apply", "-f", str(MANIFESTS / "crd-machineoperations.yaml"))
    assert not host.path(f"{OPS}/reset").exists()  # the reset never started


def test_deleted_while_pending_behind_another_never_runs_across_a_30_second_partition(env):
    host, kube = env
    pid = daemon_state(host)["MainPID"]
    hold(host, "unbounded-upgrade-preflight@.service", "preflight-before-run")
    try:
        kube.apply(mop("upgrade-first", host.name, "AgentUpgrade", downloadURL=host.urls["refused"]))
        wait_held(host, "preflight-before-run")
        assert phase(kube, "upgrade-first") == "InProgress"
        kube.apply(mop("reset-behind", host.name, "AgentReset"))
        wait_until("the reset to wait", lambda: "waiting for AgentUpgrade upgrade-first" in
                   ((kube.get("reset-behind") or {}).get("status") or {}).get("message", ""), timeout=60)
        uid = kube.get("reset-behind")["metadata"]["uid"]
        kube.cut(host)  # the agent loses the API server; kubectl still reaches it
        cut_at = time.monotonic()
        kube.kubectl("delete", "mop", "reset-behind")
    finally:
        unhold(host, "unbounded-upgrade-preflight@.service")
        release_hold(host, "preflight-before-run")
    try:
        # The upgrade ends on the host (its release is refused by preflight: no daemon restart). The same daemon
        # still has the reset in its cache and takes it up, but decides nothing before a fresh read.
        progress = host.path(f"{PROGRESS}/{uid}.json")
        wait_until("the reset to be taken up from the cache", progress.exists, timeout=120)
        time.sleep(max(0.0, PARTITION - (time.monotonic() - cut_at)))
        assert json.loads(progress.read_text())["step"] == "accepted"
        assert not list(host.path(f"{OPS}/spool/requests").glob("*reset*"))
    finally:
        kube.mend(host)
    wait_until("the upgrade's end to be published", lambda: phase(kube, "upgrade-first") == "Failed", timeout=180)
    assert kube.condition("upgrade-first")["reason"] == "PreflightFailed"
    wait_until("the reset to be forgotten", lambda: not progress.exists(), timeout=120)
    assert "AgentReset reset-behind was deleted before it started: not running it" in journal_of(host)
    assert [json.loads(p.read_text())["kind"] for p in host.path(f"{OPS}/results").glob("*.json")
            if "reset" in p.name] == []
    assert not host.path(f"{OPS}/reset").exists()
    assert daemon_state(host)["ActiveState"] == "active" and daemon_state(host)["MainPID"] == pid


def test_a_rotated_client_certificate_is_used_without_a_restart(env):
    host, kube = env
    pid = daemon_state(host)["MainPID"]
    # Revoked before the new one is in place: the agent's writes are refused (401) and wait.
    kube.revoke_agent_cert(kube.agent_certs[host.name])
    kube.apply(mop("reboot-during-rotation", host.name, "NodeReboot"))
    wait_until("a refused write", lambda: any(r.code == 401 for r in kube.agent_requests()), timeout=60)
    assert phase(kube, "reboot-during-rotation") == "Pending"
    kube.install_agent_cert(host)  # the new certificate and key renamed over the old files
    wait_until("the status to be written", lambda: phase(kube, "reboot-during-rotation") == "Failed", timeout=120)
    assert kube.condition("reboot-during-rotation")["reason"] == "UnsupportedOperation"
    # And the other way round: the new files first, then the old one revoked.
    old = kube.agent_certs[host.name]
    kube.install_agent_cert(host)
    kube.revoke_agent_cert(old)
    kube.apply(mop("reboot-after-rotation", host.name, "NodeReboot"))
    wait_until("the status to be written", lambda: phase(kube, "reboot-after-rotation") == "Failed", timeout=120)
    assert daemon_state(host)["MainPID"] == pid  # no restart
    assert "loaded the credentials again" in journal_of(host)


def test_the_agent_cannot_speak_for_another_machine(env, capsys):
    host, kube = env
    kube.apply(mop("reset-worker-02", "worker-02", "AgentReset"))
    as_agent = agent_kubeconfig(kube, host)
    whoami = kube.kubectl("auth", "whoami", kubeconfig=as_agent).stdout
    checks = [("update", "machineoperations/reset-worker-02", "--subresource=status"),
              ("delete", "machineoperations/reset-worker-02"),
              ("update", "machineoperations/reset-worker-02"),
              ("create", "machineoperations"),
              ("patch", "machines/worker-02")]
    answers = {" ".join(c): kube.kubectl("auth", "can-i", *c, kubeconfig=as_agent, check=False).stdout.strip()
               for c in checks}
    assert list(answers.values()) == ["yes", "yes", "no", "no", "yes"]  # RBAC cannot tell machines apart
    forged = kube.kubectl("patch", "mop", "reset-worker-02", "--subresource=status", "--type=merge", "-p",
                          '{"status": {"phase": "Complete", "message": "AgentReset completed"}}',
                          kubeconfig=as_agent, check=False)
    assert forged.returncode == 1 and forged.stderr.startswith("Error from server (Forbidden)")
    assert f"ValidatingAdmissionPolicy '{POLICY}' with binding '{POLICY}' denied request" in forged.stderr
    assert phase(kube, "reset-worker-02") == "Pending"
    with capsys.disabled():
        print(f"\n$ kubectl auth whoami   # with the agent's client certificate\n{whoami.rstrip()}")
        for check, answer in answers.items():
            print(f"$ kubectl auth can-i {check}\n{answer}")
        print("$ kubectl patch mop reset-worker-02 --subresource=status --type=merge "
              "-p '{\"status\": {\"phase\": \"Complete\", ...}}'\n" + forged.stderr.rstrip())
    # Every write the agent made itself in this module passed the policy.
    refused = [str(r) for r in kube.agent_requests() if r.code == 403]
    assert refused == []
