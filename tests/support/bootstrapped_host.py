"""A test host that looks like `unbounded-agent start` left it, plus decoys a reset must not touch.

    fx = bootstrap(host)           # after host.install_deb(...)
    snap = snapshot(host)          # what exists now, as {"link wg51820": True, ...}
    assert fx.gone(snap) == fx.items and fx.kept(snap) == fx.decoys

What `start` would leave (fx.items, all of which the reset must remove):
- running machines kube1 and kube2 (systemd-nspawn@.service, enabled), their .nspawn files, unit
  overrides and root trees; kube2's tree has a bind mount inside (data that is not the reset's);
- links wg51820, wg51833, wg51899, geneve0, vxlan0, ipip0, unbounded0, cbr0 (this kernel has no wireguard,
  geneve or ipip link types: bridges and vxlans carry the names); the agent's routing tables are those of
  its wg links;
- /etc/wireguard/server.priv and server.pub;
- policy rules and routes in the agent's tables (51820, 51833, 51899; IPv4 and IPv6);
- the agent: slots and links (seeded by the .deb), its config, a daemon override.

A reset runs through the operation queue (units/README.md): `unbounded-agent reset` queues it and shows
the reports its steps write to RESET_DIR; the dispatcher runs it and writes its result (result_of).

Decoys (fx.decoys, all of which must survive): machine kube10 (running, with its .nspawn and tree),
links wg0, wgx and eth-keep, a rule and a route in table 51900 and a route in table 51819 (just outside the
range), a file next to the keys, the data behind the bind mount.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from testhost import TestHost, make_nested_machine

AGENT_MACHINES = ("kube1", "kube2")
BIND_SOURCE = "/srv/precious"  # the data mounted into kube2's tree
BIND_TARGET = "/var/lib/machines/kube2/data"
PRECIOUS = "the only copy of something that is not the reset's to delete\n"

# A payload that ignores the graceful stop: with KillSignal=SIGTERM nspawn forwards SIGTERM to the
# machine's PID 1 (Boot=no: the payload itself), and a PID-namespace init without a SIGTERM handler
# never receives it from outside — exactly "a machine that ignores poweroff". (With the default
# KillSignal, a Boot=no machine gets SIGKILL at once and cannot ignore anything.)
STUBBORN_NSPAWN = """\
[Exec]
Boot=no
Parameters=/usr/bin/sleep infinity
KillSignal=SIGTERM

[Files]
BindReadOnly=/usr

