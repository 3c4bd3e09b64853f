"""The fan-out controller (bin/unbounded-agent-fleet-controller) against the test API server, with the RBAC and
admission policy of packaging/kubernetes/: children in waves, the halt, cancellation, the parent's status, at
most one child per machine across restarts and a failover, and only the Lease holder ever writing.

The agents are played by the test (fleet_fakes.FakeAgent writes what the agent writes, as that machine's agent),
except where the real watcher runs the children (SimulatedAgents: the agent's parameter checks included)."""

import os
import re
import signal
import subprocess
import time

import pytest
from fleet_fakes import CONTROLLER_USER, Fleet, SimulatedAgents, wait_for

from unbounded_agent.fleet import children, controller, rollout
from unbounded_agent.kube import mop

URL = "https://releases.example/unbounded-agent-linux-amd64.tar.gz"


@pytest.fixture
def fleet(tmp_path):
    with Fleet(tmp_path, machines=5) as f:
        yield f


def created(f) -> list:
    """The controller's successful creates (201), in order, from the server's request log."""
    return [r for r in f.server.find_requests(verb="create", resource="machineoperations", user=CONTROLLER_USER)
            if r.code == 201]


def history(f, name: str) -> list[tuple[int, str, str]]:
    """(resourceVersion, event, phase) of every change of one operation, from the server's own history."""
    with f.server.lock:
        return [(e.rv, e.type, (e.obj.get("status") or {}).get("phase") or "") for e in f.server.history
                if e.store.endswith("machineoperations") and e.obj["metadata"]["name"] == name]


# -- waves -----------------------------------------------------------------------------------------------


def test_a_selector_upgrade_rolls_out_in_waves_with_an_event_per_wave(fleet):
    fleet.start()
    fleet.parent("up", downloadURL=URL, sha256="a" * 64, maxInFlight="2")
    kids = fleet.wait_children("up", 1)
    assert list(kids) == ["worker-01"]  # the canary alone
    fleet.agent(kids["worker-01"]).start()
    assert fleet.wait_phase("up", "InProgress")["status"]["message"].startswith("wave 1 of 3 (canary): worker-01")
    time.sleep(0.5)
    assert len(fleet.children("up")) == 1  # nothing else starts while the canary runs
    fleet.agent(kids["worker-01"]).finish()
    kids = fleet.wait_children("up", 3)
    assert sorted(kids) == ["worker-01", "worker-02", "worker-03"]
    # the second wave was created only after the canary's Complete was on the server
    canary_done = next(rv for rv, _, phase in history(fleet, "up-worker-01") if phase == "Complete")
    assert all(history(fleet, f"up-worker-0{i}")[0][0] > canary_done for i in (2, 3))
    for m in ("worker-02", "worker-03"):
        fleet.agent(kids[m]).finish()
    kids = fleet.wait_children("up", 5)
    for m in ("worker-04", "worker-05"):
        fleet.agent(kids[m]).finish()
    op = fleet.wait_phase("up", "Complete")
    assert op["status"]["message"] == ("AgentUpgrade complete on 5 machine(s) in 3 wave(s); 5 matched: 5 complete, "
                                       "0 failed, 0 in flight, 0 not started")
    assert fleet.condition("up")["reason"] == "Succeeded"
    assert fleet.condition("up", "Progressing")["status"] == "False"
    assert [(t["machineRef"], t["wave"], t["phase"]) for t in op["status"]["targets"]] == [
        ("worker-01", 1, "Complete"), ("worker-02", 2, "Complete"), ("worker-03", 2, "Complete"),
        ("worker-04", 3, "Complete"), ("worker-05", 3, "Complete")]
    wait_for("the last Event", lambda: "Completed" in [e["reason"] for e in fleet.events("up")])
    events = [(e["reason"], e["message"]) for e in fleet.events("up")]
    assert [r for r, _ in events] == ["WaveStarted", "WaveStarted", "WaveStarted", "Completed"]
    assert events[1][1] == "wave 2 of 3: 2 machine(s): worker-02, worker-03 (max in flight 2)"
    assert len(created(fleet)) == 5
    # each child: the parent's kind and parameters, without the rollout's; owned by and labelled for the parent
    child = fleet.get("up-worker-04")
    assert child["spec"] == {"machineRef": "worker-04", "operationKind": "AgentUpgrade",
                             "parameters": {"downloadURL": URL, "sha256": "a" * 64}}
    assert child["metadata"]["labels"] == {children.PARENT_LABEL: "up", children.WAVE_LABEL: "3"}
    assert children.owner_uid(child) == op["metadata"]["uid"]
    wait_for("the finalizer to go once nothing runs",  # then deleting the parent need not wait for the controller
             lambda: children.FINALIZER not in (fleet.get("up")["metadata"].get("finalizers") or []))


