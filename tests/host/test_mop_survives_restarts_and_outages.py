"""An AgentUpgrade MachineOperation survives what happens to the daemon and the API server: the daemon
restarted or killed (kill -9) while the upgrade stages, or killed on probation, never runs the operation
twice and never leaves it InProgress for good; an API server unavailable for 30 s while the upgrade
switches and commits delays only the status, which catches up once the server is back."""

import json
import time

import pytest
import releases
from mop_host import KubeLink, daemon_state, journal_of, kill9_daemon, mop, wait_until
from upgrade_host import hold, release_hold, unhold, wait_held

pytestmark = pytest.mark.testhost

OUTAGE = 30.0
VERSIONS = ("2.0.0", "3.0.0", "4.0.0", "5.0.0")


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("mop-restart-releases")
    return {v: releases.real_release(repo_root, v, out / v) for v in VERSIONS}


@pytest.fixture(scope="module")
def env(testhost_factory, built, tmp_path_factory):
    with testhost_factory("mop-restarts", installed=True) as host:
        kube = KubeLink.start(host, tmp_path_factory.mktemp("kube"))
        try:
            kube.configure_agent(host)
            host.urls = {v: host.serve(path, f"agent-{v}.tar.gz") for v, path in built.items()}
            yield host, kube
        finally:
            kube.stop()


def phase(kube, name):
    return ((kube.get(name) or {}).get("status") or {}).get("phase")


def record(host) -> dict:
    return json.loads(host.read("/var/lib/unbounded-agent/upgrade.json"))


def version_on(host) -> str:
    return host.run(["unbounded-agent", "version"]).stdout.split()[-1]


@pytest.mark.parametrize("how, target", [("kill -9", "2.0.0"), ("systemctl restart", "3.0.0")])
def test_daemon_stopped_while_the_upgrade_stages_runs_it_once(env, how, target):
    host, kube = env
    name = f"upgrade-{how.split()[-1].replace('-', '')}-{target.replace('.', '-')}"
    hold(host, "unbounded-upgrade-stage@.service", "stage-before-extract")
    try:
        kube.apply(mop(name, host.name, "AgentUpgrade", downloadURL=host.urls[target]))
        wait_held(host, "stage-before-extract")
        assert phase(kube, name) == "InProgress"
        if how == "kill -9":
            kill9_daemon(host)
        else:
            host.run(["systemctl", "restart", "unbounded-agent-daemon.service"])
        # the new daemon finds its progress: the request is queued, and it follows the request's result
        wait_until("the new daemon to resume", lambda: f"AgentUpgrade {name} (submitted)" in journal_of(host))
    finally:
        unhold(host, "unbounded-upgrade-stage@.service")
        release_hold(host, "stage-before-extract")
    wait_until(f"{name} to finish", lambda: phase(kube, name) in ("Complete", "Failed"))
    assert phase(kube, name) == "Complete" and version_on(host) == target
    rec = record(host)
    assert rec["operation"].startswith(f"{name}@")
    assert [h["phase"] for h in rec["history"]].count("requested") == 1  # the chain was started once
    # one request was queued for it, and run once
    results = [json.loads(p.read_text()) for p in host.path("/var/lib/unbounded-agent-ops/results").glob("*.json")]
    assert [r["id"] for r in results if r["operation"] == rec["operation"]] == [rec["id"]]
    assert journal_of(host, "unbounded-agent-dispatch.service").count(f"(request {rec['id']}, from machineoperation)") == 1
    assert journal_of(host).count(f"AgentUpgrade {name} accepted") == 1


def test_daemon_killed_on_probation_is_rolled_back_and_reported(env):
    host, kube = env
    before = version_on(host)
    name = "upgrade-killed-on-probation"
    kube.apply(mop(name, host.name, "AgentUpgrade", downloadURL=host.urls["4.0.0"]))
    wait_until("the new daemon to run on probation",
               lambda: record(host).get("operation", "").startswith(name) and record(host)["phase"] == "probation"
               and daemon_state(host)["ActiveState"] == "active" and "version 4.0.0 starting" in journal_of(host),
               poll=0.05)
    kill9_daemon(host)  # the new daemon dies on probation: that is a failed upgrade
    wait_until(f"{name} to finish", lambda: phase(kube, name) in ("Complete", "Failed"))
    cond = kube.condition(name)
    assert (phase(kube, name), cond["reason"]) == ("Failed", "DaemonFailed") and "rolled back" in cond["message"]
    assert version_on(host) == before and daemon_state(host)["ActiveState"] == "active"


def test_status_catches_up_after_a_30_second_api_outage(env):
    host, kube = env
    name = "upgrade-during-outage"
    kube.apply(mop(name, host.name, "AgentUpgrade", downloadURL=host.urls["5.0.0"]))
    wait_until("InProgress", lambda: phase(kube, name) == "InProgress")
    kube.server.pause(mode="refuse")  # the API server is gone: the upgrade goes on without it
    paused_at = time.monotonic()
    try:
        wait_until("the upgrade to commit without the API server",
                   lambda: record(host).get("operation", "").startswith(name) and record(host)["phase"] in
                   ("committed", "rolled-back", "failed"), timeout=120)
        assert record(host)["phase"] == "committed"  # an unreachable API server never causes a rollback
        host.run(["systemctl", "restart", "unbounded-agent-daemon.service"])  # and a restart loses nothing
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - paused_at)))  # the outage lasts 30 s in all
    finally:
        kube.server.resume()
    wait_until(f"{name} to be published", lambda: phase(kube, name) in ("Complete", "Failed"), timeout=120)
    assert phase(kube, name) == "Complete" and kube.condition(name)["reason"] == "Succeeded"
    assert version_on(host) == "5.0.0"



def test_two_operations_for_one_host_run_one_after_the_other(env):
    host, kube = env
    with kube.watch() as w:
        kube.apply(mop("upgrade-first", host.name, "AgentUpgrade", downloadURL=host.urls["2.0.0"]))
        kube.apply(mop("upgrade-second", host.name, "AgentUpgrade", downloadURL=host.urls["3.0.0"]))
        w.wait_phase("upgrade-second", "Complete", "Failed")
    assert w.phases("upgrade-first")[-3:] == ["Pending", "InProgress", "Complete"], w.lines
    assert w.phases("upgrade-second")[-3:] == ["Pending", "InProgress", "Complete"], w.lines
    # kubectl printed the events in the order the server had them: the first finished before the second began
    lines = [line.split() for line in w.lines]
    first_done = next(i for i, c in enumerate(lines) if c[:1] == ["upgrade-first"] and "Complete" in c)
    second_began = next(i for i, c in enumerate(lines) if c[:1] == ["upgrade-second"] and "InProgress" in c)
    assert first_done < second_began
    assert version_on(host) == "3.0.0"
    waiting = [e for e in kube.server.history if e.obj.get("metadata", {}).get("name") == "upgrade-second"
               and "waiting for AgentUpgrade upgrade-first" in (e.obj.get("status") or {}).get("message", "")]
    assert waiting  # while it waited, its message named the operation in progress
