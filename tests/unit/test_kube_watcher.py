"""The watcher's main loop (kube/watcher.py) against the real test API server and a real spool: readiness,
its own machine only, one operation at a time, kinds it fails at once or never touches, operations it
must not run, forgetting what is gone, and errors that are retried rather than fatal. The test plays the
dispatcher (tests/support/watcher_fakes.py)."""

import dataclasses
from pathlib import Path

import pytest
from watcher_fakes import AGENT, MACHINE, Harness, crd_without_rules, wait_for

from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import mop
from unbounded_agent.kube.watcher import MAX_UNEXPECTED_ERRORS, ready_grace
from unbounded_agent.reasons import Reason

URL = "https://releases.example.com/agent.tar.gz"
HOST_KINDS = ("HostReboot", "HostPowerOff", "HostPowerOn", "HostReplace")  # those of the CRD's enum


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def test_ready_only_after_the_first_list(h):
    h.server.pause(mode="503")
    w = h.start()
    wait_for("a list attempt", lambda: [r for r in h.server.requests if r.path == kubeclient.MOP_PATH])
    assert h.notified == [] and not w.ready
    h.server.resume()
    wait_for("READY=1", lambda: h.notified)
    assert h.notified[0]["READY"] == 1 and "watching MachineOperations" in h.notified[0]["STATUS"]
    assert [r.code for r in h.agent_requests(verb="list")][-1] == 200


def test_ready_after_a_grace_when_the_api_server_stays_unreachable(h):
    h.cfg = dataclasses.replace(h.cfg, ready_without_api_seconds=0.5)
    h.server.pause(mode="refuse")
    w = h.start()
    wait_for("READY=1 without the API server", lambda: h.notified)
    assert "unreachable" in h.notified[0]["STATUS"] and not w.synced
    h.server.resume()
    wait_for("the first list", lambda: w.synced)
    assert len(h.notified) == 1  # READY once


def test_the_grace_never_outlasts_half_the_probation_ready_timeout(h):
    """Upgrade probation waits readyTimeoutSeconds for READY=1: an unreachable API server must not fail it."""
    assert ready_grace(dataclasses.replace(h.cfg, ready_without_api_seconds=20, ready_timeout_seconds=60)) == 20
    assert ready_grace(dataclasses.replace(h.cfg, ready_without_api_seconds=50, ready_timeout_seconds=60)) == 30


def test_only_this_machines_operations_are_handled(h):
    h.create("other", "AgentUpgrade", machine="worker-02", downloadURL=URL)
    h.start()
    h.create("mine", "AgentUpgrade", downloadURL=URL)
    h.finish_upgrade("mine")
    h.wait_phase("mine", "Complete")
    h.create("other-2", "AgentReset", machine="worker-02")
    h.create("mine-2", "AgentReset")
    h.finish_reset("mine-2")
    h.wait_phase("mine-2", "Complete")
    for name in ("other", "other-2"):
        assert h.get(name)["status"] == {"phase": "Pending"} and h.events(name) == []  # the default only
        assert not h.agent_requests(name=name)
    assert {r.operation.split("@")[0] for r in h.dispatcher.results()} == {"mine", "mine-2"}
    q = [r.query for r in h.agent_requests() if r.verb in ("list", "watch")]
    assert q and all(x.get("fieldSelector") == f"spec.machineRef={MACHINE}" for x in q)


def test_where_the_server_cannot_select_by_machine_the_others_are_still_untouched(tmp_path):
    with Harness(tmp_path, version="1.30.2") as h:  # a 1.30 server ignores selectableFields: every op comes by
        h.create("other", "AgentReset", machine="worker-02")
        h.start(watch_timeout=(1, 1))
        h.synced()
        h.create("other-2", "AgentUpgrade", machine="worker-02", downloadURL=URL)  # an event, not in the list
        h.create("mine", "AgentReset")
        h.finish_reset("mine")
        h.wait_phase("mine", "Complete")
        h.settle()
        assert h.watcher.listwatch.client_side
        for name in ("other", "other-2"):
            assert h.get(name)["status"] == {"phase": "Pending"} and h.events(name) == []  # the default only
        assert {r.operation.split("@")[0] for r in h.dispatcher.results()} == {"mine"}
        assert all(mop.machine(o) == MACHINE for o in h.watcher.cache.values())


