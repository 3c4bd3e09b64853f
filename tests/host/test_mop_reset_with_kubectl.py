"""AgentReset as an operator runs it: `kubectl apply -f reset.yaml`; `kubectl get mop NAME -w` shows
Pending → InProgress → Complete. Complete means the host is clean but for the running daemon: when kubectl
shows it, the machines, links, keys, routing and the agent's own files (its binary, config and state) are
gone, and the daemon that published it — running from memory — is stopped only afterwards. A reset whose
step fails (one of steps 1–6, or the removal of the agent's files) ends Failed naming the step, the daemon
keeps running and the next operation runs. A daemon killed while phase 1 runs does not start the reset
twice."""

import json
import re

import pytest
from mop_host import KubeLink, daemon_state, journal_of, kill9_daemon, mop, unit_started_at, wait_until
from queue_host import hold, release, unhold
from queue_host import wait_held as wait_hold_point

pytestmark = pytest.mark.testhost

OPS = "/var/lib/unbounded-agent-ops"
FINISH_REPORT = f"{OPS}/reset/reports/10-finish.json"
AGENT_FILES = ("/var/lib/unbounded-agent", "/etc/unbounded/agent", "/var/lib/unbounded-agent/bin/unbounded-agent-blue")
DISPATCH = "unbounded-agent-dispatch.service"
HOLD_FILE = "/var/lib/test-hold-reset"
# Makes the first reset step wait until HOLD_FILE is removed: phase 1 is "running" for as long as we like.
HOLD_DROPIN = f"[Service]\nExecStartPre=/bin/sh -c 'while [ -e {HOLD_FILE} ]; do sleep 0.1; done'\n"
FAIL_DROPIN = "[Service]\nExecStart=\nExecStart=/bin/sh -c 'echo simulated failure >&2; exit 21'\n"


def drop_in(host, unit: str, text: str) -> None:
    host.write(f"/etc/systemd/system/{unit}.d/50-test.conf", text)
    host.run(["systemctl", "daemon-reload"])


def remove_drop_in(host, unit: str) -> None:
    host.run(["rm", "-rf", f"/etc/systemd/system/{unit}.d"])
    host.run(["systemctl", "daemon-reload"])


@pytest.fixture
def env(testhost_factory, tmp_path):
    with testhost_factory("mop-reset", installed=True) as host:
        kube = KubeLink.start(host, tmp_path)
        try:
            kube.configure_agent(host)
            yield host, kube
        finally:
            kube.stop()


