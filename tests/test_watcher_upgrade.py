"""AgentUpgrade through the watcher, against the real test API server; the host side is a fake of
operations.py (tests/watcher_fakes.py). Each test reads as what a user sees with kubectl."""

import pytest

from watcher_fakes import Harness, wait_for
from unbounded_agent import watcher
from unbounded_agent.reasons import OpsError, Reason

URL = "https://releases.example.com/agent.tar.gz"


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def progress(h, name):
    op = h.get(name)
    return watcher.ProgressStore(h.cfg.state_dir).load_all().get(op["metadata"]["uid"])


def test_good_upgrade_goes_pending_inprogress_complete(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL + "?sig=topsecret", sha256="ab" * 32)
    op = h.wait_phase("up", "InProgress")
    assert op["status"]["message"] == f"staging upgraded host agent binary from {URL}"
    assert h.condition("up")["status"] == "False" and h.condition("up")["reason"] == "InProgress"
    wait_for("the upgrade to start", lambda: h.ops.count("start_upgrade"))
    (call,) = [c for c in h.ops.calls if c[0] == "start_upgrade"]
    assert call[1:] == (h.operation("up"), URL + "?sig=topsecret", "ab" * 32, False)  # the full URL reaches the host
    h.ops.set_upgrade(h.operation("up"), "committed", ok=True, message="upgraded from 1.0.0 to 2.0.0")
    op = h.wait_phase("up", "Complete")
    cond = h.condition("up")
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "Succeeded", "upgraded from 1.0.0 to 2.0.0")
    assert op["status"]["startedAt"] and op["status"]["completedAt"]
    # the story, in Events; no secret anywhere the API server keeps
    wait_for("the last Event", lambda: "Completed" in [e["reason"] for e in h.events("up")])
    reasons = [e["reason"] for e in h.events("up")]
    assert reasons[:2] == ["Accepted", "UpgradeStarted"] and reasons[-1] == "Completed"
    written = str(h.get("up")["status"]) + str(h.events("up"))
    assert "topsecret" not in written
    # every status write went through the status subresource, as the agent's own user
    writes = [r for r in h.server.requests if r.user == "agent-worker-01" and r.verb in ("update", "patch")
              and r.resource.startswith("machineoperations")]
    assert writes and all(r.resource == "machineoperations/status" for r in writes)
    assert [r.code for r in writes] == [200] * len(writes)


def test_statuses_in_order_pending_then_inprogress_then_complete(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    wait_for("the upgrade to start", lambda: h.ops.count("start_upgrade"))
    h.ops.set_upgrade(h.operation("up"), "committed", ok=True)
    h.wait_phase("up", "Complete")
    assert h.phases_written("up") == ["Pending", "InProgress", "Complete"]


def test_rolled_back_upgrade_fails_with_daemon_failed_and_the_recorded_detail(h):
    h.start()
    h.create("bad", "AgentUpgrade", downloadURL=URL)
    wait_for("the upgrade to start", lambda: h.ops.count("start_upgrade"))
    h.ops.set_upgrade(h.operation("bad"), "probation")
    wait_for("a phase event", lambda: any("probation" in e["message"] for e in h.events("bad")))
    assert h.phase("bad") == "InProgress"
    detail = "version 9.0.0 failed on probation: exit code 3; rolled back to 1.0.0 (unbounded-agent-blue)"
    h.ops.set_upgrade(h.operation("bad"), "rolled-back", ok=False, reason="DaemonFailed", message=detail)
    h.wait_phase("bad", "Failed")
    cond = h.condition("bad")
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "DaemonFailed", detail)
    warning = wait_for("the failure's Event", lambda: [e for e in h.events("bad") if e["type"] == "Warning"])
    assert warning[0]["reason"] == "DaemonFailed" and warning[0]["message"] == detail


def test_refused_upgrade_fails_with_the_reason_of_the_refusal(h):
    h.ops.refuse_upgrade = OpsError(Reason.QUARANTINED, "version 9.0.0 was rolled back by operation x; quarantined")
    h.start()
    h.create("q", "AgentUpgrade", downloadURL=URL)
    h.wait_phase("q", "Failed")
    assert h.condition("q")["reason"] == "Quarantined" and "quarantined" in h.condition("q")["message"]