def test_two_operations_run_one_after_the_other(h):
    h.start()
    h.create("first", "AgentUpgrade", downloadURL=URL)
    h.wait_phase("first", "InProgress")
    h.create("second", "AgentReset")
    wait_for("second to wait", lambda: "first" in (h.get("second").get("status") or {}).get("message", ""))
    st = h.get("second")["status"]
    assert st["phase"] == "Pending" and st["message"] == f"waiting for AgentUpgrade first (in progress on {MACHINE}) to finish"
    first = h.dispatcher.wait_request(h.operation("first"))
    assert [r.id for r in h.dispatcher.queued()] == [first.id]  # the reset waits here, not in the queue
    h.dispatcher.succeed(first)
    h.wait_phase("first", "Complete")
    second = h.finish_reset("second")
    h.wait_phase("second", "Complete")
    assert h.dispatcher.submitted() == [first.id, second.id]
    assert h.phases_written("second") == ["Pending", "InProgress", "Complete"]


def test_unsupported_and_invalid_fail_at_once_host_kinds_are_untouched(h):
    h.start()
    h.create("busy", "AgentUpgrade", downloadURL=URL)  # in progress: the failures below do not wait for it
    h.wait_phase("busy", "InProgress")
    h.create("reboot", "NodeReboot")
    h.create("reset-args", "AgentReset", allWG="true")
    for kind in HOST_KINDS:
        h.create(kind.lower(), kind)
    h.wait_phase("reboot", "Failed")
    assert h.condition("reboot")["reason"] == "UnsupportedOperation"
    assert "NodeReboot is not implemented" in h.condition("reboot")["message"]
    h.wait_phase("reset-args", "Failed")
    assert h.condition("reset-args")["reason"] == "InvalidParameters"
    h.finish_upgrade("busy")
    h.wait_phase("busy", "Complete")
    h.settle()
    for kind in HOST_KINDS:
        assert h.get(kind.lower())["status"] == {"phase": "Pending"}  # the CRD's default only
        assert not h.agent_requests(name=kind.lower()) and h.events(kind.lower()) == []
    assert len(h.dispatcher.submitted()) == 1


def test_in_progress_without_a_local_record_is_failed_not_run(h):
    h.create("orphan", "AgentReset")
    h.set_status("orphan", "InProgress", "InProgress", "resetting")
    h.start()
    h.wait_phase("orphan", "Failed")
    assert "no record of starting this operation" in h.condition("orphan")["message"]
    assert h.dispatcher.submitted() == []


def test_finished_operations_are_not_claimed(h):
    h.create("old", "AgentUpgrade", downloadURL=URL)
    h.set_status("old", "Complete", "Succeeded", "done by an earlier agent")
    h.start()
    h.synced()
    h.settle()
    assert h.watcher.progress == {} and h.dispatcher.submitted() == []
    assert h.condition("old")["message"] == "done by an earlier agent"


def test_an_operation_deleted_while_pending_is_never_submitted(h):
    h.start()
    h.create("first", "AgentUpgrade", downloadURL=URL)
    first = h.dispatcher.wait_request(h.operation("first"))
    h.create("second", "AgentUpgrade", downloadURL=URL)
    h.create("third", "AgentReset")
    wait_for("both to wait", lambda: h.phase("second") == h.phase("third") == "Pending")
    h.delete("second")
    h.dispatcher.succeed(first)
    # first come, first served: the deleted one would have been next, before third
    third = h.finish_reset("third")
    assert h.dispatcher.submitted() == [first.id, third.id]
    assert all(not r.operation.startswith("second@") for r in h.dispatcher.results())


def test_progress_of_deleted_finished_operations_is_forgotten(h):
    h.start()
    h.create("r", "AgentUpgrade", downloadURL=URL)
    h.finish_upgrade("r")
    h.wait_phase("r", "Complete")
    wait_for("the result to be written", lambda: h.progress("r") and h.progress("r").written)
    assert len(h.progress_store().load_all()) == 1
    h.delete("r")
    wait_for("the progress file to go", lambda: h.progress_store().load_all() == {})