def test_the_real_agents_run_the_children(fleet, tmp_path):
    agents = SimulatedAgents(tmp_path / "agents", {m: fleet.agent_kubeconfig(m)
                                                   for m in ("worker-01", "worker-02", "worker-03")})
    fleet.label("worker-04", pool="green")
    fleet.label("worker-05", pool="green")
    agents.start()
    try:
        fleet.start()
        fleet.parent("up", downloadURL=URL, canaryCount="1", maxInFlight="2", failureBudget="0")
        op = fleet.wait_phase("up", "Complete")
        assert op["status"]["message"].endswith("3 matched: 3 complete, 0 failed, 0 in flight, 0 not started")
        assert {m: len(ops) for m, ops in agents.ran.items()} == {"worker-01": 1, "worker-02": 1, "worker-03": 1}
        for m in agents.machines:
            assert fleet.condition(f"up-{m}")["reason"] == "Succeeded"
    finally:
        agents.stop()


def test_a_failed_canary_halts_the_rollout_and_no_other_machine_gets_a_child(fleet):
    fleet.start()
    fleet.parent("up", downloadURL=URL, maxInFlight="4", failureBudget="3")
    kids = fleet.wait_children("up", 1)
    fleet.agent(kids["worker-01"]).finish(ok=False, reason="DaemonFailed", message="the new daemon failed; rolled back")
    op = fleet.wait_phase("up", "Failed")
    assert fleet.condition("up")["reason"] == "Halted"
    assert op["status"]["message"] == (
        "halted: worker-01 (DaemonFailed) failed in the canary wave; no further MachineOperations are created "
        "(failure budget 3); 5 matched: 0 complete, 1 failed, 0 in flight, 4 not started")
    assert op["status"]["targets"] == [{"machineRef": "worker-01", "wave": 1, "phase": "Failed",
                                        "message": "DaemonFailed: the new daemon failed; rolled back"}]
    time.sleep(0.5)
    assert list(fleet.children("up")) == ["worker-01"] and len(created(fleet)) == 1
    wait_for("the Halted Event", lambda: "Halted" in [e["reason"] for e in fleet.events("up")])
    assert [e["reason"] for e in fleet.events("up")] == ["WaveStarted", "Halted"]
    assert next(e for e in fleet.events("up") if e["reason"] == "Halted")["type"] == "Warning"


def test_past_the_failure_budget_the_rollout_halts_and_withdraws_what_has_not_started(fleet):
    fleet.start()
    fleet.parent("up", downloadURL=URL, canaryCount="0", maxInFlight="3", failureBudget="1")
    kids = fleet.wait_children("up", 3)
    fleet.agent(kids["worker-01"]).finish(ok=False, reason="DownloadFailed")  # within the budget
    fleet.agent(kids["worker-02"]).start()  # running: it finishes whatever happens
    fleet.agent(kids["worker-03"]).accept()  # accepted, not started
    time.sleep(0.5)
    assert fleet.phase("up") == "InProgress"
    fleet.agent(kids["worker-02"]).finish(ok=False, reason="PreflightFailed")  # one more than the budget
    fleet.wait_phase("up", "Failed")
    assert fleet.condition("up")["reason"] == "Halted"
    wait_for("the unstarted child to be withdrawn", lambda: fleet.get("up-worker-03") is None)
    wait_for("the counts to say so", lambda: fleet.get("up")["status"]["message"].endswith(
        "5 matched: 0 complete, 2 failed, 0 in flight, 3 not started"))
    op = fleet.get("up")
    assert "worker-01 (DownloadFailed), worker-02 (PreflightFailed) failed;" in op["status"]["message"]
    assert [t["machineRef"] for t in op["status"]["targets"]] == ["worker-01", "worker-02"]
    assert len(created(fleet)) == 3


def test_failures_within_the_budget_let_the_rollout_finish_failed_naming_them(fleet):
    fleet.start()
    fleet.parent("up", downloadURL=URL, canaryCount="1", maxInFlight="4", failureBudget="1")
    fleet.agent(fleet.wait_children("up", 1)["worker-01"]).finish()
    kids = fleet.wait_children("up", 5)
    for m in ("worker-02", "worker-03", "worker-05"):
        fleet.agent(kids[m]).finish()
    fleet.agent(kids["worker-04"]).finish(ok=False, reason="ChecksumMismatch")
    op = fleet.wait_phase("up", "Failed")
    assert fleet.condition("up")["reason"] == "ChildrenFailed"
    assert op["status"]["message"].startswith("1 of 5 machines failed (within the failure budget of 1): "
                                              "worker-04 (ChecksumMismatch)")


