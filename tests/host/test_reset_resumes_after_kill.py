"""A reset interrupted by a kill never leaves the host half reset for good.

- A step killed (kill -9) before it could do its work fails the reset, naming that step; the reset leaves
  its "resetting" checkpoint behind, and the next `unbounded-agent reset` completes the job (once the agent
  is gone, with the toolset's own CLI).
- The dispatcher killed (kill -9) in the middle of a reset: unbounded-agent-requests.path starts a new one
  for the claimed request, which takes the host for the same reset and completes it; the `unbounded-agent
  reset` that queued it reports success, without anyone running it again.
"""

import pytest
from bootstrapped_host import (
    BIN_CURRENT,
    DISPATCH,
    bootstrap,
    checkpoint_exists,
    claimed_request,
    cli_reset_outcome,
    hold_step,
    kill_the_dispatcher,
    release_step,
    result_of,
    run_reset,
    snapshot,
    start_cli_reset,
    step,
    unhold_step,
    wait_held,
)
from waiting import wait_until

pytestmark = pytest.mark.testhost

# The steps in chain order (begin has just run before the first).
NEXT_STEP = ["stop-machines", "remove-links", "remove-wireguard-keys", "remove-nspawn-config",
             "remove-machine-trees", "remove-routing", "remove-agent", "verify", "stop-daemon", "reload-systemd",
             "finish"]
# Where a dispatcher is killed: early and late in phase 1 (the last removing the agent's files), and in phase 2
# (which stops its daemon).
DISPATCHER_KILLED_AT = ["stop-machines", "remove-routing", "remove-agent", "verify", "stop-daemon", "finish"]


def journal_of(host, unit):
    return host.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False).stdout


def held_reset(host, held_step) -> tuple[object, str, int]:
    """Bootstrap, queue a reset and hold it just before held_step; (fixture, request id, held pid)."""
    fx = bootstrap(host)
    hold_step(host, held_step)
    try:
        start_cli_reset(host)
        pid = wait_held(host, held_step)
    finally:
        unhold_step(host, held_step)  # a later run of the step does not wait
    req = claimed_request(host)
    assert req and req["kind"] == "reset"
    return fx, req["id"], pid


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
    log = wait_until("the dispatcher's log", lambda: journal_of(host, DISPATCH))
    assert f"reset {id} (request {id}, from cli): going on after an interruption (attempt 2)" in log