[Network]
VirtualEthernet=no
Private=no
"""

# Links: name -> `ip link add` arguments after the name.
AGENT_LINKS = {
    "wg51820": ["type", "bridge"],
    "wg51833": ["type", "bridge"],
    "wg51899": ["type", "bridge"],
    "geneve0": ["type", "vxlan", "id", "100", "dstport", "6081"],
    "vxlan0": ["type", "vxlan", "id", "101", "dstport", "4789"],
    "ipip0": ["type", "vxlan", "id", "102", "dstport", "4790"],
    "unbounded0": ["type", "bridge"],
    "cbr0": ["type", "bridge"],
}
DECOY_LINKS = {
    "wg0": ["type", "bridge"],
    "wgx": ["type", "bridge"],
    "eth-keep": ["type", "veth", "peer", "name", "eth-keep-peer"],
}

# (family, table, pref, selector...) for rules; (family, table, route spec) for routes.
AGENT_RULES = [
    ("4", 51820, 100, ["from", "10.244.0.0/16"]),
    ("4", 51833, 101, ["fwmark", "0x33"]),
    ("4", 51833, 102, ["from", "10.245.0.0/16", "fwmark", "0x34"]),
    ("6", 51820, 100, ["from", "fd00:244::/48"]),
]
AGENT_ROUTES = [
    ("4", 51820, ["10.244.1.0/24", "dev", "wg51820"]),  # goes away with its link (step 2)
    ("4", 51833, ["blackhole", "10.244.9.0/24"]),
    ("4", 51899, ["unreachable", "10.246.0.0/16"]),
    ("6", 51820, ["blackhole", "fd00:244:1::/64"]),
]
DECOY_RULES = [("4", 51900, 200, ["from", "192.168.77.0/24"])]
DECOY_ROUTES = [
    ("4", 51900, ["blackhole", "192.168.77.0/24"]),
    ("4", 51819, ["blackhole", "192.168.78.0/24"]),
    ("4", "main", ["blackhole", "192.168.79.0/24"]),
]

AGENT_FILES = [
    "/etc/wireguard/server.priv",
    "/etc/wireguard/server.pub",
    "/etc/systemd/nspawn/kube1.nspawn",
    "/etc/systemd/nspawn/kube2.nspawn",
    "/etc/systemd/system/systemd-nspawn@kube1.service.d",
    "/etc/systemd/system/systemd-nspawn@kube2.service.d",
    "/var/lib/machines/kube1",
    "/var/lib/machines/kube2",
    "/etc/unbounded/agent",
    "/etc/systemd/system/unbounded-agent-daemon.service.d",
    "/var/lib/unbounded-agent/bin/unbounded-agent-blue",
    "/var/lib/unbounded-agent/bin/unbounded-agent-current",
    "/var/lib/unbounded-agent/bin/unbounded-agent-last-good",
    "/var/lib/unbounded-agent/bin/unbounded-agent",
    "/var/lib/unbounded-agent",
]
DECOY_FILES = [
    "/etc/wireguard/wg0.conf",
    "/etc/systemd/nspawn/kube10.nspawn",
    "/var/lib/machines/kube10",
    f"{BIND_SOURCE}/data.txt",
]


def rule_key(fam, table, pref) -> str:
    return f"rule ipv{fam} pref {pref} lookup {table}"


def route_key(fam, table, spec) -> str:
    dst = next(w for w in spec if "/" in w)
    return f"route ipv{fam} table {table} {dst}"


@dataclasses.dataclass
class Fixture:
    items: set[str]  # keys of snapshot() that the reset must make False
    decoys: set[str]  # keys that must stay True
    stubborn: tuple[str, ...]

    def gone(self, snap: dict) -> set[str]:
        return {k for k in self.items if not snap[k]}

    def kept(self, snap: dict) -> set[str]:
        return {k for k in self.decoys if snap[k]}


def _ip(host: TestHost, fam: str, *args) -> None:
    host.run(["ip", f"-{fam}", *map(str, args)])


def bootstrap(host: TestHost, stubborn: tuple[str, ...] = ()) -> Fixture:
    """Make the host look bootstrapped. Machines named in ``stubborn`` ignore the graceful stop.
    Expects the .deb to be installed (its toolset seeds the agent's slots). Can run again on the
    same host after a reset: decoys that survived are replaced, not duplicated."""
    # Machines: the agent's two (enabled, with overrides) and the decoy kube10.
    for m in (*AGENT_MACHINES, "kube10"):
        make_nested_machine(host, m, start=False)
        if m in stubborn:
            host.write(f"/etc/systemd/nspawn/{m}.nspawn", STUBBORN_NSPAWN)
    for m in AGENT_MACHINES:
        host.write(f"/etc/systemd/system/systemd-nspawn@{m}.service.d/10-unbounded.conf",
                   "[Service]\n# written by the agent's bootstrap\nEnvironment=UNBOUNDED_MACHINE=1\n")
    host.run(["mkdir", "-p", BIND_SOURCE, BIND_TARGET])
    host.write(f"{BIND_SOURCE}/data.txt", PRECIOUS)
    host.sh(f"mountpoint -q {BIND_TARGET} || mount --bind {BIND_SOURCE} {BIND_TARGET}")
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "enable", *(f"systemd-nspawn@{m}.service" for m in AGENT_MACHINES)])
    host.run(["systemctl", "start", *(f"systemd-nspawn@{m}.service" for m in (*AGENT_MACHINES, "kube10"))])

    for name, spec in {**AGENT_LINKS, **DECOY_LINKS}.items():
        host.sh(f"ip link del {name} 2>/dev/null; true")
        host.run(["ip", "link", "add", name, *spec])
    for name in ("wg51820", "wg51833"):
        host.run(["ip", "link", "set", name, "up"])
    host.run(["ip", "addr", "add", "10.244.0.1/24", "dev", "wg51820"])
    for fam, table, pref, sel in AGENT_RULES + DECOY_RULES:
        host.sh(f"ip -{fam} rule del pref {pref} lookup {table} 2>/dev/null; true")
        _ip(host, fam, "rule", "add", *sel, "lookup", table, "pref", pref)
    for fam, table, spec in AGENT_ROUTES + DECOY_ROUTES:
        _ip(host, fam, "route", "replace", *spec, "table", table)

    host.write("/etc/wireguard/server.priv", "cHJpdmF0ZSBrZXkgZm9yIHRlc3Rz\n", mode=0o600)
    host.write("/etc/wireguard/server.pub", "cHVibGljIGtleSBmb3IgdGVzdHM=\n")
    host.write("/etc/wireguard/wg0.conf", "# the operator's own VPN\n", mode=0o600)
    host.write("/etc/unbounded/agent/config.yaml", f"machineName: {host.name}\n")
    host.write("/etc/systemd/system/unbounded-agent-daemon.service.d/10-env.conf",
               "[Service]\nEnvironment=UNBOUNDED_AGENT_TEST=1\n")
    host.run(["systemctl", "daemon-reload"])
    # The agent as `start` leaves it: slots and links seeded, daemon enabled and running (a
    # no-op right after the .deb's install; needed again after a reset removed them).
    host.run(["/usr/libexec/unbounded-agent/unbounded-agent-seed-slots"])
    host.run(["systemctl", "enable", "--now", "unbounded-agent-daemon.service"])

    items = {f"machine {m}" for m in AGENT_MACHINES}
    items |= {f"enabled systemd-nspawn@{m}.service" for m in AGENT_MACHINES}
    items |= {f"link {n}" for n in AGENT_LINKS}
    items |= {rule_key(f, t, p) for f, t, p, _ in AGENT_RULES}
    items |= {route_key(f, t, s) for f, t, s in AGENT_ROUTES}
    items |= {f"path {p}" for p in AGENT_FILES}
    items |= {"mount " + BIND_TARGET, "enabled unbounded-agent-daemon.service", "running unbounded-agent-daemon.service"}
    decoys = {"machine kube10", "running systemd-nspawn@kube10.service"}
    decoys |= {f"link {n}" for n in DECOY_LINKS}
    decoys |= {rule_key(f, t, p) for f, t, p, _ in DECOY_RULES}
    decoys |= {route_key(f, t, s) for f, t, s in DECOY_ROUTES}
    decoys |= {f"path {p}" for p in DECOY_FILES}
    decoys |= {"precious data intact", "route ipv4 local table", "rule ipv4 lookup main"}
    fx = Fixture(items, decoys, tuple(stubborn))
    snap = snapshot(host)
    missing = {k for k in items | decoys if not snap[k]}
    assert not missing, f"fixture incomplete, not there after bootstrap: {sorted(missing)}"
    return fx


# Runs inside the host: one round trip collects every fact snapshot() reports.
_PROBE = r"""
import json, os, subprocess
def run(*a):
    return subprocess.run(a, capture_output=True, text=True).stdout
out = {}
try:  # a host without machined has no machinectl: nothing is registered there
    out["machines"] = [l.split()[0] for l in run("machinectl", "list", "--no-legend", "--no-pager").splitlines() if l.strip()]
except FileNotFoundError:
    out["machines"] = []
out["links"] = [l["ifname"] for l in json.loads(run("ip", "-j", "link", "show") or "[]")]
out["rules"] = {f: json.loads(run("ip", "-" + f, "-j", "rule", "show") or "[]") for f in "46"}
out["routes"] = {f: json.loads(run("ip", "-" + f, "-j", "route", "show", "table", "all") or "[]") for f in "46"}
out["mounts"] = [l.split()[4] for l in open("/proc/self/mountinfo")]
out["units"] = {}
for u in ARGS["units"]:
    out["units"][u] = [run("systemctl", "is-enabled", u).strip(), run("systemctl", "is-active", u).strip()]
out["paths"] = {p: os.path.lexists(p) for p in ARGS["paths"]}
try:
    out["precious"] = open(ARGS["precious"]).read()
except OSError:
    out["precious"] = None
print(json.dumps(out))
"""


def snapshot(host: TestHost) -> dict[str, bool]:
    """Which fixture items and decoys exist right now, keyed as in Fixture.items/decoys."""
    units = [f"systemd-nspawn@{m}.service" for m in (*AGENT_MACHINES, "kube10")] + ["unbounded-agent-daemon.service"]
    paths = AGENT_FILES + DECOY_FILES
    args = {"units": units, "paths": paths, "precious": f"{BIND_SOURCE}/data.txt"}
    raw = json.loads(host.run(["python3", "-c", f"ARGS = {json.dumps(args)!r}\nimport json; ARGS = json.loads(ARGS)\n" + _PROBE]).stdout)
    snap: dict[str, bool] = {}
    for m in (*AGENT_MACHINES, "kube10"):
        snap[f"machine {m}"] = m in raw["machines"]
    for u, (enabled, active) in raw["units"].items():
        snap[f"enabled {u}"] = enabled == "enabled"
        snap[f"running {u}"] = active in ("active", "activating", "deactivating")
    for n in list(AGENT_LINKS) + list(DECOY_LINKS):
        snap[f"link {n}"] = n in raw["links"]
    for fam, table, pref, _ in AGENT_RULES + DECOY_RULES:
        snap[rule_key(fam, table, pref)] = any(
            r.get("priority") == pref and str(r.get("table")) == str(table) for r in raw["rules"][fam])
    for fam, table, spec in AGENT_ROUTES + DECOY_ROUTES:
        dst = next(w for w in spec if "/" in w)
        snap[route_key(fam, table, spec)] = any(
            str(r.get("table", "main")) == str(table) and r.get("dst") in (dst, dst.split("/")[0] if dst.endswith("/32") else dst)
            for r in raw["routes"][fam])
    for p in AGENT_FILES + DECOY_FILES:
        snap[f"path {p}"] = raw["paths"][p]
    snap["mount " + BIND_TARGET] = BIND_TARGET in raw["mounts"]
    snap["precious data intact"] = raw["precious"] == PRECIOUS
    # The host's own routing must not be flushed: the main rule and lo's routes in table local.
    snap["rule ipv4 lookup main"] = any(str(r.get("table")) == "main" for r in raw["rules"]["4"])
    snap["route ipv4 local table"] = any(str(r.get("table")) == "local" for r in raw["routes"]["4"])
    return snap


# -- running the reset as a user would, and reading its report ------------------------------------

AGENT_RESET = ["unbounded-agent", "reset"]
# The toolset's own CLI: still there after phase 2 removed the agent binary behind `unbounded-agent`.
TOOLSET_RESET = ["/usr/libexec/unbounded-agent/unbounded-agent", "reset"]
RESET_DIR = "/var/lib/unbounded-agent-ops/reset"  # the reset's request, checkpoint and step reports
CHECKPOINT = f"{RESET_DIR}/checkpoint.json"


@pytest.fixture(scope="module")
def agent_host(testhost_factory):
    """A fresh test host of this module's own, with the .deb installed (nothing bootstrapped yet)."""
    with testhost_factory(installed=True) as host:
        yield host


@pytest.fixture
def fresh_agent_host(testhost_factory):
    """Like agent_host, but a new host for each test (for tests that leave a host half reset)."""
    with testhost_factory(installed=True) as host:
        yield host


def run_reset(host: TestHost, *args: str, toolset: bool = False):
    """Run the reset with --json; return (exit code, parsed report, stderr)."""
    cmd = (TOOLSET_RESET if toolset else AGENT_RESET) + ["--json", *args]
    r = host.run(cmd, check=False, timeout=600)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"{cmd} printed no JSON report (exit {r.returncode}):\n{r.stdout}\n{r.stderr}") from None
    return r.returncode, report, r.stderr