def test_a_broken_kubeconfig_is_retried_until_it_is_fixed(h):
    good = Path(h.cfg.kubeconfig).read_text()
    Path(h.cfg.kubeconfig).write_text("{not: [valid yaml")
    h.cfg = dataclasses.replace(h.cfg, ready_without_api_seconds=0.3)
    w = h.start()
    wait_for("READY=1 without a client", lambda: h.notified)
    assert not w.synced and w.listwatch.is_alive()
    Path(h.cfg.kubeconfig).write_text(good)
    wait_for("the first list", lambda: w.synced)
    h.create("r", "NodeReboot")
    h.wait_phase("r", "Failed")
    assert [r.user for r in h.agent_requests(verb="list")] == [AGENT]


def break_the_queue(h) -> None:
    """The spool's requests/ is not a directory: every look at the queue raises (NotADirectoryError)."""
    h.spool.requests.rmdir()
    h.spool.requests.write_text("")


def mend_the_queue(h) -> None:
    h.spool.requests.unlink()
    h.spool.requests.mkdir(mode=0o700)


def test_an_unexpected_error_that_persists_fails_the_operation(h):
    break_the_queue(h)
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    h.wait_phase("up", "Failed")
    cond = h.condition("up")
    assert cond["reason"] == Reason.EXECUTION_FAILED.value
    assert cond["message"].startswith(f"the agent failed {MAX_UNEXPECTED_ERRORS} times in a row while running it: "
                                      "NotADirectoryError")
    assert h.thread.is_alive()
    mend_the_queue(h)
    assert h.dispatcher.submitted() == []


def test_an_unexpected_error_that_goes_away_is_only_retried(h):
    break_the_queue(h)
    h.start()
    op = h.create("up", "AgentUpgrade", downloadURL=URL)
    wait_for("a few failed passes", lambda: h.watcher.errors.get(op["metadata"]["uid"], 0) >= 3)
    mend_the_queue(h)
    req = h.dispatcher.wait_request(h.operation("up"))
    wait_for("the count of errors in a row to end", lambda: op["metadata"]["uid"] not in h.watcher.errors)
    h.dispatcher.succeed(req)
    h.wait_phase("up", "Complete")
    assert h.dispatcher.submitted() == [req.id]


def test_an_operation_moved_to_another_machine_is_not_claimed(h):
    h.start()
    h.create("first", "AgentUpgrade", downloadURL=URL)
    first = h.dispatcher.wait_request(h.operation("first"))
    h.create("moved", "AgentReset")
    wait_for("moved to wait", lambda: h.phase("moved") == "Pending")
    h.admin.request("PATCH", f"{kubeclient.MOP_PATH}/moved", body={"spec": {"machineRef": "worker-02"}},
                    content_type="application/merge-patch+json")
    wait_for("the watcher to drop it", lambda: all(mop.name(o) != "moved" for o in h.watcher.cache.values()))
    h.dispatcher.succeed(first)
    h.wait_phase("first", "Complete")
    h.settle()
    assert h.dispatcher.submitted() == [first.id] and h.phase("moved") == "Pending"


def test_the_crds_rules_refuse_what_the_agent_would_fail(h):
    """With our CRD, the API server itself refuses a bad operation, with the rule's message."""
    with pytest.raises(kubeclient.ApiError) as e:
        h.create("no-url", "AgentUpgrade")
    assert e.value.code == 422 and "AgentUpgrade needs parameters.downloadURL" in e.value.message
    with pytest.raises(kubeclient.ApiError) as e:
        h.create("both", "AgentReset", selector={"matchLabels": {"pool": "a"}})
    assert e.value.code == 422 and "exactly one of machineRef and machineSelector must be set" in e.value.message


