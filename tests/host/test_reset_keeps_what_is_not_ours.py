"""A reset removes the agent's things and keeps the operator's, where the two share names or numbers:

- binDir /usr/local/bin: the agent's slots and links there go; an operator's own /usr/local/bin/unbounded-agent
  (a regular file the agent never replaced) stays; the agent's own link of that name goes;
- an operator's wg-quick tunnel wg0 owns routing table 51820 (wg-quick numbers from 51820 upward): its link,
  its rule and its routes stay, while the agent's table 51833 (of its link wg51833) is flushed; the report
  says which table was left alone. `--all-wg` takes every wg<N> link and the whole range, as documented.
"""

import pytest
from bootstrapped_host import run_reset, step

pytestmark = pytest.mark.testhost

SEED = "/usr/libexec/unbounded-agent/unbounded-agent-seed-slots"
CONFIG = "/etc/unbounded/agent/config.yaml"
OPERATORS = "#!/bin/sh\n# the operator's own wrapper, not the agent\nexec /opt/vendor/agent \"$@\"\n"


def reset(host, *args) -> dict:
    code, report, stderr = run_reset(host, *args, toolset=True)
    assert (code, report["result"]) == (0, "succeeded"), stderr
    return report


def bin_dir_host(host, operators_file: bool) -> None:
    host.run(["rm", "-rf", "/usr/local/bin/unbounded-agent"])
    if operators_file:
        host.write("/usr/local/bin/unbounded-agent", OPERATORS, mode=0o755)
    host.write(CONFIG, "binDir: /usr/local/bin\n")
    host.run([SEED])  # what the package's install does for this binDir
    assert host.path("/usr/local/bin/unbounded-agent-current").is_symlink()


def test_an_operators_own_unbounded_agent_in_bin_dir_survives(agent_host):
    host = agent_host
    bin_dir_host(host, operators_file=True)
    report = reset(host)
    removed = step(report, "remove-agent")["removed"]
    assert "file /usr/local/bin/unbounded-agent-blue" in removed and "link /usr/local/bin/unbounded-agent-current" in removed
    assert not any(r.endswith("/usr/local/bin/unbounded-agent") for r in removed)
    assert host.read("/usr/local/bin/unbounded-agent") == OPERATORS
    assert sorted(p.name for p in host.path("/usr/local/bin").iterdir()) == ["unbounded-agent"]
    host.run(["rm", "/usr/local/bin/unbounded-agent"])


def test_the_agents_own_link_in_bin_dir_goes(agent_host):
    host = agent_host
    bin_dir_host(host, operators_file=False)
    assert host.run(["readlink", "/usr/local/bin/unbounded-agent"]).stdout.strip() == "unbounded-agent-current"
    report = reset(host)
    assert "link /usr/local/bin/unbounded-agent" in step(report, "remove-agent")["removed"]
    assert list(host.path("/usr/local/bin").iterdir()) == []


WG_QUICK = [  # what `wg-quick up wg0` does for AllowedIPs = 0.0.0.0/0 (Table = auto): table and fwmark 51820
    "ip link add wg0 type bridge", "ip link set wg0 up",
    "ip -4 route add 0.0.0.0/0 dev wg0 table 51820",
    "ip -4 rule add not fwmark 51820 table 51820 pref 32764",
    "ip -4 rule add table main suppress_prefixlength 0 pref 32763",
]
AGENT = ["ip link add wg51833 type bridge", "ip link set wg51833 up",
         "ip -4 rule add fwmark 0x33 lookup 51833 pref 101", "ip -4 route add blackhole 10.244.9.0/24 table 51833"]


def routing_of(host) -> tuple[str, str]:
    return host.run(["ip", "-4", "rule"]).stdout, host.run(["ip", "-4", "route", "show", "table", "all"]).stdout


@pytest.fixture
def wg_quick(agent_host):
    host = agent_host
    host.sh(" && ".join(WG_QUICK + AGENT))
    yield host
    host.sh("ip link del wg0 2>/dev/null; ip -4 rule del pref 32764 2>/dev/null; ip -4 rule del pref 32763 2>/dev/null; "
            "ip link del wg51833 2>/dev/null; true")


def test_an_operators_wg_quick_table_survives_and_the_agents_goes(wg_quick):
    host = wg_quick
    report = reset(host)
    rules, routes = routing_of(host)
    assert "not from all fwmark 0xca6c lookup 51820" in rules and "suppress_prefixlength 0" in rules
    assert "default dev wg0 table 51820" in routes
    assert host.run(["ip", "link", "show", "wg0"], check=False).returncode == 0
    assert "51833" not in rules and "51833" not in routes
    routing = step(report, "remove-routing")
    assert routing["removed"] == ["rule ipv4 pref 101 from all fwmark 0x33 lookup 51833",
                                  "route ipv4 table 51833 blackhole 10.244.9.0/24"]
    assert any(n.startswith("left table 51820 alone: the agent has no link wg51820") for n in routing["notes"])


def test_all_wg_takes_every_wg_link_and_the_whole_range(wg_quick):
    host = wg_quick
    report = reset(host, "--all-wg")
    rules, routes = routing_of(host)
    assert "lookup 51820" not in rules and "table 51820" not in routes
    assert "link wg0" in step(report, "remove-links")["removed"]
    assert "suppress_prefixlength 0" in rules  # a rule of table main: never the reset's