def step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["step"] == name)


def removed_items(report: dict) -> set[str]:
    return {item for s in report["steps"] for item in s.get("removed", [])}


def drop_in(host: TestHost, unit: str, text: str) -> str:
    path = f"/etc/systemd/system/{unit}.d/50-test.conf"
    host.write(path, text)
    host.run(["systemctl", "daemon-reload"])
    return path


def remove_drop_in(host: TestHost, unit: str) -> None:
    host.run(["rm", "-rf", f"/etc/systemd/system/{unit}.d"])
    host.run(["systemctl", "daemon-reload"])


def checkpoint_exists(host: TestHost) -> bool:
    return host.path(CHECKPOINT).exists()


OPS = "/var/lib/unbounded-agent-ops"
BIN_CURRENT = "/var/lib/unbounded-agent/bin/unbounded-agent-current"  # gone once step 7 removed the agent


def result_of(host: TestHost, request_id: str) -> dict | None:
    """The dispatcher's result for a request (a reset's run_id is its request id), None while it has none."""
    p = host.path(f"{OPS}/results/{request_id}.json")
    return json.loads(p.read_text()) if p.exists() else None


def claimed_request(host: TestHost) -> dict | None:
    """The request the dispatcher is running (its claimed file in the spool), None when there is none."""
    claimed = sorted(host.path(f"{OPS}/spool/requests").glob("*.claimed"))
    return json.loads(claimed[0].read_text()) if claimed else None


