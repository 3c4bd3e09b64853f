"""When a step cannot see what exists, or cannot remove something safely, it fails closed: it
changes nothing it cannot vouch for, says why, and the independent steps still run. The agent is
left installed and running (phase 2 does not start), and a run after the cause is fixed completes.
A reset phase started by hand, with no reset queued, changes nothing at all."""

import json

import pytest
from bootstrapped_host import (
    BIND_TARGET,
    RESET_DIR,
    bootstrap,
    checkpoint_exists,
    drop_in,
    remove_drop_in,
    run_reset,
    snapshot,
    step,
)

pytestmark = pytest.mark.testhost

PHASE1_OTHERS = ["remove-wireguard-keys", "remove-nspawn-config", "remove-routing"]


def results(report):
    return {s["step"]: (s["result"], s.get("reason")) for s in report["steps"]}


def assert_agent_kept_and_resumable(host, report):
    assert report["phase2_ran"] is False
    assert step(report, "remove-agent")["result"] == "not-run"
    assert host.run(["systemctl", "is-active", "unbounded-agent-daemon.service"]).stdout.strip() == "active"
    assert checkpoint_exists(host)


def assert_converges(host, fx):
    code, report, _ = run_reset(host)
    snap = snapshot(host)
    assert (code, report["result"]) == (0, "succeeded")
    assert fx.items - fx.gone(snap) == set() and fx.decoys - fx.kept(snap) == set()
    assert not checkpoint_exists(host)


def test_a_netlink_inventory_failure_fails_remove_links_closed(fresh_agent_host):
    host = fresh_agent_host
    fx = bootstrap(host)
    # A real netlink failure: the step's unit may not open AF_NETLINK sockets at all (the empty assignment drops
    # the families the unit file allows).
    drop_in(host, "unbounded-agent-reset-remove-links.service",
            "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX\n")
    code, report, _ = run_reset(host)
    snap = snapshot(host)

    links = step(report, "remove-links")
    assert (links["result"], links["reason"]) == ("failed", "InventoryFailed")
    assert "cannot list network links over netlink" in links["failed"][0]["error"]
    assert links["removed"] == []
    assert all(snap[f"link {n}"] for n in ("wg51820", "wg51833", "geneve0", "vxlan0", "ipip0", "unbounded0", "cbr0"))
    # Independent steps ran and succeeded.
    assert all(results(report)[name] == ("succeeded", "Succeeded") for name in ["stop-machines", *PHASE1_OTHERS])
    assert not snap["path /etc/wireguard/server.priv"] and not snap["rule ipv4 pref 100 lookup 51820"]
    assert code == 21 and report["reason"] == "InventoryFailed"
    assert_agent_kept_and_resumable(host, report)

    remove_drop_in(host, "unbounded-agent-reset-remove-links.service")
    assert_converges(host, fx)


def test_machined_unreachable_fails_the_machine_steps_closed(fresh_agent_host):
    host = fresh_agent_host
    fx = bootstrap(host)
    host.run(["systemctl", "mask", "--runtime", "--now", "systemd-machined.service"])
    code, report, _ = run_reset(host)
    snap = snapshot(host)
    host.run(["systemctl", "unmask", "--runtime", "systemd-machined.service"])
    host.run(["systemctl", "start", "systemd-machined.service"])

    r = results(report)
    assert r["stop-machines"] == ("failed", "InventoryFailed")
    assert "systemd-machined" in step(report, "stop-machines")["failed"][-1]["error"]
    assert r["remove-machine-trees"] == ("failed", "InventoryFailed")
    assert snap["path /var/lib/machines/kube1"] and snap["path /var/lib/machines/kube2"]
    assert snap["precious data intact"]
    assert all(r[name] == ("succeeded", "Succeeded") for name in ["remove-links", *PHASE1_OTHERS])
    assert code != 0
    assert_agent_kept_and_resumable(host, report)

    assert_converges(host, fx)


def test_a_busy_mount_inside_a_machine_tree_is_refused_not_deleted_through(fresh_agent_host):
    host = fresh_agent_host
    fx = bootstrap(host)
    # A process working inside the bind mount keeps it busy: it cannot be unmounted.
    host.run(["systemd-run", "--unit=busy-in-kube2", f"--working-directory={BIND_TARGET}", "sleep", "infinity"])
    code, report, _ = run_reset(host)
    snap = snapshot(host)

    trees = step(report, "remove-machine-trees")
    assert (trees["result"], trees["reason"]) == ("failed", "UnsafeRemoval")
    assert f"cannot unmount {BIND_TARGET}" in trees["failed"][0]["error"]
    assert "machine tree /var/lib/machines/kube1" in trees["removed"]
    assert snap["path /var/lib/machines/kube2"] and snap["mount " + BIND_TARGET]
    assert snap["precious data intact"]
    assert host.run(["cat", f"{BIND_TARGET}/data.txt"]).stdout  # still reachable through the mount
    assert code == 22
    assert_agent_kept_and_resumable(host, report)

    host.run(["systemctl", "stop", "busy-in-kube2.service"])
    assert_converges(host, fx)


def test_a_reset_phase_started_by_hand_changes_nothing(fresh_agent_host):
    host = fresh_agent_host
    fx = bootstrap(host)
    before = snapshot(host)
    # phase 2 first: it is the one that would remove the agent
    for target in ("unbounded-agent-reset-phase2.target", "unbounded-agent-reset-phase1.target"):
        host.run(["systemctl", "start", target], check=False)
        assert snapshot(host) == before, target
    # the begin step refused (no reset holds the host), and no step ran without it
    begin = json.loads(host.read(f"{RESET_DIR}/reports/00-begin.json"))
    assert (begin["result"], begin["reason"], begin["run_id"]) == ("failed", "HostLocked", None)
    assert "no reset is running on this host" in begin["failed"][0]["error"]
    assert sorted(p.name for p in host.path(f"{RESET_DIR}/reports").iterdir()) == ["00-begin.json"]
    assert not checkpoint_exists(host)
    assert host.run(["systemctl", "is-active", "unbounded-agent-daemon.service"]).stdout.strip() == "active"
    # the whole reset is not a target one can start: it runs only through the queue
    gone = host.run(["systemctl", "start", "unbounded-agent-reset.target"], check=False)
    assert gone.returncode != 0 and "not found" in gone.stderr
    assert_converges(host, fx)
