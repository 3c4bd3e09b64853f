"""A reset interrupted by a kill never leaves the host half reset for good: a step killed (kill -9) before it
could do its work fails the reset, naming that step; the reset leaves its "resetting" checkpoint behind, and
the next `unbounded-agent reset` completes the job (once the agent is gone, with the toolset's own CLI).
The dispatcher killed in the middle of a reset: test_reset_resumes_after_dispatcher_kill.py (a file, and so a
test host, of its own: the two run side by side)."""

import pytest
from bootstrapped_host import (
    BIN_CURRENT,
    checkpoint_exists,
    cli_reset_outcome,
    held_reset,
    release_step,
    result_of,
    run_reset,
    snapshot,
    step,
)

pytestmark = pytest.mark.testhost

# The steps in chain order (begin has just run before the first).
NEXT_STEP = ["stop-machines", "remove-links", "remove-wireguard-keys", "remove-nspawn-config",
             "remove-machine-trees", "remove-routing", "remove-agent", "verify", "stop-daemon", "reload-systemd",
             "finish"]


@pytest.mark.parametrize("killed_step", NEXT_STEP)
def test_a_reset_whose_step_is_killed_completes_when_run_again(agent_host, killed_step):
    host = agent_host
    fx, id, _ = held_reset(host, killed_step)
    host.run(["systemctl", "kill", "--signal=SIGKILL", f"unbounded-agent-reset-{killed_step}.service"])
    release_step(host, killed_step)

    code, report = cli_reset_outcome(host)
    res = result_of(host, id)
    assert code != 0 and (res["succeeded"], res["step"]) == (False, killed_step), res
    assert "ended without a report" in res["message"]
    assert step(report, killed_step)["result"] == "not-run"  # it wrote no report for this run
    assert checkpoint_exists(host), "an interrupted reset must leave its checkpoint"
    if NEXT_STEP.index(killed_step) <= NEXT_STEP.index("remove-agent"):
        assert fx.items - fx.gone(snapshot(host)), "the kill came too late: nothing was left to resume"

    # Once the agent is removed (step 7), `unbounded-agent` is gone: the toolset's own CLI remains.
    agent_removed = not host.path(BIN_CURRENT).exists()
    code, report, stderr = run_reset(host, toolset=agent_removed)
    snap = snapshot(host)
    assert (code, report["result"]) == (0, "succeeded"), stderr
    assert fx.items - fx.gone(snap) == set()
    assert fx.decoys - fx.kept(snap) == set()
    assert not checkpoint_exists(host)
    assert any(n.startswith("resuming the interrupted reset") for n in step(report, "begin")["notes"])
