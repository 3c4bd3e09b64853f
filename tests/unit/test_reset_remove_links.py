"""Step 2: the agent's links go (an operator's wg0 only when the run asked for --all-wg); a link that will not
go fails the step; an unreadable inventory fails it closed. Netlink is faked at netlinks._ipr."""

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reset import netlinks
from unbounded_agent.reset.reports import Checkpoint, write_checkpoint
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.steps import remove_links

RUN = "req-0001"


class Msg(dict):
    def __init__(self, index, name, kind=None):
        super().__init__(index=index)
        self.name, self.kind = name, kind

    def get_attr(self, key):
        if key == "IFLA_IFNAME":
            return self.name
        return Info(self.kind) if key == "IFLA_LINKINFO" and self.kind else None


class Info:
    def __init__(self, kind):
        self.kind = kind

    def get_attr(self, key):
        return self.kind


class FakeNetlink:
    """One network namespace's links; deleting a name in `stuck` fails and leaves it there."""

    def __init__(self, links, stuck=(), broken=False):
        self.links, self.stuck, self.broken = list(links), set(stuck), broken

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def get_links(self):
        if self.broken:
            raise OSError(97, "Address family not supported by protocol")
        return list(self.links)

    def link(self, op, index):
        assert op == "del"
        if any(m["index"] == index and m.name in self.stuck for m in self.links):
            raise OSError(16, "Device or resource busy")
        self.links = [m for m in self.links if m["index"] != index]

    def names(self):
        return sorted(m.name for m in self.links)


LINKS = [Msg(1, "lo"), Msg(2, "eth0"), Msg(3, "wg51820", "wireguard"), Msg(4, "wg0", "wireguard"),
         Msg(5, "cbr0", "bridge"), Msg(6, "vxlan0", "vxlan"), Msg(7, "wg-office", "wireguard")]


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(netlink, all_wg=False): the step, in a run whose checkpoint carries all_wg."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))

    def run(net, all_wg=False):
        monkeypatch.setattr(netlinks, "_ipr", net)
        write_checkpoint(Checkpoint(run_id=RUN, all_wg=all_wg), tmp_path / "reset")
        return run_step(remove_links.STEP, directory=tmp_path / "reset")

    run.dir = tmp_path / "reset"

    with HostLock(RUN, "reset").acquire():
        yield run


def test_the_agents_links_go_and_the_others_stay(run):
    net = FakeNetlink(LINKS)
    report = run(net)
    assert report.result == "succeeded", report
    assert report.removed == ["link cbr0", "link vxlan0", "link wg51820"]
    assert report.absent == ["link geneve0", "link ipip0", "link unbounded0"]
    assert net.names() == ["eth0", "lo", "wg-office", "wg0"]


def test_all_wg_of_the_run_takes_every_numbered_wg_link(run):
    net = FakeNetlink(LINKS)
    assert run(net, all_wg=True).succeeded
    assert net.names() == ["eth0", "lo", "wg-office"]


def test_a_link_that_will_not_go_fails_the_step_and_the_others_still_go(run):
    net = FakeNetlink(LINKS, stuck={"cbr0"})
    report = run(net)
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert report.failed[0].item == "link cbr0" and "Device or resource busy" in report.failed[0].error
    assert report.removed == ["link vxlan0", "link wg51820"]
    assert net.names() == ["cbr0", "eth0", "lo", "wg-office", "wg0"]


def test_an_unreadable_inventory_fails_the_step_closed(run):
    report = run(FakeNetlink(LINKS, broken=True))
    assert (report.result, report.reason) == ("failed", "InventoryFailed")
    assert (report.removed, report.absent) == ([], [])  # nothing taken for "already absent"


def test_the_plan_names_each_link_and_its_kind(monkeypatch):
    from unbounded_agent.reset.step import Context

    net = FakeNetlink(LINKS)
    monkeypatch.setattr(netlinks, "_ipr", net)
    plan = remove_links.STEP.plan(Context(machine_name="m", bin_dirs=(), state_dirs=()))
    assert [str(i) for i in plan] == ["link cbr0 (bridge)", "link vxlan0 (vxlan)", "link wg51820 (wireguard)"]
    assert net.names() == ["cbr0", "eth0", "lo", "vxlan0", "wg-office", "wg0", "wg51820"]


def test_the_tables_of_the_agents_wg_links_are_recorded_before_the_links_go(run):
    from unbounded_agent.reset.reports import read_checkpoint

    seen = []
    net = FakeNetlink(LINKS + [Msg(8, "wg51833", "wireguard")])
    real_link = net.link

    def link(op, index):  # what the checkpoint says at the moment each link is deleted
        seen.append(read_checkpoint(run.dir).tables)
        real_link(op, index)
    net.link = link
    report = run(net)
    assert report.succeeded
    assert seen and all(tables == [51820, 51833] for tables in seen)
    assert read_checkpoint(run.dir).tables == [51820, 51833]
    # wg0 is not the agent's: its table (wg-quick's 51820 upward, if it has one) is not recorded by its name
    assert "the agent's routing tables (of its wg links): 51820, 51833" in report.notes
