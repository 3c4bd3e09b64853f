"""AgentUpgrade through the watcher (kube/upgrade_driver.py), against the real test API server and a real
spool; the test plays the dispatcher (tests/support/watcher_fakes.py). Each test reads as what a user sees
with kubectl, and what lands in the operation queue."""

import pytest
from watcher_fakes import Harness, wait_for

from unbounded_agent import records
from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube.progress import ACCEPTED, DONE, SUBMITTED, SUBMITTING, OperationProgress
from unbounded_agent.queue.spool import Request, new_id
from unbounded_agent.reasons import Reason
from unbounded_agent.upgrade.record import Store, UpgradeRecord

URL = "https://releases.example.com/agent.tar.gz"
OTHER_URL = "https://mirror.example.com/agent-2.tar.gz"


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def get_path(name):
    return f"{kubeclient.MOP_PATH}/{name}"


def test_good_upgrade_goes_pending_inprogress_complete(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL + "?sig=topsecret", sha256="ab" * 32)
    op = h.wait_phase("up", "InProgress")
    assert op["status"]["message"] == f"staging upgraded host agent binary from {URL}"
    assert h.condition("up")["status"] == "False" and h.condition("up")["reason"] == "InProgress"
    req = h.dispatcher.wait_request(h.operation("up"))
    # the full URL reaches the host, through the queue only
    assert (req.kind, req.source, req.url, req.sha256, req.force) == ("upgrade", "machineoperation",
                                                                      URL + "?sig=topsecret", "ab" * 32, False)
    assert h.progress("up").request_id == req.id
    h.dispatcher.succeed(req, "upgraded from 1.0.0 to 2.0.0", from_version="1.0.0", to_version="2.0.0")
    op = h.wait_phase("up", "Complete")
    cond = h.condition("up")
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "Succeeded", "upgraded from 1.0.0 to 2.0.0")
    assert op["status"]["startedAt"] and op["status"]["completedAt"]
    # the story, in Events; no secret anywhere the API server keeps
    wait_for("the last Event", lambda: "Completed" in h.event_reasons("up"))
    reasons = h.event_reasons("up")
    assert reasons[:2] == ["Accepted", "UpgradeStarted"] and reasons[-1] == "Completed"
    assert req.id in next(e["message"] for e in h.events("up") if e["reason"] == "UpgradeStarted")
    assert "topsecret" not in str(h.get("up")["status"]) + str(h.events("up"))
    # every status write went through the status subresource, as the agent's own user
    writes = [r for r in h.agent_requests() if r.verb in ("update", "patch") and r.resource.startswith("machineoperations")]
    assert writes and all(r.resource == "machineoperations/status" for r in writes)
    assert [r.code for r in writes] == [200] * len(writes)
    assert h.dispatcher.submitted() == [req.id]


def test_statuses_in_order_pending_then_inprogress_then_complete(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    h.finish_upgrade("up")
    h.wait_phase("up", "Complete")
    assert h.phases_written("up") == ["Pending", "InProgress", "Complete"]


def test_the_request_is_submitted_with_what_the_server_has_right_before(h):
    """The operation is read again right before its request is queued, and the request carries that read's
    parameters: here another writer changes the URL between the claim and the submission."""
    def edit():
        h.admin.request("PATCH", get_path("up"), body={"spec": {"parameters": {"downloadURL": OTHER_URL}}},
                        content_type="application/merge-patch+json")

    hook = h.before_agent("GET", get_path("up"), action=edit)
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    assert len(hook.caught) == 1  # the one read before the submission
    assert req.url == OTHER_URL
    wait_for("the request to be recorded", lambda: h.step("up") == SUBMITTED)
    assert h.progress("up").params["downloadURL"] == OTHER_URL
    started = wait_for("UpgradeStarted", lambda: [e for e in h.events("up") if e["reason"] == "UpgradeStarted"])
    assert started[0]["message"] == f"queued the upgrade (request {req.id}) from {OTHER_URL}"  # what it is queued with


def test_parameters_made_invalid_before_the_submission_fail_it_without_a_request(h):
    def edit():
        h.admin.request("PATCH", get_path("bad"), body={"spec": {"parameters": {"downloadURL": "ftp://h/a.tar.gz"}}},
                        content_type="application/merge-patch+json")

    h.before_agent("GET", get_path("bad"), action=edit)
    h.start()
    h.create("bad", "AgentUpgrade", downloadURL=URL)
    h.wait_phase("bad", "Failed")
    assert h.condition("bad")["reason"] == "InvalidParameters" and "scheme" in h.condition("bad")["message"]
    assert h.dispatcher.submitted() == []


def test_an_operation_deleted_right_before_its_submission_is_never_submitted(h):
    hook = h.before_agent("GET", get_path("up"), action=lambda: h.delete("up"))
    h.start()
    op = h.create("up", "AgentUpgrade", downloadURL=URL)
    uid = op["metadata"]["uid"]
    wait_for("the claim", lambda: hook.caught)
    wait_for("the watcher to forget it", lambda: h.progress("up", uid) is None and h.watcher.progress == {})
    assert h.dispatcher.submitted() == [] and h.get("up") is None
    assert h.phases_written("up") == ["Pending"]  # the read came first: it never showed InProgress


def test_rolled_back_upgrade_fails_with_daemon_failed_and_the_recorded_detail(h):
    h.start()
    h.create("bad", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("bad"))
    h.dispatcher.record(req, "staging")
    h.dispatcher.record(req, "probation")
    wait_for("a phase event", lambda: any(e["message"] == "upgrade probation" for e in h.events("bad")))
    assert h.phase("bad") == "InProgress"
    detail = "version 9.0.0 failed on probation: exit code 3; rolled back to 1.0.0 (unbounded-agent-blue)"
    h.dispatcher.fail(req, Reason.DAEMON_FAILED, detail)
    h.wait_phase("bad", "Failed")
    cond = h.condition("bad")
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "DaemonFailed", detail)
    warning = wait_for("the failure's Event", lambda: [e for e in h.events("bad") if e["type"] == "Warning"])
    assert warning[0]["reason"] == "DaemonFailed" and warning[0]["message"] == detail


