"""A host that loses power in the middle of a reset step boots with the "resetting" checkpoint
still there, and the next reset completes the job."""

import pytest

from bootstrapped_host import (  # noqa: F401 (fixtures)
    agent_host, bootstrap, checkpoint_exists, drop_in, remove_drop_in, run_reset, snapshot, step)
from waiting import wait_until

pytestmark = pytest.mark.testhost

# Holds the step in its ExecStartPre so the power cut lands while the step's unit is running.
HOLD_HERE = "[Service]\nExecStartPre=/bin/sleep infinity\n"


@pytest.mark.parametrize("held_step", ["stop-machines", "remove-machine-trees", "remove-agent"])
def test_a_reset_cut_by_power_loss_completes_after_boot(agent_host, held_step):
    host = agent_host
    fx = bootstrap(host)
    unit = f"unbounded-agent-reset-{held_step}.service"
    drop_in(host, unit, HOLD_HERE)
    host.run(["systemd-run", "--unit=test-reset-cli.service", "--collect", "--quiet",
              "unbounded-agent", "reset"])
    wait_until(f"{unit} to start", lambda: host.run(["systemctl", "is-active", unit], check=False)
               .stdout.strip() == "activating", timeout=60)

    host.power_cycle(hard=True)
    remove_drop_in(host, unit)
    assert checkpoint_exists(host), "the checkpoint must survive the power cut"
    after_boot = snapshot(host)
    assert fx.items - fx.gone(after_boot), "the cut came too late: nothing was left to resume"
    # A boot itself drops runtime state (links, routes, stopped machines) of decoys and items
    # alike: the reset must keep every decoy that is still there.
    decoys_after_boot = fx.kept(after_boot)
    assert "path /etc/wireguard/wg0.conf" in decoys_after_boot

    agent_removed = held_step == "remove-agent" and not host.path(
        "/var/lib/unbounded-agent/bin/unbounded-agent-current").exists()
    code, report, stderr = run_reset(host, toolset=agent_removed)
    snap = snapshot(host)
    assert (code, report["result"]) == (0, "succeeded"), stderr
    assert fx.items - fx.gone(snap) == set()
    assert decoys_after_boot - fx.kept(snap) == set()
    assert not checkpoint_exists(host)
    assert any(n.startswith("resuming the interrupted reset") for n in step(report, "begin")["notes"])
