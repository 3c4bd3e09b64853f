"""Step 6: every rule and route of the agent's tables found by the inventory is deleted (rules first), each
verified by a fresh inventory; a failure is reported per entry. The agent's tables are those of its wg<N>
links (there now, or recorded by remove-links): an operator's wg-quick table is left alone.
routing.inventory/remove and the link list are faked here (test_reset_routing.py runs them on real netlink)."""

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import netlinks, routing
from unbounded_agent.reset.reports import Checkpoint, write_checkpoint
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.steps import remove_routing

RUN = "req-0001"
RULE = routing.Entry("rule", 2, 51820, "ipv4 pref 100 from 10.9.0.0/16 lookup 51820")
ROUTE4 = routing.Entry("route", 2, 51820, "ipv4 table 51820 10.1.0.0/24 dev wg51820", oif=3)
ROUTE6 = routing.Entry("route", 10, 51899, "ipv6 table 51899 blackhole fd00::/64")


class FakeTables:
    def __init__(self, entries, stuck=(), comes_back=(), broken=False):
        self.entries, self.stuck, self.comes_back, self.broken = list(entries), set(stuck), set(comes_back), broken
        self.deleted = []

    def inventory(self, link_names=None, tables=None):
        if self.broken:
            raise OpsError(Reason.INVENTORY_FAILED, "cannot list policy rules and routes over netlink: EPERM")
        return [e for e in self.entries if tables is None or e.table in tables]

    def remove(self, entry):
        if entry.describe() in self.stuck:
            raise OpsError(Reason.EXECUTION_FAILED, f"cannot delete {entry.describe()}: Operation not permitted")
        self.deleted.append(entry.describe())
        if entry.describe() not in self.comes_back:
            self.entries.remove(entry)


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(tables, links=..., recorded=..., all_wg=False): the step, with these links on the host and these
    tables recorded in the checkpoint (by remove-links, which deleted their links)."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))

    def run(tables, links=("wg51820", "wg51899"), recorded=(), all_wg=False):
        write_checkpoint(Checkpoint(run_id=RUN, tables=list(recorded), all_wg=all_wg), tmp_path / "reset")
        monkeypatch.setattr(routing, "inventory", tables.inventory)
        monkeypatch.setattr(routing, "remove", tables.remove)
        monkeypatch.setattr(netlinks, "list_links", lambda: [netlinks.Link(i, n, None) for i, n in enumerate(links)])
        return run_step(remove_routing.STEP, directory=tmp_path / "reset")

    with HostLock(RUN, "reset").acquire():
        yield run


def test_every_owned_rule_and_route_goes_in_inventory_order(run):
    tables = FakeTables([RULE, ROUTE4, ROUTE6])
    report = run(tables)
    assert report.result == "succeeded", report
    assert report.removed == tables.deleted == [RULE.describe(), ROUTE4.describe(), ROUTE6.describe()]
    assert tables.entries == []


def test_nothing_owned_is_nothing_to_do(run):
    report = run(FakeTables([]))
    assert (report.result, report.removed, report.failed) == ("succeeded", [], [])


def test_an_entry_that_cannot_be_deleted_is_reported_and_the_rest_still_goes(run):
    tables = FakeTables([RULE, ROUTE4, ROUTE6], stuck={RULE.describe()})
    report = run(tables)
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert report.failed[0].item == RULE.describe()
    assert tables.entries == [RULE]


def test_an_entry_still_there_afterwards_fails_the_step(run):
    report = run(FakeTables([RULE, ROUTE6], comes_back={ROUTE6.describe()}))
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert report.failed[0].error == f"still present after removal: {ROUTE6.describe()}"


def test_an_unreadable_inventory_fails_the_step_closed(run):
    report = run(FakeTables([RULE], broken=True))
    assert (report.result, report.reason, report.removed) == ("failed", "InventoryFailed", [])


# wg-quick's full tunnel: `ip rule add not fwmark 51820 table 51820` and its default route in table 51820
WG_QUICK_RULE = routing.Entry("rule", 2, 51820, "ipv4 pref 32765 not from all fwmark 0xca6c lookup 51820")
WG_QUICK_ROUTE = routing.Entry("route", 2, 51820, "ipv4 table 51820 default dev wg0", oif=9)
AGENT_RULE = routing.Entry("rule", 2, 51833, "ipv4 pref 101 from all fwmark 0x33 lookup 51833")
AGENT_ROUTE = routing.Entry("route", 2, 51833, "ipv4 table 51833 blackhole 10.244.9.0/24")


def test_an_operators_wg_quick_table_is_left_alone(run):
    tables = FakeTables([WG_QUICK_RULE, AGENT_RULE, WG_QUICK_ROUTE, AGENT_ROUTE])
    # the operator's wg0 is up; the agent's wg51833 went in step 2, which recorded its table
    report = run(tables, links=("lo", "wg0"), recorded=[51833])
    assert report.succeeded, report
    assert report.removed == [AGENT_RULE.describe(), AGENT_ROUTE.describe()]
    assert tables.entries == [WG_QUICK_RULE, WG_QUICK_ROUTE]
    assert any(n.startswith("left table 51820 alone: the agent has no link wg51820") for n in report.notes)


def test_a_table_is_the_agents_while_its_link_is_there(run):
    tables = FakeTables([WG_QUICK_RULE, AGENT_RULE])
    report = run(tables, links=("wg51820",), recorded=[])
    assert report.removed == [WG_QUICK_RULE.describe()]  # wg51820 is the agent's name: so is table 51820
    assert tables.entries == [AGENT_RULE]


def test_all_wg_takes_the_whole_range(run):
    tables = FakeTables([WG_QUICK_RULE, AGENT_RULE, WG_QUICK_ROUTE])
    report = run(tables, links=("wg0",), recorded=[], all_wg=True)
    assert report.succeeded and tables.entries == []
