"""A host that loses power in the middle of a reset step boots with the reset still claimed in the
operation queue: the dispatcher, started at boot, goes on with the same reset and completes it, and the
`unbounded-agent reset` run afterwards finds nothing left to do."""

import pytest
from bootstrapped_host import (
    BIN_CURRENT,
    DISPATCH,
    bootstrap,
    checkpoint_exists,
    claimed_request,
    hold_step,
    removed_items,
    result_of,
    run_reset,
    snapshot,
    start_cli_reset,
    wait_held,
)
from waiting import wait_until

pytestmark = pytest.mark.testhost


def journal(host, unit: str, boot: str) -> str:
    return host.run(["journalctl", "--no-pager", "-o", "cat", "-b", boot, "-u", unit], check=False).stdout


@pytest.mark.parametrize("held_step", ["stop-machines", "remove-machine-trees", "remove-agent"])
def test_a_reset_cut_by_power_loss_completes_after_boot(agent_host, held_step):
    host = agent_host
    fx = bootstrap(host)
    unit = f"unbounded-agent-reset-{held_step}.service"
    # The hold is a runtime drop-in: the power cut takes it away, so the step runs freely after the boot.
    hold_step(host, held_step)
    start_cli_reset(host)
    wait_held(host, held_step)
    req = claimed_request(host)
    assert req["kind"] == "reset" and checkpoint_exists(host)

    host.power_cycle(hard=True)
    # A boot itself drops runtime state (links, routes, stopped machines) of decoys and items alike: the
    # reset must keep every decoy that is still there (the reset does not touch them, whenever we look).
    decoys_after_boot = fx.kept(snapshot(host))
    assert "path /etc/wireguard/wg0.conf" in decoys_after_boot

    res = wait_until(f"the result of reset {req['id']}", lambda: result_of(host, req["id"]), timeout=300)
    snap = snapshot(host)
    assert (res["succeeded"], res["reason"]) == (True, "Succeeded"), res
    assert fx.items - fx.gone(snap) == set()
    assert decoys_after_boot - fx.kept(snap) == set()
    assert not checkpoint_exists(host)
    # the step was cut in the boot before, and done in this one, by the dispatcher going on with the reset
    before_the_cut = journal(host, unit, "-1")
    assert "succeeded:" not in before_the_cut[before_the_cut.rindex(f"Starting {unit}"):]
    assert "succeeded:" in journal(host, unit, "0")
    assert (f"reset {req['id']} (request {req['id']}, from cli): going on after an interruption (attempt 2)"
            in journal(host, DISPATCH, "0"))

    # run again (with the toolset's own CLI once the agent is gone): nothing is left to do
    code, report, stderr = run_reset(host, toolset=not host.path(BIN_CURRENT).exists())
    assert (code, report["result"]) == (0, "succeeded"), stderr
    assert removed_items(report) == set()