def test_complete_means_clean_and_comes_before_the_daemon_stops(env, capsys):
    host, kube = env
    pid = daemon_state(host)["MainPID"]
    hold(host, DISPATCH, "reset-gate-passed")  # the dispatcher waits after the gate, before phase 2
    try:
        with kube.watch() as w:
            kube.apply(mop("reset-agent-1", host.name, "AgentReset"))
            w.wait_phase("reset-agent-1", "Complete", "Failed")
            wait_hold_point(host, OPS, "reset-gate-passed")
        assert w.phases("reset-agent-1") == ["Pending", "InProgress", "Complete"], w.lines
        cond = kube.condition("reset-agent-1")
        assert (cond["status"], cond["reason"]) == ("True", "Succeeded")
        assert cond["message"].startswith("AgentReset completed: the agent, its machines, links, keys and routing")
        # Complete is on the server: the agent's files are gone, yet the daemon that said so still runs, from
        # memory (the zipapp it was started from is gone)
        assert [p for p in AGENT_FILES if host.path(p).exists()] == []
        assert (daemon_state(host)["ActiveState"], daemon_state(host)["MainPID"]) == ("active", pid)
        assert not host.path("/var/lib/unbounded-agent/bin/unbounded-agent-current").is_symlink()
        assert "unbounded-agent-reset-stop-daemon" not in journal_of(host, "unbounded-agent-reset-stop-daemon.service")
    finally:
        unhold(host, DISPATCH)
        release(host, OPS, "reset-gate-passed")
    wait_until("phase 2 to finish the reset", lambda: host.path(FINISH_REPORT).exists())
    assert daemon_state(host).get("ActiveState") == "inactive"
    assert "AgentReset reset-agent-1 Complete" in journal_of(host)
    assert "received SIGTERM, stopping" in journal_of(host)  # stopped by phase 2
    assert host.run(["systemctl", "is-enabled", "unbounded-agent-daemon.service"], check=False).stdout.strip() == "disabled"
    writes = [r for r in kube.agent_requests(name="reset-agent-1") if r.verb == "update" and r.code == 200]
    assert len(writes) == 3  # Pending, InProgress, Complete
    created = next(r.time for r in kube.server.requests if r.verb == "create" and r.resource == "machineoperations")
    assert writes[-1].time < unit_started_at(host, "unbounded-agent-reset-stop-daemon.service", after=created)
    assert json.loads(host.read(FINISH_REPORT))["result"] == "succeeded"
    # the dispatcher ran it as one request, waited at its gate, and wrote its result
    request_id = json.loads(host.read(FINISH_REPORT))["run_id"]
    res = wait_until("the reset's result", lambda: host.path(f"{OPS}/results/{request_id}.json").exists()
                     and json.loads(host.read(f"{OPS}/results/{request_id}.json")))
    assert (res["source"], res["succeeded"]) == ("machineoperation", True)
    dispatcher = journal_of(host, DISPATCH)
    assert dispatcher.index("waiting for its requester to report") < dispatcher.index(
        f"reset {request_id}: starting unbounded-agent-reset-phase2.target")
    assert not any(p.suffix == ".json" for p in host.path(f"{OPS}/gates").iterdir())
    assert not host.path("/var/lib/unbounded-agent").exists()  # not made again by the daemon's last writes
    assert not host.path("/etc/unbounded/agent/config.yaml").exists()
    story = kube.kubectl("describe", "mop", "reset-agent-1").stdout
    for reason in ("Accepted", "ResetStarted", "ResetStep", "Completed"):
        assert f" {reason} " in story.partition("\nEvents:")[2]
    assert re.search(r"Reason:\s+Succeeded\n", story) and re.search(r"Phase:\s+Complete\n", story)
    events = story.partition("\nEvents:")[2]
    assert events.index(" ResetStarted ") < events.index(" ResetStep ") < events.index(" Completed ")
    created = next(r.time for r in kube.server.requests if r.verb == "create" and r.resource == "machineoperations")
    started = unit_started_at(host, "unbounded-agent-reset-begin.service", after=created)
    with capsys.disabled():
        print(f"\n$ kubectl describe mop reset-agent-1\n{story}")
        print(f"\nAgentReset: operation created → reset-begin unit starting: {1000 * (started - created):.0f} ms; "
              f"agent requests about it: {len(kube.agent_requests(name='reset-agent-1'))} status writes, "
              f"{len(kube.agent_requests(resource='events'))} events")


def test_failed_step_fails_the_reset_and_the_daemon_keeps_running(env):
    host, kube = env
    drop_in(host, "unbounded-agent-reset-remove-wireguard-keys.service", FAIL_DROPIN)
    pid = daemon_state(host)["MainPID"]
    with kube.watch() as w:
        kube.apply(mop("reset-agent-fail", host.name, "AgentReset"))
        w.wait_phase("reset-agent-fail", "Complete", "Failed")
    cond = kube.condition("reset-agent-fail")
    assert cond["reason"] == "ExecutionFailed" and "remove-wireguard-keys" in cond["message"]
    assert daemon_state(host)["ActiveState"] == "active" and daemon_state(host)["MainPID"] == pid
    assert "unbounded-agent-reset-phase2" not in journal_of(host, DISPATCH)
    assert all(host.path(p).exists() for p in AGENT_FILES)  # remove-agent needs steps 1-6: it did not run
    # fixed, a new operation resets the host (finished steps find nothing to do)
    remove_drop_in(host, "unbounded-agent-reset-remove-wireguard-keys.service")
    with kube.watch() as w:
        kube.apply(mop("reset-agent-again", host.name, "AgentReset"))
        w.wait_phase("reset-agent-again", "Complete", "Failed")
    assert w.phases("reset-agent-again")[-1] == "Complete"


def test_daemon_killed_during_phase1_does_not_run_the_reset_twice(env):
    host, kube = env
    host.write(HOLD_FILE, "")
    drop_in(host, "unbounded-agent-reset-stop-machines.service", HOLD_DROPIN)
    kube.apply(mop("reset-agent-kill", host.name, "AgentReset"))
    wait_until("phase 1 to run", lambda: "Starting unbounded-agent-reset-stop-machines"
               in journal_of(host, "unbounded-agent-reset-stop-machines.service"))
    assert kube.get("reset-agent-kill")["status"]["phase"] == "InProgress"
    kill9_daemon(host)
    # the new daemon finds its progress (the reset is queued) and follows the request's result
    wait_until("the new daemon to resume", lambda: "AgentReset reset-agent-kill (submitted)" in journal_of(host))
    host.run(["rm", "-f", HOLD_FILE])
    wait_until("Complete", lambda: (kube.get("reset-agent-kill").get("status") or {}).get("phase") in
               ("Complete", "Failed"))
    assert kube.get("reset-agent-kill")["status"]["phase"] == "Complete", kube.condition("reset-agent-kill")
    starts = journal_of(host, "unbounded-agent-reset-stop-machines.service").count("Starting unbounded-agent-reset")
    assert starts == 1
    assert journal_of(host).count("AgentReset reset-agent-kill accepted") == 1


