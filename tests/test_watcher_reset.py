"""AgentReset through the watcher (real test API server, fake host side): Complete is on the server before
the final steps — which stop and remove the daemon — are started; a failed step fails the operation and
leaves the daemon running; a restart never starts a phase twice."""

import pytest

from watcher_fakes import Harness, wait_for
from unbounded_agent import watcher


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def progress(h, name):
    op = h.get(name)
    return watcher.ProgressStore(h.cfg.state_dir).load_all().get(op["metadata"]["uid"]) if op else None


def step_of(h, name):
    p = progress(h, name)
    return p and p["step"]


def test_reset_is_complete_before_the_final_steps_start(h):
    h.ops.phase1_busy = True
    h.start()
    h.create("reset", "AgentReset")
    h.wait_phase("reset", "InProgress")
    assert h.get("reset")["status"]["message"] == "resetting unbounded agent"
    wait_for("phase 1 to start", lambda: h.ops.count("start_reset_phase1"))
    assert h.ops.count("start_reset_phase2") == 0
    h.ops.phase1_busy = False
    wait_for("phase 2 to start", lambda: h.ops.count("start_reset_phase2"))
    # at the moment phase 2 was asked for, the server already said Complete
    assert h.phase("reset") == "Complete" and h.condition("reset")["reason"] == "Succeeded"
    assert h.phases_written("reset") == ["Pending", "InProgress", "Complete"]
    assert [c[0] for c in h.ops.calls] == ["request_reset", "start_reset_phase1", "start_reset_phase2"]
    assert "ResetStep" in [e["reason"] for e in h.events("reset")]


def test_final_steps_wait_until_complete_is_written(h):
    h.ops.phase1_busy = True
    h.start()
    h.create("reset", "AgentReset")
    wait_for("phase 1 to start", lambda: h.ops.count("start_reset_phase1"))
    h.server.pause(mode="503")
    h.ops.phase1_busy = False
    wait_for("the Complete status to wait for the server",
             lambda: h.watcher.active() and h.watcher.active()["step"] == "reset-reporting")
    assert h.ops.count("start_reset_phase2") == 0  # the daemon must not remove itself with Complete unsaid
    h.server.resume()
    wait_for("phase 2 to start", lambda: h.ops.count("start_reset_phase2"), timeout=60)
    assert h.phase("reset") == "Complete"


def test_failed_step_fails_the_reset_and_keeps_the_daemon(h):
    h.ops.phase1_result = {"finished": True, "succeeded": False, "reason": "ExecutionFailed", "step": "remove-links",
                           "message": "reset step 2 (remove-links) failed: InventoryFailed: netlink dump failed"}
    h.start()
    h.create("reset", "AgentReset")
    h.wait_phase("reset", "Failed")
    cond = h.condition("reset")
    assert cond["reason"] == "ExecutionFailed" and "remove-links" in cond["message"]
    assert h.ops.count("start_reset_phase2") == 0
    assert h.watcher.active() is None and h.thread.is_alive()


def test_restart_while_phase1_runs_does_not_start_it_again(h):
    h.ops.phase1_busy = True
    h.start()
    h.create("reset", "AgentReset")
    wait_for("phase 1 to start", lambda: step_of(h, "reset") == "reset-phase1")
    h.restart()
    wait_for("the new watcher to list", lambda: h.watcher.synced)
    h.ops.phase1_busy = False
    wait_for("phase 2 to start", lambda: h.ops.count("start_reset_phase2"))
    assert h.ops.count("start_reset_phase1") == 1 and h.ops.count("request_reset") == 1


def test_phase1_cut_short_by_a_host_stop_is_resumed_once(h):
    """After a power loss phase 1 neither runs nor has all its reports: the new daemon starts it again
    (its steps are idempotent and the checkpoint resumes it) under the same run id."""
    h.ops.phase1_busy = True
    h.start()
    h.create("reset", "AgentReset")
    wait_for("phase 1 to start", lambda: step_of(h, "reset") == "reset-phase1")
    h.stop()
    h.ops.phase1_busy = False
    h.ops.phase1_result = {"finished": True, "succeeded": False, "reason": "ExecutionFailed", "interrupted": True,
                           "message": "reset step 6 (remove-routing) did not run"}
    h.start()
    wait_for("phase 1 to be started again", lambda: h.ops.count("start_reset_phase1") == 2)
    assert {c[1] for c in h.ops.calls if c[0] == "start_reset_phase1"} == {"run-1"}
    h.ops.phase1_result = {"finished": True, "succeeded": True, "reason": "Succeeded", "message": "AgentReset completed"}
    wait_for("phase 2 to start", lambda: h.ops.count("start_reset_phase2"))
    assert h.phase("reset") == "Complete"


def test_restart_after_phase2_was_started_does_not_start_it_again(h):
    h.start()
    h.create("reset", "AgentReset")
    wait_for("phase 2 to start", lambda: h.ops.count("start_reset_phase2"))
    h.restart()  # phase 2 failed to remove the daemon, which systemd started again
    wait_for("the watcher to close the operation", lambda: step_of(h, "reset") == "done")
    assert h.ops.count("start_reset_phase2") == 1 and h.phase("reset") == "Complete"


def test_reset_deleted_midway_lets_the_host_finish(h):
    h.ops.phase1_busy = True
    h.start()
    h.create("reset", "AgentReset")
    wait_for("phase 1 to start", lambda: h.ops.count("start_reset_phase1"))
    uid = h.get("reset")["metadata"]["uid"]
    h.delete("reset")
    h.ops.phase1_busy = False
    wait_for("phase 2 to start", lambda: h.ops.count("start_reset_phase2"))
    p = watcher.ProgressStore(h.cfg.state_dir).load_all()[uid]
    assert p["gone"] is True and h.get("reset") is None


def test_a_step_that_failed_while_the_daemon_was_down_is_reported_not_rerun(h):
    h.ops.phase1_busy = True
    h.start()
    h.create("reset", "AgentReset")
    wait_for("phase 1 to start", lambda: step_of(h, "reset") == "reset-phase1")
    h.stop()
    h.ops.phase1_busy = False
    h.ops.phase1_result = {"finished": True, "succeeded": False, "reason": "ExecutionFailed", "interrupted": False,
                           "message": "reset step 1 (stop-machines) failed without a report (unit result exit-code)"}
    h.start()
    h.wait_phase("reset", "Failed")
    assert "stop-machines" in h.condition("reset")["message"]
    assert h.ops.count("start_reset_phase1") == 1 and h.ops.count("start_reset_phase2") == 0
