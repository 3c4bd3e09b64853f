"""Policy rules and routes of the owned tables, on real netlink in a private network namespace."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from unbounded_agent.reset import routing

LIB = str(Path(__file__).resolve().parents[2] / "lib")

SETUP = """
ip link set lo up
ip link add wg51820 type bridge && ip link set wg51820 up
ip route add 10.1.0.0/24 dev wg51820 table 51820
ip route add blackhole 10.2.0.0/24 table 51899
ip -6 route add blackhole fd00::/64 table 51820
ip rule add from 10.9.0.0/16 lookup 51820 pref 100
ip rule add from 10.9.0.0/16 fwmark 3 lookup 51820 pref 100
ip -6 rule add lookup 51833 pref 101
ip rule add from 10.8.0.0/16 lookup 51900 pref 102
ip route add blackhole 10.3.0.0/24 table 51900
ip route add blackhole 10.4.0.0/24 table 51819
ip route add blackhole 10.5.0.0/24
"""
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from unbounded_agent.reset import routing
before = [e.describe() for e in routing.inventory()]
for e in routing.inventory():
    routing.remove(e)
print(json.dumps({"before": before, "after": [e.describe() for e in routing.inventory()]}))
"""


def test_table_range():
    assert routing.owned_table(51820) and routing.owned_table(51899)
    assert not routing.owned_table(51819) and not routing.owned_table(51900)
    assert not routing.owned_table(254) and not routing.owned_table(None)


