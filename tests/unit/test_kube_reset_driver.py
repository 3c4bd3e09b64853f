"""AgentReset through the watcher (kube/reset_driver.py), against the real test API server and a real spool;
the test plays the dispatcher (tests/support/watcher_fakes.py).

The contract: the reset waits at its gate — everything that can fail done, the agent's files gone — before
it stops this daemon; the watcher acknowledges the gate only once ``Complete`` — and every operation the
reset superseded — is on the server, or the operation is gone. A reset that fails before the gate ends ``Failed`` and the daemon keeps running.
A restart never submits a reset twice."""

import pytest
from watcher_fakes import GATE_MESSAGE, MACHINE, Harness, wait_for

from unbounded_agent import records
from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube.progress import ACCEPTED, DONE, SUBMITTED, SUBMITTING, OperationProgress
from unbounded_agent.queue.spool import Request, new_id
from unbounded_agent.reasons import Reason

URL = "https://releases.example.com/agent.tar.gz"


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def path(name, sub=""):
    return f"{kubeclient.MOP_PATH}/{name}{sub}"


def test_reset_is_complete_on_the_server_before_the_agent_is_removed(h):
    h.start()
    h.create("reset", "AgentReset")
    h.wait_phase("reset", "InProgress")
    assert h.get("reset")["status"]["message"] == "resetting unbounded agent"
    req = h.dispatcher.wait_request(h.operation("reset"))
    assert (req.kind, req.source, req.report_gate) == ("reset", "machineoperation", True)
    wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
    assert h.phase("reset") == "InProgress"
    h.dispatcher.open_gate(req)  # phase 1 done: the agent is removed next
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    # what the API server had when the reset was let go on
    assert h.phase("reset") == "Complete"
    cond = h.condition("reset")
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "Succeeded", GATE_MESSAGE)
    assert h.phases_written("reset") == ["Pending", "InProgress", "Complete"]
    reasons = h.event_reasons("reset")
    assert reasons[:2] == ["Accepted", "ResetStarted"] and reasons[-1] == "Completed"
    steps = [e["message"] for e in h.events("reset") if e["reason"] == "ResetStep"]
    assert steps == ["step 1 stop-machines: succeeded", "step 2 remove-links: succeeded"]
    p = wait_for("the ack to be recorded", lambda: (p := h.progress("reset")) and p.acked and p)
    assert (p.step, p.written) == (DONE, True)
    h.dispatcher.succeed(req, "AgentReset completed")  # phase 2: the daemon is gone in real life
    h.settle()
    assert h.condition("reset")["message"] == GATE_MESSAGE and h.dispatcher.submitted() == [req.id]


def test_the_ack_waits_until_complete_is_on_the_server(h):
    h.start()
    h.create("reset", "AgentReset")
    req = h.dispatcher.wait_request(h.operation("reset"))
    wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
    h.server.pause(mode="503")
    h.dispatcher.open_gate(req)
    wait_for("Complete to wait for the server",
             lambda: (p := h.progress_store().load_all().get(h.watcher.active().uid)) and p.want
             and p.want["phase"] == "Complete")
    h.settle()
    assert not h.dispatcher.acked(req)  # the daemon must not be removed with Complete unsaid
    assert not h.progress_store().load_all()[h.watcher.active().uid].written
    h.server.resume()
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.phase("reset") == "Complete"


def test_the_ack_waits_for_complete_itself_not_only_for_the_events(h):
    """Another writer changes the object before every status write: each is refused (409) while Events
    still go through. Everything else is reported; Complete is not: no ack."""
    h.start()
    h.create("reset", "AgentReset")
    req = h.dispatcher.wait_request(h.operation("reset"))
    wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
    n = iter(range(1_000_000))
    hook = h.before_agent("PUT", path("reset", "/status"), times=None, action=lambda: h.admin.request(
        "PATCH", path("reset"), body={"metadata": {"labels": {"edit": str(next(n))}}},
        content_type="application/merge-patch+json"))
    h.dispatcher.open_gate(req)
    wait_for("the Events", lambda: "Completed" in h.event_reasons("reset"))
    wait_for("a few refused writes", lambda: len(hook.caught) >= 10)
    h.settle()
    assert not h.dispatcher.acked(req) and h.phase("reset") == "InProgress"
    hook.remove()
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.phase("reset") == "Complete"


def test_the_ack_waits_for_the_events_too(h):
    """The steps' story is told before the agent goes: Complete is written but the Events cannot be."""
    h.start()
    h.create("reset", "AgentReset")
    req = h.dispatcher.wait_request(h.operation("reset"))
    wait_for("ResetStarted", lambda: "ResetStarted" in h.event_reasons("reset"))
    hook = h.before_agent("POST", "/api/v1/namespaces/default/events", answer=503, times=None)
    h.dispatcher.open_gate(req)
    h.wait_phase("reset", "Complete")
    wait_for("an Event to be tried", lambda: hook.caught)
    h.settle()
    assert not h.dispatcher.acked(req)
    hook.remove()
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.event_reasons("reset")[-3:] == ["ResetStep", "ResetStep", "Completed"]


