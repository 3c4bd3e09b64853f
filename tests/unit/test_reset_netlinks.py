"""Which links are the agent's (exact names only), and fail-closed inventory."""

import pytest

from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import netlinks


@pytest.mark.parametrize("name", ["wg51820", "wg51833", "wg51899", "geneve0", "vxlan0", "ipip0", "unbounded0", "cbr0"])
def test_agent_links(name):
    assert netlinks.is_agent_link(name)


@pytest.mark.parametrize("name", ["wg0", "wgx", "wg51819", "wg51900", "wg051820", "wg51820x", "eth-keep", "vxlan1",
                                  "cbr01", "xcbr0", "wg", "lo"])
def test_not_agent_links(name):
    assert not netlinks.is_agent_link(name)


def test_all_wg_takes_every_numbered_wg_but_not_lookalikes():
    assert netlinks.is_agent_link("wg0", all_wg=True) and netlinks.is_agent_link("wg7", all_wg=True)
    for name in ("wgx", "wg-office", "wg0foo", "wg01"):
        assert not netlinks.is_agent_link(name, all_wg=True)


class _Msg(dict):
    def __init__(self, index, name, kind=None):
        super().__init__(index=index)
        self.attrs = {"IFLA_IFNAME": name, "IFLA_LINKINFO": _Info(kind) if kind else None}

    def get_attr(self, key):
        return self.attrs.get(key)


class _Info:
    def __init__(self, kind):
        self.kind = kind

    def get_attr(self, key):
        return self.kind


class _FakeIPR:
    def __init__(self, links=None, fail=None, deleted=None):
        self.links, self.fail, self.deleted = links or [], fail, deleted if deleted is not None else []

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def get_links(self):
        if self.fail:
            raise self.fail
        return self.links

    def link(self, op, index):
        self.deleted.append(index)
        self.links = [m for m in self.links if m["index"] != index]


def test_agent_links_filters_the_inventory(monkeypatch):
    ipr = _FakeIPR([_Msg(1, "lo"), _Msg(2, "wg51820", "wireguard"), _Msg(3, "wg0", "wireguard"), _Msg(4, "cbr0", "bridge")])
    monkeypatch.setattr(netlinks, "_ipr", lambda: ipr)
    assert [l.name for l in netlinks.agent_links()] == ["cbr0", "wg51820"]
    assert [l.name for l in netlinks.agent_links(all_wg=True)] == ["cbr0", "wg0", "wg51820"]


def test_an_unreadable_inventory_is_an_error_not_an_empty_list(monkeypatch):
    monkeypatch.setattr(netlinks, "_ipr", lambda: _FakeIPR(fail=OSError(97, "Address family not supported by protocol")))
    with pytest.raises(OpsError) as e:
        netlinks.agent_links()
    assert e.value.reason is Reason.INVENTORY_FAILED
    assert "Address family not supported" in e.value.message


def test_a_failed_delete_is_fine_only_if_the_link_is_gone(monkeypatch):
    class Refusing(_FakeIPR):
        def link(self, op, index):
            raise OSError(16, "Device or resource busy")

    still_there = Refusing([_Msg(2, "wg51820")])
    monkeypatch.setattr(netlinks, "_ipr", lambda: still_there)
    with pytest.raises(OpsError) as e:
        netlinks.remove(netlinks.Link(2, "wg51820", None))
    assert e.value.reason is Reason.EXECUTION_FAILED and "wg51820" in e.value.message

    gone = Refusing([])  # e.g. a veth whose peer's deletion took it along
    monkeypatch.setattr(netlinks, "_ipr", lambda: gone)
    netlinks.remove(netlinks.Link(2, "wg51820", None))


def test_rtnetlink_loads_iproute_without_pyroute2s_package_code_and_leaves_a_whole_import_possible():
    """In a fresh interpreter, as a step starts: the class and constants come without pyroute2/__init__.py (which
    imports every module pyroute2 registers, NDB among them); afterwards `import pyroute2` still runs it whole and
    hands out the same class."""
    import subprocess
    import sys
    from pathlib import Path

    lib = Path(__file__).resolve().parents[2] / "lib"
    script = (
        "import sys\n"
        "from unbounded_agent.reset import netlinks\n"
        "IPRoute, netlink, rtnl = netlinks.rtnetlink()\n"
        "lean = ('pyroute2' in sys.modules, 'pyroute2.ndb.main' in sys.modules)\n"
        "with IPRoute() as ipr:\n"
        "    names = [m.get_attr('IFLA_IFNAME') for m in ipr.get_links()]\n"
        "import pyroute2\n"
        "print(lean, 'lo' in names, rtnl.RTM_DELRULE, netlink.NLM_F_ACK, pyroute2.IPRoute is IPRoute,\n"
        "      'pyroute2.ndb.main' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["(False,", "False)", "True", "33", "4", "True", "True"], out.stdout + out.stderr