@pytest.fixture
def netns_result():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private network namespace")
    # /usr/bin/python3: pyroute2 comes from Debian's packages.
    script = SETUP + f"exec /usr/bin/python3 -c '{PROBE}' {LIB}\n"
    r = subprocess.run(["unshare", "--net", "sh", "-ec", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    return out


def test_inventory_lists_rules_first_then_routes_of_both_families(netns_result):
    assert netns_result["before"] == [
        "rule ipv4 pref 100 from 10.9.0.0/16 lookup 51820",
        "rule ipv4 pref 100 from 10.9.0.0/16 fwmark 0x3 lookup 51820",
        "rule ipv6 pref 101 from all lookup 51833",
        "route ipv4 table 51820 10.1.0.0/24 dev wg51820",
        "route ipv4 table 51899 blackhole 10.2.0.0/24",
        "route ipv6 table 51820 blackhole fd00::/64 dev lo metric 1024",
    ]


def test_removal_leaves_nothing_owned(netns_result):
    assert netns_result["after"] == []


def test_unrelated_tables_and_rules_survive():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private network namespace")
    script = SETUP + f"/usr/bin/python3 -c '{PROBE}' {LIB} >/dev/null\n" + \
        "ip rule; echo; ip route show table all | grep -v '^local\\|^broadcast\\|^multicast\\|^fe80\\|^ff00'\n"
    r = subprocess.run(["unshare", "--net", "sh", "-ec", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "from 10.8.0.0/16 lookup 51900" in r.stdout
    assert "lookup main" in r.stdout and "lookup local" in r.stdout and "lookup default" in r.stdout
    for route in ("blackhole 10.3.0.0/24 table 51900", "blackhole 10.4.0.0/24 table 51819", "blackhole 10.5.0.0/24"):
        assert route in r.stdout
    assert "51820" not in r.stdout and "51899" not in r.stdout and "51833" not in r.stdout


def test_an_unreadable_inventory_is_an_error(monkeypatch):
    from unbounded_agent.reasons import OpsError, Reason

    def broken():
        raise OSError(97, "Address family not supported by protocol")

    monkeypatch.setattr(routing, "_ipr", broken)
    with pytest.raises(OpsError) as e:
        routing.inventory()
    assert e.value.reason is Reason.INVENTORY_FAILED


def test_a_failed_delete_is_fine_only_if_a_new_inventory_shows_it_gone(monkeypatch):
    from unbounded_agent.reasons import OpsError, Reason

    class Refusing:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def nlm_request(self, msg, msg_type, msg_flags):
            raise OSError(16, "Device or resource busy")

    class Msg(dict):
        fields = (("family", "B"),)

    msg = Msg(family=2, attrs=[["FRA_TABLE", 51820], ["FRA_PRIORITY", 100]])
    entry = routing.Entry("rule", 2, 51820, "ipv4 pref 100 from all lookup 51820", msg=msg)
    monkeypatch.setattr(routing, "_ipr", Refusing)

    monkeypatch.setattr(routing, "inventory", lambda link_names=None: [entry])
    with pytest.raises(OpsError) as e:
        routing.remove(entry)
    assert e.value.reason is Reason.EXECUTION_FAILED
    assert "cannot delete rule ipv4 pref 100 from all lookup 51820" in e.value.message and "busy" in e.value.message

    monkeypatch.setattr(routing, "inventory", lambda link_names=None: [])  # gone meanwhile (e.g. with its link)
    routing.remove(entry)


class _Msg(dict):
    """A dumped rule or route as pyroute2 gives it: header fields by key, attributes by get_attr."""

    def __init__(self, family, table, **attrs):
        super().__init__(family=family, table=table, src_len=0, dst_len=0, type=6)
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


class _UnspecFallbackKernel:
    """A kernel booted with ipv6.disable=1: no IPv6 handlers, so a dump for AF_INET6 falls back to the
    all-families dump and returns the IPv4 entries."""

    rules = [_Msg(2, 51820, FRA_TABLE=51820, FRA_PRIORITY=100)]
    routes = [_Msg(2, 51820, RTA_TABLE=51820, RTA_DST="10.244.9.0")]

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def get_links(self):
        return []

    def get_rules(self, family):
        return list(self.rules)

    def route(self, op, family):
        return list(self.routes)


def test_a_kernel_without_ipv6_has_an_empty_ipv6_inventory(monkeypatch, tmp_path):
    monkeypatch.setattr(routing, "_ipr", _UnspecFallbackKernel)
    (tmp_path / "net" / "ipv4").mkdir(parents=True)  # what ipv6.disable=1 leaves in /proc/sys/net: no ipv6
    monkeypatch.setattr(routing, "IPV6_PROC", str(tmp_path / "net" / "ipv6"))
    assert [e.describe() for e in routing.inventory()] == [
        "rule ipv4 pref 100 from all lookup 51820", "route ipv4 table 51820 blackhole 10.244.9.0/0"]


def test_a_kernel_whose_sysctls_cannot_be_seen_is_not_taken_for_one_without_ipv6(monkeypatch, tmp_path):
    from unbounded_agent.reasons import OpsError, Reason

    monkeypatch.setattr(routing, "_ipr", _UnspecFallbackKernel)
    monkeypatch.setattr(routing, "IPV6_PROC", str(tmp_path / "no-proc" / "ipv6"))
    with pytest.raises(OpsError) as e:
        routing.inventory()
    assert e.value.reason is Reason.INVENTORY_FAILED


def test_entries_of_another_family_in_a_dump_are_never_taken_for_ipv6(monkeypatch):
    monkeypatch.setattr(routing, "_ipr", _UnspecFallbackKernel)
    monkeypatch.setattr(routing, "IPV6_PROC", "/")  # IPv6 "there", yet the kernel answers with IPv4 entries
    assert [e.family for e in routing.inventory()] == [2, 2]


def test_ipv6_disabled_by_sysctl_is_an_empty_ipv6_inventory_not_an_error():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private network namespace")
    script = ("ip link set lo up\nip rule add from 10.9.0.0/16 lookup 51820 pref 100\n"
              "ip route add blackhole 10.2.0.0/24 table 51820\n"
              "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1\n"
              f"exec /usr/bin/python3 -c '{PROBE}' {LIB}\n")
    r = subprocess.run(["unshare", "--net", "sh", "-ec", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["before"] == ["rule ipv4 pref 100 from 10.9.0.0/16 lookup 51820",
                             "route ipv4 table 51820 blackhole 10.2.0.0/24"]
    assert out["after"] == []


def test_only_the_given_tables_are_listed(monkeypatch):
    monkeypatch.setattr(routing, "_ipr", _UnspecFallbackKernel)
    assert routing.inventory(tables={51833}) == []
    assert len(routing.inventory(tables={51820})) == 2