def test_a_reset_that_fails_before_the_gate_fails_and_keeps_the_daemon(h):
    h.start()
    h.create("reset", "AgentReset")
    req = h.dispatcher.wait_request(h.operation("reset"))
    message = "reset step 2 (remove-links) failed: InventoryFailed: netlink dump failed"
    h.dispatcher.fail(req, Reason.EXECUTION_FAILED, message, step="remove-links")
    h.wait_phase("reset", "Failed")
    cond = h.condition("reset")
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "ExecutionFailed", message)
    warning = wait_for("the failure's Event", lambda: [e for e in h.events("reset") if e["type"] == "Warning"])
    assert warning[0]["reason"] == "ExecutionFailed"
    assert h.watcher.active() is None and h.thread.is_alive()
    assert not h.dispatcher.acked(req) and "ResetStep" not in h.event_reasons("reset")
    # the daemon goes on: the next operation runs
    h.create("up", "AgentUpgrade", downloadURL=URL)
    h.finish_upgrade("up")
    h.wait_phase("up", "Complete")


def test_a_step_that_failed_while_the_daemon_was_down_is_reported_not_resubmitted(h):
    h.start()
    h.create("reset", "AgentReset")
    req = h.dispatcher.wait_request(h.operation("reset"))
    wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
    h.stop()
    h.dispatcher.fail(req, Reason.EXECUTION_FAILED,
                      "reset step 1 (stop-machines) failed without a report (unit result exit-code)")
    h.start()
    h.wait_phase("reset", "Failed")
    assert "stop-machines" in h.condition("reset")["message"]
    assert h.dispatcher.submitted() == [req.id]


def test_waiting_operations_are_superseded_and_reported_before_the_agent_goes(h):
    h.start()
    h.create("reset", "AgentReset")
    req = h.dispatcher.wait_request(h.operation("reset"))
    h.create("up", "AgentUpgrade", downloadURL=URL)
    wait_for("up to wait", lambda: "reset" in (h.get("up").get("status") or {}).get("message", ""))
    assert h.get("up")["status"]["message"] == f"waiting for AgentReset reset (in progress on {MACHINE}) to finish"
    # The superseded operation's status cannot be written for now; the reset's can.
    hook = h.before_agent("PUT", path("up", "/status"), answer=503, times=None)
    h.dispatcher.open_gate(req)
    h.wait_phase("reset", "Complete")
    wait_for("up's status to be tried", lambda: hook.caught)
    h.settle()
    assert not h.dispatcher.acked(req) and h.phase("up") == "Pending"
    hook.remove()
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.phase("up") == "Failed"
    cond = h.condition("up")
    assert cond["reason"] == "Superseded"
    assert cond["message"] == f"superseded by AgentReset reset: the agent is removed from {MACHINE}"
    assert h.dispatcher.submitted() == [req.id]  # the upgrade never reached the queue


def test_a_reset_of_someone_else_waits_for_the_superseded_operations_to_be_reported(h):
    """`unbounded-agent reset` on the host supersedes a queued MachineOperation: the dispatcher opens a gate
    for it, which the watcher acknowledges once that operation's Failed is on the server."""
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    wait_for("the request to be recorded", lambda: h.step("up") == SUBMITTED)
    hook = h.before_agent("PUT", path("up", "/status"), answer=503, times=None)
    reset = h.dispatcher.submit("reset")
    assert [r.id for r in h.dispatcher.supersede(reset)] == [req.id]
    h.dispatcher.open_gate(reset)
    wait_for("up's Failed to be tried", lambda: hook.caught)
    h.settle()
    assert not h.dispatcher.acked(reset)
    hook.remove()
    wait_for("the ack", lambda: h.dispatcher.acked(reset))
    assert h.phase("up") == "Failed" and h.condition("up")["reason"] == "Superseded"
    assert f"superseded by reset {reset.id}" in h.condition("up")["message"]


def test_a_gate_with_nothing_to_report_is_acknowledged(h):
    h.start()
    h.synced()
    reset = h.dispatcher.submit("reset")
    h.dispatcher.open_gate(reset)
    wait_for("the ack", lambda: h.dispatcher.acked(reset))


def test_a_reset_deleted_midway_lets_the_host_finish(h):
    h.start()
    op = h.create("reset", "AgentReset")
    req = h.dispatcher.wait_request(h.operation("reset"))
    wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
    h.delete("reset")
    h.dispatcher.open_gate(req)
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.get("reset") is None
    wait_for("the watcher to forget it", lambda: h.progress("reset", op["metadata"]["uid"]) is None)


