"""A reset whose dispatcher is killed (kill -9) in the middle never leaves the host half reset for good:
unbounded-agent-requests.path starts a new dispatcher for the claimed request, which takes the host for the
same reset and completes it; the `unbounded-agent reset` that queued it reports success, without anyone
running it again. (A killed step: test_reset_resumes_after_kill.py.)"""

import pytest
from bootstrapped_host import (
    DISPATCH,
    checkpoint_exists,
    cli_reset_outcome,
    held_reset,
    kill_the_dispatcher,
    release_step,
    result_of,
    snapshot,
)
from waiting import wait_until

pytestmark = pytest.mark.testhost

# Where a dispatcher is killed: early and late in phase 1 (the last removing the agent's files), and in phase 2
# (which stops its daemon).
DISPATCHER_KILLED_AT = ["stop-machines", "remove-routing", "remove-agent", "verify", "stop-daemon", "finish"]


def journal_of(host, unit):
    return host.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False).stdout


@pytest.mark.parametrize("held_step", DISPATCHER_KILLED_AT)
def test_a_reset_whose_dispatcher_is_killed_completes_on_its_own(agent_host, held_step):
    host = agent_host
    fx, id, _ = held_reset(host, held_step)
    kill_the_dispatcher(host, id)  # returns once a new dispatcher holds the host for the same reset
    release_step(host, held_step)

    code, report = cli_reset_outcome(host)
    snap = snapshot(host)
    assert (code, report["result"], report["run_id"]) == (0, "succeeded", id), report
    assert [s["step"] for s in report["steps"] if s["result"] != "succeeded"] == []
    assert result_of(host, id)["succeeded"] is True
    assert fx.items - fx.gone(snap) == set()
    assert fx.decoys - fx.kept(snap) == set()
    assert not checkpoint_exists(host)
    line = f"reset {id} (request {id}, from cli): going on after an interruption (attempt 2)"
    wait_until(f"{line!r} in the dispatcher's journal", lambda: line in journal_of(host, DISPATCH), timeout=60)