def test_without_the_crds_rules_the_agent_fails_bad_operations_itself_and_leaves_selectors_alone(tmp_path):
    with Harness(tmp_path, crds=[crd_without_rules(tmp_path)]) as h:
        h.start()
        h.synced()
        h.create("selected", "AgentUpgrade", machine=None, selector={"matchLabels": {"pool": "a"}},
                 downloadURL=URL)  # for the fan-out controller: never this agent's
        h.create("no-url", "AgentUpgrade")
        h.create("both", "AgentReset", selector={"matchLabels": {"pool": "a"}})
        h.wait_phase("no-url", "Failed")
        assert h.condition("no-url")["reason"] == "InvalidParameters"
        assert 'missing required parameter "downloadURL"' in h.condition("no-url")["message"]
        h.wait_phase("both", "Failed")
        assert h.condition("both")["reason"] == "InvalidParameters"
        assert "machineRef and machineSelector are both set" in h.condition("both")["message"]
        h.settle()
        assert not h.get("selected").get("status") and not h.agent_requests(name="selected")
        assert h.events("selected") == [] and h.dispatcher.submitted() == []


def test_an_operation_deleted_while_pending_behind_another_never_runs_across_a_partition(h):
    """The agent loses the API server (kubectl still reaches it) while a reset waits behind an upgrade; the reset
    is deleted; the upgrade finishes. The watcher's cache still holds the reset: it takes it up, but decides
    nothing before a fresh read — which, once the server is back, says it is gone."""
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    h.create("reset", "AgentReset")
    wait_for("the reset to wait", lambda: "waiting for AgentUpgrade up" in
             ((h.get("reset") or {}).get("status") or {}).get("message", ""))
    reset_uid = h.get("reset")["metadata"]["uid"]
    h.partition_agent()
    h.delete("reset")
    h.dispatcher.succeed(req, "upgraded from 1.0.0 to 2.0.0")
    # the upgrade's end cannot be published; the reset, still in the cache, is taken up and waits for a read
    wait_for("the reset to be taken up", lambda: (p := h.progress("reset", reset_uid)) and p.step == "accepted")
    h.settle(5)
    assert h.progress("reset", reset_uid).step == "accepted" and h.dispatcher.submitted() == [req.id]
    h.partition_agent(False)
    # (the watcher's backoff grew while the server was out of reach: up to 30 s before it asks again)
    wait_for("up to be Complete", lambda: h.phase("up") == "Complete", timeout=120)
    wait_for("the reset to be forgotten", lambda: h.progress("reset", reset_uid) is None, timeout=120)
    assert h.dispatcher.submitted() == [req.id] and h.events("reset") == []
    assert not [r for r in h.agent_requests(name="reset") if r.verb == "update" and r.code == 200 and
                r.time > req_time(h, req)]


def req_time(h, req) -> float:
    """When the upgrade's result was written (the reset was deleted before)."""
    from datetime import datetime

    return datetime.fromisoformat(h.dispatcher.spool.result(req.id).finished_at.replace("Z", "+00:00")).timestamp()


def test_a_status_write_refused_for_one_operation_does_not_delay_the_others(h):
    """Its writes always get 422: it says so in an Event on itself, and retries on its own backoff, while the
    operations after it are written as they happen."""
    h.create("stuck", "AgentReset")
    h.before_agent("PUT", f"{kubeclient.MOP_PATH}/stuck/status", answer=422, times=None)
    h.start()
    stuck = h.dispatcher.wait_request(h.operation("stuck"))
    wait_for("the refusal's Event", lambda: "StatusRefused" in h.event_reasons("stuck"))
    h.dispatcher.open_gate(stuck, steps=[])
    wait_for("stuck's gate to wait for its Complete", lambda: h.watcher.progress[
        h.get("stuck")["metadata"]["uid"]].want.get("phase") == "Complete")
    h.dispatcher.fail(stuck, Reason.EXECUTION_FAILED, "phase 2 failed")  # the host goes on without it
    for name in ("a", "b"):
        h.create(name, "AgentUpgrade", downloadURL=URL)
        h.finish_upgrade(name)
        h.wait_phase(name, "Complete")
    assert h.phase("stuck") == "Pending"  # never written
    refused = [e for e in h.events("stuck") if e["reason"] == "StatusRefused"]
    assert len(refused) == 1 and refused[0]["type"] == "Warning" and "422" in refused[0]["message"]
    wait_for("the refusals to be counted", lambda: [e for e in h.events("stuck")
                                                     if e["reason"] == "StatusRefused"][0]["count"] >= 2)
