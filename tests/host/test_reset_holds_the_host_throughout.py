"""One reset holds the host from its first step to its last, across both phases: stopped between two of its
steps, and again between its phases (the agent's files gone, the daemon not yet stopped), the host-operation
lock is the reset's; a bootstrap taking that lock (as upstream's does: non-blocking) is refused, an upgrade is
refused, and a second reset waits its turn — it runs after the first has ended, and finds nothing to do."""

import json

import pytest
from bootstrapped_host import (
    LOCK,
    TOOLSET_RESET,
    bootstrap,
    claimed_request,
    hold_step,
    lock_holder,
    release_step,
    result_of,
    snapshot,
    unhold_step,
    wait_held,
)
from queue_host import DISPATCH, OPS, TOOLSET_CLI, hold, release, unhold
from queue_host import wait_held as wait_point
from waiting import wait_until

pytestmark = pytest.mark.testhost

URL = "https://releases.example.invalid/unbounded-agent-linux-amd64.tar.gz"


def nothing_slips_in(host, reset_id: str, second_id: str, cli: str) -> None:
    holder = lock_holder(host)
    assert (holder["kind"], holder["operation"]) == ("reset", reset_id)
    bootstrap_lock = host.run(["flock", "--nonblock", LOCK, "true"], check=False)
    assert bootstrap_lock.returncode != 0  # a bootstrap cannot take the host
    up = host.run([cli, "upgrade", URL], check=False)
    assert up.returncode == 25 and "is queued or running on this host" in up.stderr, up
    assert claimed_request(host)["id"] == reset_id
    waiting = [p.name for p in host.path(f"{OPS}/spool/requests").glob("*.request")]
    assert [w.split("-", 1)[1] for w in waiting] == [f"{second_id}.request"]  # the second reset waits behind it


def test_nothing_slips_in_between_steps_or_between_phases(agent_host):
    host = agent_host
    fx = bootstrap(host)
    hold_step(host, "remove-links")  # between step 1 and step 2
    hold(host, DISPATCH, "reset-gate-passed")  # between phase 1 and phase 2
    try:
        host.run(["systemd-run", "--unit=first-reset", "--collect", "/bin/sh", "-c",
                  "unbounded-agent reset --json > /var/tmp/first-reset.json"])
        wait_held(host, "remove-links")
        first = claimed_request(host)["id"]
        host.run(["systemd-run", "--unit=second-reset", "--collect", "/bin/sh", "-c",
                  f"{TOOLSET_RESET[0]} reset --json > /var/tmp/second-reset.json"])
        second = wait_until("the second reset to be queued", lambda: next(
            (json.loads(p.read_text())["id"] for p in host.path(f"{OPS}/spool/requests").glob("*.request")), None))
        nothing_slips_in(host, first, second, "unbounded-agent")
        unhold_step(host, "remove-links")
        release_step(host, "remove-links")

        wait_point(host, OPS, "reset-gate-passed")
        assert not host.path("/var/lib/unbounded-agent").exists()  # phase 1 removed the agent's files
        assert host.run(["systemctl", "is-active", "unbounded-agent-daemon.service"]).stdout.strip() == "active"
        nothing_slips_in(host, first, second, TOOLSET_CLI)
        assert result_of(host, second) is None
        release(host, OPS, "reset-gate-passed")
        wait_until("the first reset's result", lambda: result_of(host, first), timeout=300)
        # the same dispatcher goes on with the second reset, which stops at the same point in its turn
        wait_point(host, OPS, "reset-gate-passed")
        assert lock_holder(host)["operation"] == second
        release(host, OPS, "reset-gate-passed")
    finally:
        unhold(host, DISPATCH)
        unhold_step(host, "remove-links")
        release_step(host, "remove-links")
        release(host, OPS, "reset-gate-passed")
    one, two = (wait_until(f"result {i}", lambda i=i: result_of(host, i), timeout=300) for i in (first, second))
    assert one["succeeded"] and two["succeeded"]
    assert two["started_at"] >= one["finished_at"]  # one host operation at a time
    assert fx.items - fx.gone(snapshot(host)) == set()
    second_report = json.loads(wait_until("the second CLI's report", lambda: host.path(
        "/var/tmp/second-reset.json").exists() and host.read("/var/tmp/second-reset.json")))
    assert {i for s in second_report["steps"] for i in s.get("removed", [])} == set()