def spool_is_empty(host: TestHost) -> bool:
    return not any(host.path(f"{OPS}/spool/requests").iterdir())


# -- holding a step, killing it or the dispatcher ------------------------------------------------------

DISPATCH = "unbounded-agent-dispatch.service"
LOCK = "/run/unbounded-agent-install.lock"
HOLD_MARKER = "/var/tmp/test-hold-{step}"
# A runtime drop-in (gone at the next boot) that makes the step's unit wait, before the step itself runs,
# until its marker is removed; the marker holds the waiting shell's pid. ($$ is a literal $ in a unit file;
# '+' runs the wait outside the step's sandbox, whose /var/tmp is private and read-only.)
HOLD_DROPIN = ("[Service]\nExecStartPre=+/bin/sh -c 'echo $$$$ > {marker}; "
               "while [ -e {marker} ]; do sleep 0.1; done'\n")


def start_cli_reset(host: TestHost, *args: str) -> None:
    """`unbounded-agent reset --json` in the background (a transient unit); its report and exit code land in
    /var/tmp/cli-reset.json and /var/tmp/cli-reset.rc (cli_reset_outcome)."""
    host.run(["rm", "-f", "/var/tmp/cli-reset.json", "/var/tmp/cli-reset.rc"])
    host.run(["systemd-run", "--unit=test-reset-cli.service", "--collect", "--quiet", "/bin/sh", "-c",
              "unbounded-agent reset --json \"$@\" > /var/tmp/cli-reset.json; echo $? > /var/tmp/cli-reset.rc",
              "sh", *args])