def test_reset_of_a_bootstrapped_host_removes_what_the_agent_made_and_nothing_else(env):
    from bootstrapped_host import bootstrap, snapshot

    host, kube = env
    fx = bootstrap(host)  # machines kube1/kube2, links, keys, routing, plus decoys (it rewrites the config)
    kube.configure_agent(host)
    with kube.watch() as w:
        kube.apply(mop("reset-bootstrapped", host.name, "AgentReset"))
        w.wait_phase("reset-bootstrapped", "Complete", "Failed")
    assert w.phases("reset-bootstrapped")[-1] == "Complete", kube.condition("reset-bootstrapped")
    wait_until("phase 2 to finish the reset", lambda: host.path(FINISH_REPORT).exists())
    assert json.loads(host.read(FINISH_REPORT))["result"] == "succeeded"
    snap = snapshot(host)
    assert fx.items - fx.gone(snap) == set()
    assert fx.decoys - fx.kept(snap) == set()


# Ways the removal of the agent's own files (step 7, before Complete) cannot finish, and how to undo them.
BLOCKERS = {
    "a busy mount": (
        "mkdir -p /var/lib/unbounded-agent/data && mount -t tmpfs tmpfs /var/lib/unbounded-agent/data && "
        "systemd-run --unit=busy-in-state --working-directory=/var/lib/unbounded-agent/data sleep infinity",
        "systemctl stop busy-in-state.service", "UnsafeRemoval", "cannot unmount /var/lib/unbounded-agent/data"),
    "an immutable file": (
        "touch /var/lib/unbounded-agent/locked && chattr +i /var/lib/unbounded-agent/locked",
        "chattr -i /var/lib/unbounded-agent/locked", "UnsafeRemoval", "/var/lib/unbounded-agent/locked is immutable"),
}


@pytest.mark.parametrize("blocker", sorted(BLOCKERS))
def test_removing_the_agent_fails_the_operation_and_the_daemon_keeps_running(env, blocker):
    host, kube = env
    make, undo, reason, says = BLOCKERS[blocker]
    host.sh(make)
    pid = daemon_state(host)["MainPID"]
    name = "reset-" + blocker.split()[-1]
    with kube.watch() as w:
        kube.apply(mop(name, host.name, "AgentReset"))
        w.wait_phase(name, "Complete", "Failed")
    cond = kube.condition(name)
    assert (cond["status"], cond["reason"]) == ("False", reason)
    assert cond["message"].startswith("reset step 7 (remove-agent) failed: refusing to remove") and says in cond["message"]
    assert (daemon_state(host)["ActiveState"], daemon_state(host)["MainPID"]) == ("active", pid)
    assert all(host.path(p).exists() for p in AGENT_FILES)  # nothing of the agent was removed
    assert host.run(["unbounded-agent", "version"]).returncode == 0
    assert "unbounded-agent-reset-phase2" not in journal_of(host, DISPATCH)
    # the cause removed, the next operation for the machine runs, and resets the host
    host.sh(undo)
    # a reset of an earlier test may have left its finish report: this reset's is another
    earlier = host.read(FINISH_REPORT) if host.path(FINISH_REPORT).exists() else None
    with kube.watch() as w:
        kube.apply(mop(f"{name}-again", host.name, "AgentReset"))
        w.wait_phase(f"{name}-again", "Complete", "Failed")
    assert w.phases(f"{name}-again")[-1] == "Complete", kube.condition(f"{name}-again")
    # phase 2 stops the daemon, then removes the state directory it may have made again: wait for its end,
    # not for the daemon's stop
    wait_until("phase 2 to finish the reset",
               lambda: host.path(FINISH_REPORT).exists() and host.read(FINISH_REPORT) != earlier)
    assert json.loads(host.read(FINISH_REPORT))["result"] == "succeeded"
    assert daemon_state(host).get("ActiveState") == "inactive"
    assert not host.path("/var/lib/unbounded-agent").exists()
