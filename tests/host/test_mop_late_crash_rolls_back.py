"""The late crash driven by a MachineOperation: the AgentUpgrade is committed and reported Complete; its daemon
then crash-loops, is rolled back after its commit, and the restored daemon adds to the Complete operation a
condition RolledBack (DaemonFailedAfterCommit) and a Warning Event, and sets the Machine's agent-version
annotation back to the version that runs."""

import json

import pytest
import releases
from mop_host import AGENT_CONFIG, KubeLink, daemon_state, mop, wait_until

pytestmark = pytest.mark.testhost

ANNOTATION = "jsonpath={.metadata.annotations.unbounded-cloud\\.io/agent-version}"
# the defaults for probation (10 s) and readiness (60 s): only the cluster and a short grace for the API
CONFIG = "\n".join(line for line in AGENT_CONFIG.splitlines()
                   if not line.startswith(("probationSeconds", "readyTimeoutSeconds"))) + "\n"


@pytest.fixture(scope="module")
def env(testhost_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("late")
    with testhost_factory("mop-late", installed=True) as host:
        kube = KubeLink.start(host, tmp_path_factory.mktemp("kube"))
        try:
            kube.apply({"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                        "metadata": {"name": host.name}, "spec": {}})
            kube.configure_agent(host, config=CONFIG)
            host.url = host.serve(releases.script_release(out / "late.tar.gz", version="9.6.0", daemon="late-crash",
                                                          seconds=15), "late.tar.gz")
            yield host, kube
        finally:
            kube.stop()


def record(host) -> dict:
    return json.loads(host.read("/var/lib/unbounded-agent/upgrade.json"))


def test_a_complete_upgrade_rolled_back_later_shows_a_condition_and_a_warning(env, version):
    host, kube = env
    wait_until("the Machine annotation", lambda: kube.kubectl("get", "machine", host.name, "-o", ANNOTATION)
               .stdout == version, timeout=60)
    kube.apply(mop("upgrade-late", host.name, "AgentUpgrade", downloadURL=host.url))
    wait_until("the commit", lambda: host.path("/var/lib/unbounded-agent/upgrade.json").exists()
               and record(host)["operation"].startswith("upgrade-late@") and record(host)["phase"] == "committed",
               timeout=180)
    # what the new release's own daemon would have written at its start (this test release has no watcher)
    kube.kubectl("annotate", "--overwrite", "machine", host.name, "unbounded-cloud.io/agent-version=9.6.0")

    def rolled_back():
        op = kube.get("upgrade-late") or {}
        conds = {c["type"]: c for c in (op.get("status") or {}).get("conditions") or []}
        return conds.get("RolledBack")

    cond = wait_until("the RolledBack condition", rolled_back, timeout=600)
    assert (cond["status"], cond["reason"]) == ("True", "DaemonFailedAfterCommit")
    assert f"rolled back to {version}" in cond["message"] and "exit code 1" in cond["message"]
    op = kube.get("upgrade-late")
    assert op["status"]["phase"] == "Complete" and kube.condition("upgrade-late")["reason"] == "Succeeded"

    def warnings():
        out = kube.kubectl("get", "events", "-A", "--field-selector", "involvedObject.name=upgrade-late",
                           "-o", "json").stdout
        return [e for e in json.loads(out)["items"] if e["type"] == "Warning"]

    (warning,) = wait_until("the Warning Event", warnings, timeout=60)
    assert warning["reason"] == "DaemonFailedAfterCommit" and f"rolled back to {version}" in warning["message"]
    assert "DaemonFailedAfterCommit" in kube.kubectl("describe", "mop", "upgrade-late").stdout
    # the Machine says what runs again: the restored daemon's version
    wait_until("the Machine annotation back", lambda: kube.kubectl("get", "machine", host.name, "-o", ANNOTATION)
               .stdout == version, timeout=60)
    rec = record(host)
    assert rec["phase"] == "rolled-back" and rec["after_commit"] and daemon_state(host)["ActiveState"] == "active"
    assert host.run(["unbounded-agent", "version"]).stdout.strip() == f"unbounded-agent {version}"