def cli_reset_outcome(host: TestHost, timeout: float = 600) -> tuple[int, dict]:
    from waiting import wait_until

    rc = wait_until("the reset CLI to exit", lambda: host.path("/var/tmp/cli-reset.rc").exists()
                    and host.read("/var/tmp/cli-reset.rc").strip(), timeout=timeout)
    return int(rc), json.loads(host.read("/var/tmp/cli-reset.json"))


def hold_step(host: TestHost, step_name: str) -> None:
    unit = f"unbounded-agent-reset-{step_name}.service"
    release_step(host, step_name)  # a marker left by a power cut is no hold
    text = HOLD_DROPIN.format(marker=HOLD_MARKER.format(step=step_name))
    host.run(["mkdir", "-p", f"/run/systemd/system/{unit}.d"])
    host.run(["sh", "-c", f"cat > /run/systemd/system/{unit}.d/50-test-hold.conf"], input=text)
    host.run(["systemctl", "daemon-reload"])


def unhold_step(host: TestHost, step_name: str) -> None:
    """Remove the drop-in (a step already waiting keeps waiting until release_step)."""
    host.run(["rm", "-rf", f"/run/systemd/system/unbounded-agent-reset-{step_name}.service.d"])
    host.run(["systemctl", "daemon-reload"])


def wait_held(host: TestHost, step_name: str, timeout: float = 120) -> int:
    from waiting import wait_until

    marker = host.path(HOLD_MARKER.format(step=step_name))
    return int(wait_until(f"reset step {step_name} to wait at its hold", lambda: marker.exists()
                          and marker.read_text().strip(), timeout=timeout))


def release_step(host: TestHost, step_name: str) -> None:
    host.path(HOLD_MARKER.format(step=step_name)).unlink(missing_ok=True)


def lock_holder(host: TestHost) -> dict:
    """The host-operation lock's description (hostlock.py), {} when nobody wrote one."""
    text = host.run(["cat", LOCK], check=False).stdout.strip()
    return json.loads(text) if text else {}


def dispatcher_pid(host: TestHost) -> int:
    return int(host.run(["systemctl", "show", DISPATCH, "-p", "MainPID", "--value"]).stdout.strip() or 0)


def kill_the_dispatcher(host: TestHost, request_id: str) -> None:
    """kill -9 of the dispatcher that runs request_id; returns once a new one (started by the path unit for
    the claimed request) holds the host for the same request."""
    from waiting import wait_until

    pid = dispatcher_pid(host)
    assert pid > 0 and lock_holder(host).get("pid") == pid and lock_holder(host).get("operation") == request_id
    host.run(["kill", "-9", str(pid)])

    def taken_over():
        new, held = dispatcher_pid(host), lock_holder(host)
        return new not in (0, pid) and held.get("pid") == new and held.get("operation") == request_id
    wait_until("a new dispatcher to hold the host for the same reset", taken_over, timeout=60)


def held_reset(host, held_step) -> tuple[object, str, int]:
    """Bootstrap, queue a reset and hold it just before held_step; (fixture, request id, held pid)."""
    fx = bootstrap(host)
    hold_step(host, held_step)
    try:
        start_cli_reset(host)
        pid = wait_held(host, held_step)
    finally:
        unhold_step(host, held_step)  # a later run of the step does not wait
    req = claimed_request(host)
    assert req and req["kind"] == "reset"
    return fx, req["id"], pid