# -- cancellation ----------------------------------------------------------------------------------------


def test_deleting_the_parent_withdraws_unstarted_children_and_lets_running_ones_finish(fleet):
    fleet.start()
    fleet.parent("up", downloadURL=URL, canaryCount="0", maxInFlight="3")
    kids = fleet.wait_children("up", 3)
    fleet.agent(kids["worker-01"]).start()
    fleet.agent(kids["worker-02"]).accept()
    uid = fleet.get("up")["metadata"]["uid"]
    assert children.FINALIZER in fleet.get("up")["metadata"]["finalizers"]
    fleet.delete("up")
    wait_for("the unstarted children to be withdrawn",
             lambda: fleet.get("up-worker-02") is None and fleet.get("up-worker-03") is None)
    wait_for("the parent to say so", lambda: fleet.condition("up")["reason"] == "Cancelled")
    op = fleet.get("up")
    assert op["metadata"]["deletionTimestamp"]  # held: worker-01 runs
    assert op["status"]["message"] == ("cancelled: the operation is being deleted; no further MachineOperations are "
                                       "created; waiting for worker-01 to finish; 5 matched: 0 complete, 0 failed, "
                                       "1 in flight, 4 not started")
    fleet.agent(kids["worker-01"]).finish()  # the running one finishes and reports
    wait_for("the parent to go", lambda: fleet.get("up") is None)
    wait_for("its children to go with it", lambda: not fleet.children("up"))
    assert len(created(fleet)) == 3
    assert "Cancelled" in [e["reason"] for e in fleet.events("up") if e["involvedObject"]["uid"] == uid]


def test_a_child_started_while_it_is_withdrawn_runs_on(fleet):
    """The agent's InProgress and the controller's withdrawal race: the withdrawal is conditional on the version
    the controller saw Pending, so either the child never starts, or it runs and is not deleted."""
    fleet.start()
    fleet.parent("up", downloadURL=URL, canaryCount="0", maxInFlight="2")
    kids = fleet.wait_children("up", 2)
    started = []
    orig = fleet.server.handle

    def handle(h):  # the agent of worker-01 starts it just before the controller's withdrawal arrives
        if h.command == "DELETE" and h.path.endswith("/up-worker-01") and not started:
            started.append(fleet.agent(kids["worker-01"]).start())
        orig(h)

    fleet.server.handle = handle
    fleet.delete("up")
    wait_for("worker-02's child to be withdrawn", lambda: fleet.get("up-worker-02") is None)
    assert started and fleet.phase("up-worker-01") == "InProgress"
    assert any(r.code == 409 for r in fleet.server.find_requests(verb="delete", name="up-worker-01"))
    fleet.server.handle = orig
    fleet.agent(kids["worker-01"]).finish()
    wait_for("the parent to go", lambda: fleet.get("up") is None)


# -- at most once per machine ------------------------------------------------------------------------------


def test_a_child_deleted_by_hand_is_not_created_again(fleet):
    fleet.start()
    fleet.parent("up", downloadURL=URL, canaryCount="0", maxInFlight="2", failureBudget="1")
    kids = fleet.wait_children("up", 2)
    fleet.agent(kids["worker-01"]).finish()
    wait_for("worker-01 to be recorded", lambda: any(t["machineRef"] == "worker-01" and t["phase"] == "Complete"
                                                     for t in (fleet.get("up")["status"].get("targets") or [])))
    fleet.delete("up-worker-01")  # someone tidies up a finished child
    fleet.agent(kids["worker-02"]).start()
    fleet.delete("up-worker-02")  # and deletes a running one
    kids = fleet.wait_children("up", 2)  # the next wave: worker-03 and worker-04
    assert sorted(kids) == ["worker-03", "worker-04"]
    wait_for("the status to record the wave", lambda: len(fleet.get("up")["status"]["targets"]) == 4)
    targets = {t["machineRef"]: t for t in fleet.get("up")["status"]["targets"]}
    assert targets["worker-01"]["phase"] == "Complete"
    assert (targets["worker-02"]["phase"], targets["worker-02"]["message"]) == ("Failed", rollout.DELETED)
    assert len(created(fleet)) == 4