def test_a_reset_deleted_right_before_its_submission_is_never_submitted(h):
    hook = h.before_agent("GET", path("reset"), action=lambda: h.delete("reset"))
    h.start()
    op = h.create("reset", "AgentReset")
    wait_for("the claim", lambda: hook.caught)
    wait_for("the watcher to forget it", lambda: h.progress("reset", op["metadata"]["uid"]) is None
             and h.watcher.progress == {})
    assert h.dispatcher.submitted() == []


def stop_at(h, step: str) -> tuple[str, Request | None]:
    """Run the watcher until it stopped (or was killed: only its files survive) at step."""
    h.create("reset", "AgentReset")
    op = h.get("reset")
    operation = h.operation("reset")
    if step == ACCEPTED:
        h.progress_store().save(OperationProgress(uid=op["metadata"]["uid"], name="reset", kind="AgentReset",
                                                  operation=operation, claimed_at=records.now()))
        return operation, None
    if step in ("submitting", "submitted-unrecorded"):
        # Killed after the fresh read and InProgress, once the request id was recorded, before (or right after)
        # the request was queued.
        p = OperationProgress(uid=op["metadata"]["uid"], name="reset", kind="AgentReset", operation=operation,
                              claimed_at=records.now(), step=SUBMITTING, request_id=new_id("mop"),
                              generation=op["metadata"]["generation"], params={})
        h.progress_store().save(p)
        if step == "submitted-unrecorded":  # killed after queueing the request, before recording it
            h.spool.submit(Request(id=p.request_id, kind="reset", operation=operation, source="machineoperation",
                                   report_gate=True))
        return operation, None
    h.start()
    req = h.dispatcher.wait_request(operation)
    wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
    if step == "complete-unsaid":  # at the gate, Complete not yet on the server
        h.server.pause(mode="503")
        h.dispatcher.open_gate(req)
        wait_for("Complete to be wanted", lambda: (h.progress_store().load_all()[op["metadata"]["uid"]].want
                                                   or {}).get("phase") == "Complete")
        h.stop()
        h.server.resume()
        assert not h.dispatcher.acked(req)
    if step == DONE:  # acknowledged; phase 2 failed to remove the daemon, which systemd started again
        h.dispatcher.open_gate(req)
        wait_for("the ack", lambda: h.dispatcher.acked(req))
    h.stop()
    return operation, req


@pytest.mark.parametrize("step", [ACCEPTED, "submitting", "submitted-unrecorded", SUBMITTED, "complete-unsaid", DONE])
def test_restart_at_each_step_never_submits_twice(h, step):
    operation, req = stop_at(h, step)
    saved = h.progress("reset")
    h.start()
    h.synced()
    if req is None:
        req = h.dispatcher.wait_request(operation)
        if saved.request_id:
            assert req.id == saved.request_id
    if not h.spool.gate(req.id):
        wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
        h.dispatcher.open_gate(req)
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    h.dispatcher.succeed(req, "AgentReset completed")
    h.wait_phase("reset", "Complete")
    h.settle()
    assert h.condition("reset")["message"] == GATE_MESSAGE
    assert h.dispatcher.submitted() == [req.id]


def test_a_reset_of_an_older_agent_is_failed_with_what_to_do(h):
    h.create("reset", "AgentReset")
    h.set_status("reset", "InProgress", "InProgress", "resetting unbounded agent")
    op = h.get("reset")
    h.progress_store().save(OperationProgress(uid=op["metadata"]["uid"], name="reset", kind="AgentReset",
                                              step="reset-phase1", operation=h.operation("reset")))
    h.start()
    h.wait_phase("reset", "Failed")
    assert h.condition("reset")["reason"] == "ExecutionFailed"
    assert "run `unbounded-agent reset` on the host" in h.condition("reset")["message"]
    assert h.dispatcher.submitted() == []


def test_complete_is_published_after_the_agents_files_and_state_are_gone(h):
    """At the gate the agent's state directory (this watcher's progress) is gone: the daemon still says
    Complete, acknowledges, and does not make the directory again."""
    from unbounded_agent.reset import treeremove

    h.start()
    h.create("reset", "AgentReset")
    h.create("up", "AgentUpgrade", downloadURL=URL)  # waits behind the reset; superseded at the gate
    req = h.dispatcher.wait_request(h.operation("reset"))
    wait_for("the request to be recorded", lambda: h.step("reset") == SUBMITTED)
    treeremove.remove_tree(str(h.cfg.state_dir))  # remove-agent, while the watcher may still write there
    h.dispatcher.open_gate(req)
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.phase("reset") == "Complete" and h.phase("up") == "Failed"
    assert h.condition("up")["reason"] == "Superseded"
    assert not h.cfg.state_dir.exists() and h.watcher.store.in_memory
