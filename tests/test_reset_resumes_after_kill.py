"""A reset killed between any two steps — the CLI and the whole unit chain gone at once, as in a
power cut — leaves its "resetting" checkpoint behind, and the next run completes it."""

import pytest

from bootstrapped_host import (  # noqa: F401 (fixtures)
    agent_host, bootstrap, checkpoint_exists, drop_in, remove_drop_in, run_reset, snapshot, step)

pytestmark = pytest.mark.testhost

# The unit that is about to start at each kill point, in chain order (begin has just run before the first).
NEXT_STEP = ["stop-machines", "remove-links", "remove-wireguard-keys", "remove-nspawn-config",
             "remove-machine-trees", "remove-routing", "remove-agent", "reload-systemd", "verify"]
CLI_UNIT = "test-reset-cli.service"
# Kills the running CLI, cancels every queued job (the rest of the chain), and fails this unit
# before its ExecStart runs: the state on disk is exactly "everything before <step> done".
KILL_HERE = (f"[Service]\nExecStartPre=/bin/sh -c 'systemctl kill --signal=SIGKILL {CLI_UNIT}; "
             "systemctl cancel; exit 1'\n")


@pytest.mark.parametrize("next_step", NEXT_STEP)
def test_a_reset_killed_before_a_step_completes_when_run_again(agent_host, next_step):
    host = agent_host
    fx = bootstrap(host)
    unit = f"unbounded-agent-reset-{next_step}.service"
    drop_in(host, unit, KILL_HERE)
    try:
        killed = host.run(["systemd-run", f"--unit={CLI_UNIT}", "--wait", "--collect", "--quiet",
                           "unbounded-agent", "reset"], check=False)
    finally:
        remove_drop_in(host, unit)
    assert killed.returncode != 0
    assert checkpoint_exists(host), "an interrupted reset must leave its checkpoint"
    if NEXT_STEP.index(next_step) <= NEXT_STEP.index("remove-agent"):
        snap = snapshot(host)
        assert fx.items - fx.gone(snap), "the kill came too late: nothing was left to resume"

    # Once the agent is removed (step 7), `unbounded-agent` is gone: the toolset's entry remains.
    agent_removed = NEXT_STEP.index(next_step) > NEXT_STEP.index("remove-agent")
    code, report, stderr = run_reset(host, toolset=agent_removed)
    snap = snapshot(host)
    assert (code, report["result"]) == (0, "succeeded"), stderr
    assert fx.items - fx.gone(snap) == set()
    assert fx.decoys - fx.kept(snap) == set()
    assert not checkpoint_exists(host)
    assert any(n.startswith("resuming the interrupted reset") for n in step(report, "begin")["notes"])