def test_a_machine_labelled_during_the_rollout_joins_a_later_wave(fleet):
    fleet.label("worker-05", pool="green")
    fleet.start()
    fleet.parent("up", downloadURL=URL)
    fleet.agent(fleet.wait_children("up", 1)["worker-01"]).finish()
    fleet.label("worker-05", pool="blue")
    for n in (2, 3, 4, 5):
        kids = fleet.wait_children("up", n)
        fleet.finish_all("up")
    assert sorted(kids) == ["worker-01", "worker-02", "worker-03", "worker-04", "worker-05"]
    fleet.wait_phase("up", "Complete")


def test_a_restarted_controller_carries_on_without_a_second_child(fleet):
    a = fleet.start("controller-a")
    fleet.parent("up", downloadURL=URL, maxInFlight="2")
    fleet.agent(fleet.wait_children("up", 1)["worker-01"]).finish()
    fleet.wait_children("up", 3)
    fleet.stop(a)  # in good order: the Lease is released
    assert fleet.holder() == ""
    fleet.start("controller-b")
    fleet.finish_all("up")
    fleet.wait_children("up", 5)
    fleet.finish_all("up")
    fleet.wait_phase("up", "Complete")
    assert len(created(fleet)) == 5
    assert sorted(mop.name(c) for c in fleet.children("up").values()) == [f"up-worker-0{i}" for i in range(1, 6)]


def test_killed_mid_rollout_the_next_leader_creates_no_duplicate(fleet, tmp_path):
    """Controller A (a process) is killed with SIGKILL right after it created a wave's children, before it wrote
    anything else; B, waiting on the Lease, takes over once A's lease has expired and carries on."""
    hold_dir = tmp_path / "a-run"
    hold_dir.mkdir()
    a = fleet.spawn("controller-a", env={"UNBOUNDED_AGENT_TEST_HOLD": controller.HOLD_AFTER_CREATE,
                                         "RUNTIME_DIRECTORY": str(hold_dir)})
    wait_for("A to lead", lambda: fleet.holder() == "controller-a")
    b = fleet.spawn("controller-b")
    fleet.parent("up", downloadURL=URL, maxInFlight="2")
    marker = hold_dir / "test-hold" / controller.HOLD_AFTER_CREATE
    wait_for("A to hold after creating the canary", marker.exists)
    marker.unlink()  # the canary wave goes on
    fleet.agent(fleet.wait_children("up", 1)["worker-01"]).finish()
    wait_for("A to hold after creating wave 2", marker.exists)
    assert sorted(fleet.children("up")) == ["worker-01", "worker-02", "worker-03"]
    assert fleet.holder() == "controller-a"
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    wait_for("B to take the Lease", lambda: fleet.holder() == "controller-b")
    fleet.finish_all("up")
    fleet.wait_children("up", 5)
    fleet.finish_all("up")
    op = fleet.wait_phase("up", "Complete")
    # one child per machine, ever: A created 3 (201), B created the other 2 and never re-created A's
    by = {who: [r for r in fleet.requests_of(who) if r.verb == "create" and r.resource == "machineoperations"]
          for who in ("controller-a", "controller-b")}
    assert [r.code for r in by["controller-a"]] == [201, 201, 201]
    assert [r.code for r in by["controller-b"]] == [201, 201]
    assert [t["machineRef"] for t in op["status"]["targets"]] == [f"worker-0{i}" for i in range(1, 6)]
    # never both acting: every write of A came before B's first (in the server's log, not by clock stamps
    # against the test's: a renewal sent just before the kill may be handled after it)
    a_writes, b_writes = fleet.requests_of("controller-a"), fleet.requests_of("controller-b")
    order = {id(r): i for i, r in enumerate(fleet.server.find_requests())}  # the order the server handled them
    assert max(order[id(r)] for r in a_writes) < min(order[id(r)] for r in b_writes)
    assert fleet.lease()["spec"]["leaseTransitions"] == 1
    b.send_signal(signal.SIGTERM)
    out, _ = b.communicate(timeout=30)
    assert b.returncode == 0 and "acquired the lease" in out and "released the lease" in out


def test_only_the_lease_holder_writes(fleet):
    fleet.start("controller-a")
    wait_for("A to lead", lambda: fleet.holder() == "controller-a")
    fleet.start("controller-b")
    fleet.parent("up", downloadURL=URL, maxInFlight="5", canaryCount="0")
    fleet.wait_children("up", 5)
    fleet.finish_all("up")
    fleet.wait_phase("up", "Complete")
    assert [r for r in fleet.requests_of("controller-b") if r.resource != "leases"] == []
    assert {r.resource for r in fleet.requests_of("controller-b", mutating=False)} >= {"machineoperations",
                                                                                       "machines"}  # it watches


