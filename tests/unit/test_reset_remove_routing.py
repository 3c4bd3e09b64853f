"""Step 6: every rule and route of the owned tables found by the inventory is deleted (rules first), each
verified by a fresh inventory; a failure is reported per entry. routing.inventory/remove are faked here
(test_reset_routing.py runs them on real netlink)."""

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import routing
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

    def inventory(self, link_names=None):
        if self.broken:
            raise OpsError(Reason.INVENTORY_FAILED, "cannot list policy rules and routes over netlink: EPERM")
        return list(self.entries)

    def remove(self, entry):
        if entry.describe() in self.stuck:
            raise OpsError(Reason.EXECUTION_FAILED, f"cannot delete {entry.describe()}: Operation not permitted")
        self.deleted.append(entry.describe())
        if entry.describe() not in self.comes_back:
            self.entries.remove(entry)


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    write_checkpoint(Checkpoint(run_id=RUN), tmp_path / "reset")

    def run(tables):
        monkeypatch.setattr(routing, "inventory", tables.inventory)
        monkeypatch.setattr(routing, "remove", tables.remove)
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