def test_the_record_of_another_request_is_not_announced(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    wait_for("the request to be followed", lambda: h.step("up") == SUBMITTED)
    Store(h.cfg).write(UpgradeRecord(id="upgrade-local-1", operation="upgrade-local-1", phase="switching"))
    h.settle()
    h.dispatcher.record(req, "staging")
    wait_for("the phase event", lambda: any(e["message"] == "upgrade staging" for e in h.events("up")))
    assert [e["message"] for e in h.events("up") if e["reason"] == "UpgradePhase"] == ["upgrade staging"]


def test_refused_upgrade_fails_with_the_reason_of_the_refusal(h):
    h.start()
    h.create("q", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("q"))
    h.dispatcher.fail(req, Reason.QUARANTINED, "version 9.0.0 was rolled back by operation x; quarantined")
    h.wait_phase("q", "Failed")
    assert h.condition("q")["reason"] == "Quarantined" and "quarantined" in h.condition("q")["message"]


def test_another_upgrade_on_the_host_delays_it_but_does_not_fail_it(h):
    cli = h.dispatcher.submit("upgrade", url="https://elsewhere.example.com/a.tar.gz")
    h.dispatcher.claim(cli)  # a CLI upgrade runs
    h.start()
    h.create("later", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("later"))
    assert [r.id for r in h.dispatcher.queued()] == [cli.id, req.id]  # queued behind it
    h.dispatcher.succeed(cli, "upgraded by hand")
    h.settle()
    assert h.phase("later") == "InProgress"  # someone else's result is not this operation's
    h.dispatcher.succeed(req)
    h.wait_phase("later", "Complete")


def test_a_superseded_result_fails_the_operation_superseded(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    reset = h.dispatcher.submit("reset")  # `unbounded-agent reset`, queued behind the upgrade
    (superseded,) = h.dispatcher.supersede(reset)
    assert superseded.id == req.id
    h.wait_phase("up", "Failed")
    cond = h.condition("up")
    assert cond["reason"] == "Superseded" and f"superseded by reset {reset.id}" in cond["message"]
    warning = wait_for("the Event", lambda: [e for e in h.events("up") if e["reason"] == "Superseded"])
    assert warning[0]["type"] == "Warning"


def test_an_upgrade_asked_for_while_a_reset_is_queued_fails_superseded_without_a_request(h):
    reset = h.dispatcher.submit("reset")
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    h.wait_phase("up", "Failed")
    assert h.condition("up")["reason"] == "Superseded" and reset.id in h.condition("up")["message"]
    assert h.dispatcher.submitted() == [reset.id]


def stop_at(h, step: str) -> str:
    """Run the watcher until it stopped (or was killed: only its files survive) at step; the name."""
    h.create("up", "AgentUpgrade", downloadURL=URL)
    op = h.get("up")
    operation = h.operation("up")
    if step == ACCEPTED:  # claimed and recorded, nothing else yet: only a kill right then leaves this
        h.progress_store().save(OperationProgress(uid=op["metadata"]["uid"], name="up", kind="AgentUpgrade",
                                                  operation=operation, claimed_at=records.now(),
                                                  params={"downloadURL": URL, "sha256": None, "force": False}))
        return operation
    if step in ("submitting", "submitted-unrecorded"):
        # Killed after the fresh read and InProgress, once the request id was recorded, before (or right after)
        # the request was queued.
        p = OperationProgress(uid=op["metadata"]["uid"], name="up", kind="AgentUpgrade", operation=operation,
                              claimed_at=records.now(), step=SUBMITTING, request_id=new_id("mop"),
                              generation=op["metadata"]["generation"], params={"downloadURL": URL, "sha256": None, "force": False})
        h.progress_store().save(p)
        if step == "submitted-unrecorded":  # killed after queueing the request, before recording it
            h.spool.submit(Request(id=p.request_id, kind="upgrade", operation=operation, source="machineoperation",
                                   url=URL))
        return operation
    h.start()
    req = h.dispatcher.wait_request(operation)
    wait_for("the request to be recorded", lambda: h.step("up") == SUBMITTED)
    if step == "phase-announced":
        h.dispatcher.record(req, "probation")
        wait_for("the phase to be announced", lambda: h.progress("up").upgrade_phase == "probation")
    if step == DONE:
        h.dispatcher.succeed(req)
        wait_for("the end to be written", lambda: h.step("up") == DONE and h.progress("up").written)
    h.stop()
    return operation


@pytest.mark.parametrize("step", [ACCEPTED, "submitting", "submitted-unrecorded", SUBMITTED, "phase-announced", DONE])
def test_restart_at_each_step_never_submits_twice(h, step):
    """A daemon stopped (or killed) at each step resumes there; exactly one request per operation."""
    operation = stop_at(h, step)
    saved = h.progress("up")
    h.start()  # the new daemon, same state dir and spool
    h.synced()
    if step != DONE:
        req = h.dispatcher.wait_request(operation)
        if saved.request_id:
            assert req.id == saved.request_id  # the id chosen before the stop
        wait_for("the request to be recorded", lambda: h.step("up") == SUBMITTED)
        h.dispatcher.succeed(req)
    h.wait_phase("up", "Complete")
    h.settle()
    assert len(h.dispatcher.submitted(operation)) == 1
    assert len(h.dispatcher.submitted()) == 1
    phase_events = [e["message"] for e in h.events("up") if e["reason"] == "UpgradePhase"]
    assert phase_events == (["upgrade probation"] if step == "phase-announced" else [])


def test_the_new_daemon_publishes_the_result_written_while_no_daemon_ran(h):
    """The switch restarts the daemon; probation commits while the new one runs, or the rollback restores
    the old one: either way the daemon that starts next publishes the result."""
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    wait_for("the request to be recorded", lambda: h.step("up") == SUBMITTED)
    h.stop()
    h.dispatcher.record(req, "committed")
    h.dispatcher.succeed(req, "upgraded from 1 to 2")
    assert h.phase("up") == "InProgress"  # stays InProgress across the restart
    h.start()
    h.wait_phase("up", "Complete")
    assert h.condition("up")["message"] == "upgraded from 1 to 2"
    assert h.dispatcher.submitted() == [req.id]


def test_invalid_url_fails_at_once_without_touching_the_host(h):
    h.start()
    h.create("bad-url", "AgentUpgrade", downloadURL="https://user:hunter2@example.com/a.tar.gz")
    h.wait_phase("bad-url", "Failed")
    cond = h.condition("bad-url")
    assert cond["reason"] == "InvalidParameters" and "user info" in cond["message"]
    assert "hunter2" not in str(h.get("bad-url")["status"]) + str(h.events("bad-url"))
    assert h.dispatcher.submitted() == [] and h.progress("bad-url").request_id is None


# -- an upgrade started by an agent before the operation queue ----------------------------------------


def legacy(h, record_phase: str | None, **record) -> str:
    """The files an older agent left: its progress step "upgrade-started" and a record named by operation."""
    h.create("up", "AgentUpgrade", downloadURL=URL)
    h.set_status("up", "InProgress", "InProgress", f"staging upgraded host agent binary from {URL}")
    op = h.get("up")
    operation = h.operation("up")
    h.progress_store().save(OperationProgress(uid=op["metadata"]["uid"], name="up", kind="AgentUpgrade",
                                              step="upgrade-started", operation=operation,
                                              params={"downloadURL": URL, "sha256": None, "force": False}))
    if record_phase:
        Store(h.cfg).write(UpgradeRecord(id="", operation=operation, phase=record_phase, **record))
    return operation


def test_an_upgrade_of_an_older_agent_is_followed_to_its_end(h):
    operation = legacy(h, "probation")
    h.start()
    h.synced()
    h.settle()
    assert h.phase("up") == "InProgress"  # not final yet: nothing to say
    Store(h.cfg).write(UpgradeRecord(id="", operation=operation, phase="committed", reason="Succeeded",
                                     message="upgraded from 0.9.0 to 1.0.0"))
    h.wait_phase("up", "Complete")
    assert h.condition("up")["message"] == "upgraded from 0.9.0 to 1.0.0"
    assert h.dispatcher.submitted() == []


def test_an_upgrade_of_an_older_agent_without_its_record_fails(h):
    legacy(h, None)
    h.start()
    h.wait_phase("up", "Failed")
    assert h.condition("up")["reason"] == "ExecutionFailed"
    assert "no longer describes this operation" in h.condition("up")["message"]
    assert h.dispatcher.submitted() == []


def test_a_request_that_leaves_the_queue_without_a_result_fails_the_operation(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    h.dispatcher.path(req).unlink()  # the host's queue was wiped under it
    h.wait_phase("up", "Failed")
    cond = h.condition("up")
    assert cond["reason"] == Reason.EXECUTION_FAILED.value and "left this host's queue without a result" in cond["message"]


def test_the_parameters_run_and_the_generation_published_are_of_one_version(h):
    """The spec is changed after the fresh read, before InProgress is written: that write meets a conflict and is
    made over the newer version, yet publishes the generation whose parameters were queued."""
    def edit():
        if len(hook.caught) == 2:  # the first write is Pending ("accepted"), before the read; the second InProgress
            h.admin.request("PATCH", get_path("up"), body={"spec": {"parameters": {"downloadURL": OTHER_URL}}},
                            content_type="application/merge-patch+json")

    hook = h.before_agent("PUT", get_path("up") + "/status", action=edit, times=2)
    h.create("up", "AgentUpgrade", downloadURL=URL)
    h.start()
    req = h.dispatcher.wait_request(h.operation("up"))
    op = h.wait_phase("up", "InProgress")
    assert op["metadata"]["generation"] == 2 and req.url == URL
    assert h.condition("up")["observedGeneration"] == 1
    assert any(r.code == 409 for r in h.agent_requests(verb="update"))


def signal_after_commit(h, req, at="2026-01-01T00:10:00.000Z"):
    """What recovery writes when it rolled req's committed upgrade back (upgrade/recovery.py)."""
    from unbounded_agent.upgrade.record import Binary, Failure, RollbackSignal

    Store(h.cfg).write_signal(RollbackSignal(
        operation=req.operation, request_id=req.id, after_commit=True, reason="DaemonFailedAfterCommit", at=at,
        failed=Binary(version="2.0.0"), restored=Binary(version="1.0.0"), failure=Failure(exit_code=1),
        failure_message="AgentUpgrade daemon kept failing after its commit (the committed daemon crashed 3 times "
                        "within 600 s of its commit (exit code 1)); rolled back to 1.0.0"))


def test_a_rollback_after_the_commit_adds_a_condition_and_a_warning_to_the_complete_operation(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    h.dispatcher.succeed(req, "upgraded from 1.0.0 to 2.0.0")
    h.wait_phase("up", "Complete")
    h.restart()  # the restored daemon
    signal_after_commit(h, req)

    def rolled_back():
        conds = {c["type"]: c for c in h.get("up")["status"]["conditions"]}
        return conds.get("RolledBack")

    cond = wait_for("the RolledBack condition", rolled_back)
    assert (cond["status"], cond["reason"]) == ("True", "DaemonFailedAfterCommit")
    assert "rolled back to 1.0.0" in cond["message"] and "crashed 3 times" in cond["message"]
    op = h.get("up")
    assert op["status"]["phase"] == "Complete" and h.condition("up")["reason"] == "Succeeded"  # it did complete
    warning = wait_for("the Warning Event", lambda: [e for e in h.events("up") if e["reason"] == "DaemonFailedAfterCommit"])
    assert warning[0]["type"] == "Warning" and "rolled back to 1.0.0" in warning[0]["message"]
    # once: another pass, or another restart, reports nothing more
    h.restart()
    h.settle()
    assert len([e for e in h.events("up") if e["reason"] == "DaemonFailedAfterCommit"]) == 1


def test_a_rollback_signal_of_a_failed_probation_adds_nothing(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    h.dispatcher.fail(req, Reason.DAEMON_FAILED, "version 2.0.0 failed on probation")
    h.wait_phase("up", "Failed")
    from unbounded_agent.upgrade.record import RollbackSignal

    Store(h.cfg).write_signal(RollbackSignal(operation=req.operation, request_id=req.id, after_commit=False))
    h.settle()
    assert [c["type"] for c in h.get("up")["status"]["conditions"]] == ["Completed"]