# -- what the parent says ----------------------------------------------------------------------------------


@pytest.mark.parametrize("params,reason,words", [
    ({"maxInFlight": "0"}, "InvalidParameters", "maxInFlight must be a whole number from 1"),
    ({"sha265": "abc"}, "InvalidParameters", "unknown parameter(s) for AgentUpgrade: sha265"),
])
def test_a_parent_the_agents_would_refuse_fails_without_children(tmp_path, params, reason, words):
    from watcher_fakes import crd_without_rules

    # against a CRD without our rules (the upstream one): the controller checks for itself
    with Fleet(tmp_path, machines=2, crds=(crd_without_rules(tmp_path),)) as f:
        f.start()
        f.parent("bad", downloadURL=URL, **params)
        f.wait_phase("bad", "Failed")
        assert f.condition("bad")["reason"] == reason and words in f.condition("bad")["message"]
        assert f.children("bad") == {} and created(f) == []


def test_kinds_the_agents_do_not_handle_are_refused_and_host_kinds_left_alone(fleet):
    fleet.start()
    fleet.parent("reboot", kind="NodeReboot")
    fleet.parent("power", kind="HostPowerOff")
    fleet.wait_phase("reboot", "Failed")
    assert fleet.condition("reboot")["reason"] == "UnsupportedOperation"
    time.sleep(0.5)
    assert fleet.get("power")["status"] == {"phase": "Pending"}  # the CRD's default: nobody wrote
    assert fleet.children("power") == {} and fleet.children("reboot") == {}


def test_a_selector_that_matches_no_machine_fails(fleet):
    fleet.start()
    fleet.parent("nobody", selector={"matchLabels": {"pool": "purple"}}, downloadURL=URL)
    fleet.wait_phase("nobody", "Failed")
    assert fleet.condition("nobody")["reason"] == "NoMachinesMatched"
    assert fleet.condition("nobody")["message"] == "the machineSelector (pool=purple) matches no Machine"


def test_kubectl_get_wide_shows_the_rollout_and_keeps_the_documented_columns(fleet, tmp_path):
    fleet.start()
    fleet.parent("up", downloadURL=URL, maxInFlight="2")
    fleet.agent(fleet.wait_children("up", 1)["worker-01"]).finish()
    fleet.wait_children("up", 3)
    wait_for("wave 2 to show", lambda: "wave 2" in fleet.get("up")["status"]["message"])
    env = dict(os.environ, KUBECONFIG=str(tmp_path / "admin.kubeconfig"))
    plain = subprocess.run(["kubectl", "get", "mop"], env=env, capture_output=True, text=True, check=True).stdout
    wide = subprocess.run(["kubectl", "get", "mop", "-o", "wide"], env=env, capture_output=True, text=True,
                          check=True).stdout
    assert plain.splitlines()[0].split() == ["NAME", "KIND", "MACHINE", "PHASE", "AGE"]
    assert wide.splitlines()[0].split() == ["NAME", "KIND", "MACHINE", "PHASE", "AGE", "REASON", "ROLLOUT"]
    row = next(line for line in wide.splitlines() if line.startswith("up "))
    cells = re.split(r"\s{2,}", row.strip())
    assert cells[:2] == ["up", "AgentUpgrade"] and cells[2] == "InProgress"  # MACHINE empty for a parent
    assert cells[-1] == "5 matched: 1 complete, 0 failed, 2 in flight, 2 not started"
    child_row = re.split(r"\s{2,}", next(line for line in wide.splitlines() if line.startswith("up-worker-01 ")))
    assert child_row[:4] == ["up-worker-01", "AgentUpgrade", "worker-01", "Complete"]
    print("\n$ kubectl get mop -o wide\n" + wide)


def test_a_finished_parent_goes_with_its_children_after_its_ttl(fleet):
    fleet.start()
    parent = fleet.parent("up", ttl=1, downloadURL=URL, canaryCount="0", maxInFlight="5")
    fleet.wait_children("up", 5)
    fleet.finish_all("up")
    wait_for("the parent to be deleted after its TTL", lambda: fleet.get("up") is None)
    wait_for("its children with it", lambda: fleet.children("up") == {})
    assert any(r.verb == "delete" and r.name == "up" and r.code == 200
               for r in fleet.requests_of("controller-a")) and parent["metadata"]["name"] == "up"


def test_the_program_needs_a_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert controller.main(["--config", str(tmp_path / "absent.yaml")]) == 3
    assert "no kubeconfig configured" in capsys.readouterr().err
