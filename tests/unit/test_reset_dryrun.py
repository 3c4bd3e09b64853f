"""The dry run: every step's plan in order, changing nothing; routes through a link that is removed are listed
as going with it; a step whose inventory fails shows its error (the real step would fail closed)."""

import os

import pytest

from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import machines, netlinks, routing
from unbounded_agent.reset.dryrun import dry_run
from unbounded_agent.reset.reports import Recorded
from unbounded_agent.reset.step import context_from
from unbounded_agent.reset.steps import work_steps

DAEMON = "unbounded-agent-daemon.service"


class FakeUnits:
    def __init__(self, running=(), enabled=(), broken=False):
        self.running_units, self.enabled_units, self.broken, self.calls = set(running), set(enabled), broken, []

    def matching(self, patterns):
        if self.broken:
            raise RuntimeError("Connection refused")
        return []

    def running(self, name):
        return name in self.running_units

    def reporting(self, name):
        return name in self.running_units

    def enabled(self, name):
        return name in self.enabled_units

    def __getattr__(self, name):  # stop, disable, reload: a dry run must never get here
        def call(*a):
            self.calls.append((name, *a))
        return call


LINKS = [netlinks.Link(5, "wg51820", "wireguard"), netlinks.Link(6, "eth0", None), netlinks.Link(7, "cbr0", "bridge")]
ROUTES = [routing.Entry("rule", 2, 51820, "ipv4 pref 100 from all lookup 51820"),
          routing.Entry("route", 2, 51820, "ipv4 table 51820 10.1.0.0/24 dev wg51820", oif=5),
          routing.Entry("route", 2, 51820, "ipv4 table 51820 10.2.0.0/24 dev eth0", oif=6)]


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A bootstrapped-looking temporary root; machined, systemd and netlink are faked."""
    root = tmp_path / "root"
    for path in ("etc/wireguard/server.priv", "etc/systemd/nspawn/kube1.nspawn", "var/lib/machines/kube2/etc/hostname",
                 "var/lib/unbounded-agent/bin/unbounded-agent-blue"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    monkeypatch.setattr(machines, "inspect", lambda names=machines.AGENT_MACHINES: [
        machines.MachineState(m, m == "kube1", "active" if m == "kube1" else "inactive",
                              "enabled" if m == "kube1" else "disabled") for m in names])
    monkeypatch.setattr(netlinks, "list_links", lambda: list(LINKS))
    monkeypatch.setattr(routing, "inventory", lambda link_names=None, tables=None: [
        e for e in ROUTES if tables is None or e.table in tables])
    for name in ("remove", "_ipr"):  # a dry run deletes nothing: make sure nothing could
        monkeypatch.setattr(netlinks, name, None)
        monkeypatch.setattr(routing, name, None)
    units = FakeUnits(running={DAEMON}, enabled={DAEMON})
    ctx = context_from(Recorded(bin_dir="/var/lib/unbounded-agent/bin", state_dir="/var/lib/unbounded-agent"),
                       root=str(root), systemd=units)
    return ctx, root, units


def snapshot(root):
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)


def test_every_step_in_order_with_what_it_would_do_and_nothing_changes(host):
    ctx, root, units = host
    before = snapshot(root)
    plan = dry_run(ctx)
    assert [(s["number"], s["step"], s["phase"]) for s in plan] == [(s.number, s.name, s.phase) for s in work_steps()]
    assert [s["number"] for s in plan] == [1, 2, 3, 4, 5, 6, 7, 7, 8]  # step 7: remove-agent, then stop-daemon
    by = {s["step"]: s for s in plan}
    assert all(by[s.name]["title"] == s.title for s in work_steps())
    assert [(i["what"], i["action"]) for i in by["stop-machines"]["items"]] == [
        ("enabled unit systemd-nspawn@kube1.service", "disable"), ("machine kube1", "stop")]
    assert [(i["what"], i["note"]) for i in by["remove-links"]["items"]] == [
        ("link cbr0", "(bridge)"), ("link wg51820", "(wireguard)")]
    assert [i["what"] for i in by["remove-wireguard-keys"]["items"]] == ["file /etc/wireguard/server.priv"]
    assert [i["what"] for i in by["remove-nspawn-config"]["items"]] == ["file /etc/systemd/nspawn/kube1.nspawn"]
    assert [i["what"] for i in by["remove-machine-trees"]["items"]] == ["machine tree /var/lib/machines/kube2"]
    assert [(i["what"], i["action"]) for i in by["remove-agent"]["items"]] == [
        ("file /var/lib/unbounded-agent/bin/unbounded-agent-blue", "remove"), ("directory /var/lib/unbounded-agent", "remove")]
    assert [(i["what"], i["action"]) for i in by["stop-daemon"]["items"]] == [
        (f"running unit {DAEMON}", "stop"), (f"enabled unit {DAEMON}", "disable")]
    assert by["reload-systemd"]["items"] == []
    assert all("error" not in s for s in plan)
    assert snapshot(root) == before and units.calls == []


def test_dry_run_puts_routes_through_removed_links_under_goes_with(host):
    ctx, _, _ = host
    plan = {s["step"]: s for s in dry_run(ctx)}
    assert [i["what"] for i in plan["remove-routing"]["items"]] == [
        "rule ipv4 pref 100 from all lookup 51820", "route ipv4 table 51820 10.2.0.0/24 dev eth0"]
    assert plan["remove-routing"]["goes_with"] == [
        {"what": "route ipv4 table 51820 10.1.0.0/24 dev wg51820", "note": "", "goes_with": "link wg51820"}]


def test_a_step_whose_inventory_fails_shows_its_error_and_the_rest_still_plan(host, monkeypatch):
    ctx, _, _ = host

    def machined_down(names=machines.AGENT_MACHINES):
        raise OpsError(Reason.INVENTORY_FAILED, "cannot list machines through systemd-machined: timeout")

    monkeypatch.setattr(machines, "inspect", machined_down)
    ctx.systemd = FakeUnits(broken=True)
    plan = {s["step"]: s for s in dry_run(ctx)}
    assert plan["stop-machines"]["error"] == "InventoryFailed: cannot list machines through systemd-machined: timeout"
    assert (plan["stop-machines"]["reason"], plan["stop-machines"]["items"]) == ("InventoryFailed", [])
    # An error that is not an OpsError (systemd unreachable) is an inventory failure too, not a crash.
    assert plan["remove-agent"]["error"] == "cannot inventory: Connection refused"
    assert plan["remove-agent"]["reason"] == "InventoryFailed"
    assert [i["what"] for i in plan["remove-wireguard-keys"]["items"]] == ["file /etc/wireguard/server.priv"]