def test_another_upgrade_on_the_host_delays_the_start_but_does_not_fail_it(h):
    h.ops.busy_upgrade = 1  # the first start is refused with UpgradeInProgress (a CLI upgrade runs)
    h.start()
    h.create("later", "AgentUpgrade", downloadURL=URL)
    wait_for("the second start", lambda: h.ops.count("start_upgrade") == 2, timeout=60)
    assert h.phase("later") == "InProgress"
    h.ops.set_upgrade(h.operation("later"), "committed", ok=True)
    h.wait_phase("later", "Complete")


@pytest.mark.parametrize("stop_at", ["accepted", "upgrade-starting", "upgrade-started", "probation"])
def test_restart_at_each_step_never_starts_the_upgrade_twice(h, stop_at):
    """A daemon stopped (or killed: the progress file is all that survives) at each step resumes there."""
    h.start()
    if stop_at in ("accepted", "upgrade-starting"):
        # Stop the first watcher right after it persisted this step, before it moved on.
        h.stop()
        h.create("up", "AgentUpgrade", downloadURL=URL)
        op = h.get("up")
        store = watcher.ProgressStore(h.cfg.state_dir)
        store.save({"uid": op["metadata"]["uid"], "name": "up", "kind": "AgentUpgrade", "step": stop_at,
                    "claimed_at": "2026-01-01T00:00:00Z", "operation": h.operation("up"),
                    "params": {"downloadURL": URL, "sha256": None, "force": False}, "written": False,
                    "gone": False, "attempts": 0, "want": None})
        if stop_at == "upgrade-starting":
            h.ops.start_upgrade(h.cfg, h.operation("up"), URL, None, False)  # it had started before the kill
    else:
        h.create("up", "AgentUpgrade", downloadURL=URL)
        wait_for("the upgrade to start", lambda: progress(h, "up") and progress(h, "up")["step"] == "upgrade-started")
        if stop_at == "probation":
            h.ops.set_upgrade(h.operation("up"), "probation")
        h.stop()
    h.start()  # the new daemon, same state dir
    wait_for("the watcher to settle", lambda: progress(h, "up") and progress(h, "up")["step"] == "upgrade-started")
    h.ops.set_upgrade(h.operation("up"), "committed", ok=True)
    h.wait_phase("up", "Complete")
    # upgrade.start_upgrade is idempotent per operation name, but the watcher must not even ask twice
    # unless it died between asking and recording that it asked (the "upgrade-starting" case).
    assert h.ops.count("start_upgrade") == (2 if stop_at == "upgrade-starting" else 1)
    assert len({c[1] for c in h.ops.calls if c[0] == "start_upgrade"}) == 1


def test_the_new_daemon_publishes_the_outcome_written_while_no_daemon_ran(h):
    """The switch restarts the daemon; probation commits while the new one runs, or the rollback restores
    the old one: either way the daemon that starts next publishes what the record says."""
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    wait_for("the upgrade to start", lambda: progress(h, "up") and progress(h, "up")["step"] == "upgrade-started")
    h.stop()
    h.ops.set_upgrade(h.operation("up"), "committed", ok=True, message="upgraded from 1 to 2")
    assert h.phase("up") == "InProgress"  # stays InProgress across the restart
    h.start()
    h.wait_phase("up", "Complete")
    assert h.ops.count("start_upgrade") == 1


def test_invalid_url_fails_at_once_without_touching_the_host(h):
    h.start()
    h.create("bad-url", "AgentUpgrade", downloadURL="https://user:hunter2@example.com/a.tar.gz")
    h.wait_phase("bad-url", "Failed")
    cond = h.condition("bad-url")
    assert cond["reason"] == "InvalidParameters" and "user info" in cond["message"]
    assert "hunter2" not in str(h.get("bad-url")["status"]) + str(h.events("bad-url"))
    assert h.ops.count("start_upgrade") == 0
