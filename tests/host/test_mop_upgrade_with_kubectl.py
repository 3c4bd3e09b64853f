"""AgentUpgrade as an operator runs it: `kubectl apply -f upgrade.yaml`, then `kubectl get mop NAME -w`
shows Pending → InProgress → Complete with the columns of the docs (NAME KIND MACHINE PHASE AGE). The
daemon comes from the .deb, the releases from `make release`, served over HTTPS on the host; the daemon
only queues each operation, and the dispatcher runs it. A crashing release ends Failed/DaemonFailed,
published by the restored old daemon, while the host keeps the good version; an invalid URL fails at
once. Each operation runs exactly once, and a status write the API server could not take is published
when it is back."""

import json
import re

import pytest
import releases
from mop_host import KubeLink, daemon_state, journal_of, mop, rss_kib, unit_started_at, wait_until

pytestmark = pytest.mark.testhost

BIN = "/var/lib/unbounded-agent/bin"


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("mop-releases")
    return {
        "2.0.0": releases.real_release(repo_root, "2.0.0", out / "2.0.0"),
        "3.0.0": releases.real_release(repo_root, "3.0.0", out / "3.0.0"),
        "crash": releases.script_release(out / "crash.tar.gz", version="9.0.0", daemon="crash"),
    }


@pytest.fixture(scope="module")
def env(testhost_factory, built, tmp_path_factory):
    with testhost_factory("mop-worker", installed=True) as host:
        kube = KubeLink.start(host, tmp_path_factory.mktemp("kube"))
        try:
            # the host's Machine (the test server's stand-in type), to carry the agent version annotation
            kube.apply({"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                        "metadata": {"name": host.name}, "spec": {}})
            kube.configure_agent(host)
            host.urls = {v: host.serve(path, f"agent-{v}.tar.gz") for v, path in built.items()}
            yield host, kube
        finally:
            kube.stop()


def version_on(host) -> str:
    return host.run(["unbounded-agent", "version"]).stdout.strip()


def record(host) -> dict:
    return json.loads(host.read("/var/lib/unbounded-agent/upgrade.json"))


def describe(kube, name: str, *reasons: str) -> str:
    """`kubectl describe mop NAME` once these Events are on the server: the whole story, conditions and Events."""
    wait_until(f"the Events of {name}", lambda: all(f" {r} " in kube.kubectl("describe", "mop", name).stdout
                                                    for r in reasons), timeout=60)
    return kube.kubectl("describe", "mop", name).stdout


def test_good_upgrade_shows_pending_inprogress_complete(env, version, capsys):
    host, kube = env
    assert version_on(host) == f"unbounded-agent {version}"
    url = host.urls["2.0.0"] + "?sig=topsecret"
    with kube.watch() as w:
        print(kube.apply(mop("upgrade-agent-1", host.name, "AgentUpgrade", downloadURL=url)))
        w.wait_phase("upgrade-agent-1", "Complete", "Failed")
    assert w.header == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]
    assert w.phases("upgrade-agent-1") == ["Pending", "InProgress", "Complete"], w.lines  # Pending from the start
    row = w.rows("upgrade-agent-1")[-1]
    assert (row["KIND"], row["MACHINE"]) == ("AgentUpgrade", host.name)
    cond = kube.condition("upgrade-agent-1")
    assert (cond["status"], cond["reason"]) == ("True", "Succeeded") and "to 2.0.0" in cond["message"]
    assert version_on(host) == "unbounded-agent 2.0.0"
    # The new daemon published it: the old one was stopped by the switch before probation committed.
    assert "version 2.0.0 starting" in journal_of(host)
    rec = record(host)
    assert rec["operation"].startswith("upgrade-agent-1@") and rec["phase"] == "committed"
    assert [h["phase"] for h in rec["history"]].count("requested") == 1
    # the watcher only queued it: the dispatcher ran it under the request's id and wrote its result
    res = json.loads(host.read(f"/var/lib/unbounded-agent-ops/results/{rec['id']}.json"))
    assert (res["source"], res["operation"], res["succeeded"]) == ("machineoperation", rec["operation"], True)
    # `kubectl describe machine` shows what `unbounded-agent version` shows: the new daemon said so
    annotation = "jsonpath={.metadata.annotations.unbounded-cloud\\.io/agent-version}"
    wait_until("the Machine annotation", lambda: kube.kubectl("get", "machine", host.name, "-o", annotation)
               .stdout == "2.0.0", timeout=30)
    def event_reasons():
        out = kube.kubectl("get", "events", "-A", "--field-selector", "involvedObject.name=upgrade-agent-1",
                           "-o", "jsonpath={.items[*].reason}").stdout
        return out.split()
    wait_until("the Completed Event", lambda: "Completed" in event_reasons(), timeout=30)
    assert {"Accepted", "UpgradeStarted", "UpgradePhase"} <= set(event_reasons())
    story = describe(kube, "upgrade-agent-1", "Accepted", "UpgradeStarted", "UpgradePhase", "Completed")
    assert re.search(r"Reason:\s+Succeeded\n", story) and re.search(r"Phase:\s+Complete\n", story)
    events = story.partition("\nEvents:")[2]
    assert events.index(" UpgradeStarted ") < events.index(" UpgradePhase ") < events.index(" Completed ")
    with capsys.disabled():
        print(f"\n$ kubectl describe mop upgrade-agent-1\n{story}")
    # the spec holds what the user wrote; nothing the agent wrote holds the query's secret
    events = kube.kubectl("get", "events", "-A", "-o", "json").stdout
    assert "topsecret" not in events + json.dumps(kube.get("upgrade-agent-1")["status"]) + journal_of(host)


def test_crashing_release_fails_with_daemon_failed_and_keeps_the_good_version(env, capsys):
    host, kube = env
    with kube.watch() as w:
        kube.apply(mop("upgrade-agent-crash", host.name, "AgentUpgrade", downloadURL=host.urls["crash"]))
        w.wait_phase("upgrade-agent-crash", "Complete", "Failed")
    assert w.phases("upgrade-agent-crash") == ["Pending", "InProgress", "Failed"], w.lines
    cond = kube.condition("upgrade-agent-crash")
    assert (cond["status"], cond["reason"]) == ("False", "DaemonFailed")
    assert "rolled back to 2.0.0" in cond["message"] and "exit code 3" in cond["message"]
    assert version_on(host) == "unbounded-agent 2.0.0" and daemon_state(host)["ActiveState"] == "active"
    out = kube.kubectl("get", "mop", "upgrade-agent-crash", "-o", "wide").stdout
    assert "DaemonFailed" in out
    story = describe(kube, "upgrade-agent-crash", "Accepted", "UpgradeStarted", "DaemonFailed")
    assert re.search(r"Reason:\s+DaemonFailed\n", story) and re.search(r"Warning\s+DaemonFailed", story)
    with capsys.disabled():
        print(f"\n$ kubectl describe mop upgrade-agent-crash\n{story}")


def test_invalid_url_fails_at_once(env):
    host, kube = env
    pid = daemon_state(host)["MainPID"]
    with kube.watch() as w:
        kube.apply(mop("upgrade-agent-bad-url", host.name, "AgentUpgrade", downloadURL="ftp://example.com/a.tar.gz"))
        w.wait_phase("upgrade-agent-bad-url", "Complete", "Failed")
    assert "InProgress" not in w.phases("upgrade-agent-bad-url")
    cond = kube.condition("upgrade-agent-bad-url")
    assert cond["reason"] == "InvalidParameters" and "scheme" in cond["message"]
    assert daemon_state(host)["MainPID"] == pid  # nothing happened on the host


def test_another_machines_operation_is_never_touched(env):
    host, kube = env
    kube.apply(mop("upgrade-elsewhere", "some-other-host", "AgentUpgrade", downloadURL=host.urls["3.0.0"]))
    kube.apply(mop("reset-elsewhere", "some-other-host", "AgentReset"))
    kube.apply(mop("marker", host.name, "NodeReboot"))  # handled after the two above were seen
    wait_until("the marker to fail", lambda: (kube.get("marker").get("status") or {}).get("phase") == "Failed")
    for name in ("upgrade-elsewhere", "reset-elsewhere"):
        assert kube.get(name)["status"] == {"phase": "Pending"}  # the CRD's default only
        assert not kube.agent_requests(name=name)


def test_measurements(env, capsys):
    """Not a check of speed: the numbers for the closing note, printed (-s or the report's captured output)."""
    host, kube = env
    kube.server.clear_requests()
    with kube.watch() as w:
        kube.apply(mop("upgrade-agent-3", host.name, "AgentUpgrade", downloadURL=host.urls["3.0.0"]))
        w.wait_phase("upgrade-agent-3", "Complete", "Failed")
    assert w.phases("upgrade-agent-3")[-1] == "Complete"
    created = next(r.time for r in kube.server.requests if r.verb == "create" and r.resource == "machineoperations")
    started = unit_started_at(host, "unbounded-upgrade-stage@*", after=created)
    reqs = kube.agent_requests()
    about = [r for r in reqs if r.name == "upgrade-agent-3" or r.resource == "events"]
    with capsys.disabled():
        print(f"\nAgentUpgrade: operation created → stage unit starting: {1000 * (started - created):.0f} ms")
        print(f"agent requests during one AgentUpgrade (incl. the new daemon's list and watch): {len(reqs)}; "
              f"about the operation: {len(about)} (" + ", ".join(f"{r.verb} {r.resource}" for r in about) + ")")
        print(f"watcher RSS: {rss_kib(host)} KiB")
    assert len(about) >= 3
