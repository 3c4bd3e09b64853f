"""`unbounded-agent reset --dry-run` lists exactly what the real run then removes, and removes nothing."""

import pytest
from bootstrapped_host import bootstrap, checkpoint_exists, removed_items, run_reset, snapshot

pytestmark = pytest.mark.testhost


@pytest.fixture(scope="module")
def runs(agent_host):
    fx = bootstrap(agent_host)
    before = snapshot(agent_host)
    code, plan, _ = run_reset(agent_host, "--dry-run")
    after_dry_run = snapshot(agent_host)
    real_code, real, _ = run_reset(agent_host)
    return fx, before, code, plan, after_dry_run, real_code, real, snapshot(agent_host)


def planned(plan: dict) -> set[str]:
    return {i["what"] for s in plan["steps"] for i in s["items"]}


def test_the_dry_run_changes_nothing(runs, agent_host):
    fx, before, code, plan, after_dry_run, *_ = runs
    assert code == 0 and plan["dry_run"] is True
    assert after_dry_run == before
    assert fx.items - fx.gone(after_dry_run) == fx.items  # all still there
    assert not checkpoint_exists(agent_host)


def test_the_dry_run_lists_exactly_what_the_real_run_removes(runs):
    _, _, _, plan, _, real_code, real, _ = runs
    assert real_code == 0
    assert planned(plan) == removed_items(real)


def test_routes_that_go_with_a_removed_link_are_listed_and_do_go(runs):
    fx, _, _, plan, _, _, real, after = runs
    routing = next(s for s in plan["steps"] if s["step"] == "remove-routing")
    assert [(i["what"], i["goes_with"]) for i in routing["goes_with"]] == [
        ("route ipv4 table 51820 10.244.1.0/24 dev wg51820", "link wg51820")]
    assert not after["route ipv4 table 51820 10.244.1.0/24"]


def test_the_dry_run_plan_covers_every_fixture_item(runs):
    _, _, _, plan, *_ = runs
    items = planned(plan)
    for expected in ("machine kube1", "machine kube2", "link wg51833", "file /etc/wireguard/server.priv",
                     "mount /var/lib/machines/kube2/data", "machine tree /var/lib/machines/kube2",
                     "rule ipv6 pref 100 from fd00:244::/48 lookup 51820", "directory /etc/unbounded/agent",
                     "link /var/lib/unbounded-agent/bin/unbounded-agent-current"):
        assert expected in items
    assert not any("kube10" in i or "wg0" in i.split() or "51900" in i or "51819" in i for i in items)
