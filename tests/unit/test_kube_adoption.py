"""An operation InProgress on the server that this agent has no progress for (kube/adoption.py): followed from
its request in the host's queue — never submitted again — or failed as before when the queue does not know it.
Against the real test API server and a real spool (tests/support/watcher_fakes.py)."""

import shutil

import pytest
from watcher_fakes import GATE_MESSAGE, Harness, wait_for

from unbounded_agent.kube.progress import SUBMITTED
from unbounded_agent.reasons import Reason


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def lose_progress(h, name: str):
    """The reset runs; its daemon restarts after remove-agent took the state directory (progress and all)."""
    h.start()
    h.create(name, "AgentReset")
    req = h.dispatcher.wait_request(h.operation(name))
    wait_for("the request to be recorded", lambda: h.step(name) == SUBMITTED)
    h.stop()
    shutil.rmtree(h.cfg.state_dir)
    return req


def test_a_reset_whose_progress_was_lost_is_followed_to_complete_from_its_request(h):
    req = lose_progress(h, "reset")
    h.dispatcher.claim(req)  # the dispatcher runs it
    h.start()
    wait_for("the watcher to follow it", lambda: h.step("reset") == SUBMITTED)
    h.dispatcher.open_gate(req)
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.phase("reset") == "Complete" and h.condition("reset")["message"] == GATE_MESSAGE
    assert h.dispatcher.submitted() == [req.id]  # never run again


def test_a_gate_open_before_it_starts_is_acknowledged_only_after_it_has_reported(h):
    """The reset's reporter (or a daemon restarted after remove-agent) starts with the gate already open and no
    progress: what is there to report is known only once it has listed. It reports, then lets the gate go."""
    req = lose_progress(h, "reset")
    h.dispatcher.claim(req)
    h.dispatcher.open_gate(req)
    h.partition_agent()  # it cannot list yet
    h.start()
    h.settle(3)
    assert not h.dispatcher.acked(req)
    h.partition_agent(cut=False)
    wait_for("the ack", lambda: h.dispatcher.acked(req))
    assert h.phase("reset") == "Complete" and h.condition("reset")["message"] == GATE_MESSAGE
    assert h.dispatcher.submitted() == [req.id]


def test_a_result_written_while_no_agent_could_report_is_published_by_the_next_agent(h):
    req = lose_progress(h, "reset")
    h.dispatcher.succeed(req, "reset complete: the agent, its machines, links, keys and routing are gone")
    h.start()  # an agent installed again on this machine
    h.wait_phase("reset", "Complete")
    assert h.condition("reset")["message"].startswith("reset complete")
    assert h.dispatcher.submitted() == [req.id]


def test_without_a_request_in_the_queue_it_is_failed_not_run(h):
    lose_progress(h, "reset")
    shutil.rmtree(h.spool.root)  # the host's queue is gone too: nothing says what happened
    h.spool.ensure()
    h.start()
    h.wait_phase("reset", "Failed")
    cond = h.condition("reset")
    assert cond["reason"] == Reason.EXECUTION_FAILED.value and "no record of starting this operation" in cond["message"]
    assert h.dispatcher.submitted() == []
