"""AgentUpgrade on a test host: what a user runs and what the tests look at.

    prepare(host)                on a host with the .deb installed (testhost_factory(installed=True)): a config
                                 with short probation bounds, daemon-reload, HTTPS
    upgrade(host, url, "--wait") `unbounded-agent upgrade ...` (a CompletedProcess, never raising)
    request_id(r)                the request id the CLI printed ("upgrade <id> queued")
    result(host, id)             the dispatcher's result for request id (results/<id>.json), or None
    look(host)                   links, slot digests, versions, daemon state and the record, in one dict
    settle(host)                 wait until the record is final, the queue empty and no upgrade unit at work
    hold(host, unit, point)      make a step pause at a named point (tests only), for kills
    power_cycle(host)            kill every process of the host at once (no shutdown), boot it again

Every host operation goes through the queue (units/README.md): the CLI and `systemctl start
unbounded-upgrade@<URL>` only submit a request; unbounded-agent-dispatch.service runs it under the request's
id (the instance of the chain's units) and writes its result.
"""

from __future__ import annotations

import json
import re
import subprocess

import holds
import waiting
from holds import hold, unhold  # noqa: F401  (re-exported: the tests take them from here)

BIN = "/var/lib/unbounded-agent/bin"
STATE = "/var/lib/unbounded-agent"
RECORD = f"{STATE}/upgrade.json"
OPS = "/var/lib/unbounded-agent-ops"
REQUESTS, RESULTS = f"{OPS}/spool/requests", f"{OPS}/results"
DAEMON = "unbounded-agent-daemon.service"
DISPATCH = "unbounded-agent-dispatch.service"
CONFIG = "/etc/unbounded/agent/config.yaml"
# Short bounds so a failing daemon is caught in seconds; the daemon unit keeps its own restart policy.
TEST_CONFIG = """\
probationSeconds: 3
readyTimeoutSeconds: 8
preflightTimeoutSeconds: 5
maxExtractedBytes: 16777216
"""
UPGRADE_UNITS = ("unbounded-upgrade*", "unbounded-agent-daemon-recovery.service", DISPATCH)
TERMINAL = ("committed", "failed", "rolled-back")
SETTLE_SECONDS = 180


def wait_until(what: str, fn, timeout: float = SETTLE_SECONDS, poll: float = 0.2):
    return waiting.wait_until(what, fn, timeout, poll)


def prepare(host, config: str = TEST_CONFIG) -> None:
    host.write(CONFIG, config)
    host.run(["systemctl", "daemon-reload"])  # as README says: the units follow the config (the generator)
    host.start_https()
    wait_until("the daemon to be active", lambda: daemon(host)["ActiveState"] == "active")


def upgrade(host, url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return host.run(["unbounded-agent", "upgrade", url, *args], check=False, timeout=timeout)


def rollback(host, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return host.run(["unbounded-agent", "rollback", *args], check=False, timeout=timeout)


def request_id(r: subprocess.CompletedProcess) -> str:
    """The request id the CLI printed when it queued the operation ("<kind> <id> queued")."""
    m = re.search(r"^(?:upgrade|rollback) (\S+) queued$", r.stdout, re.MULTILINE)
    assert m, f"no request was queued:\n{r.stdout}{r.stderr}"
    return m.group(1)


def result(host, id: str) -> dict | None:
    p = host.path(f"{RESULTS}/{id}.json")
    return json.loads(p.read_text()) if p.exists() else None


def queued(host) -> list[str]:
    """The spool's entries (waiting .request and claimed .claimed files), oldest first."""
    p = host.path(REQUESTS)
    return sorted(e.name for e in p.iterdir()) if p.is_dir() else []


def escape(host, url: str) -> str:
    return host.run(["systemd-escape", url]).stdout.strip()


def daemon(host, unit: str = DAEMON) -> dict:
    out = host.run(["systemctl", "show", unit, "-p",
                    "ActiveState,SubState,MainPID,NRestarts,InvocationID,Result,ExecMainStatus"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def record(host) -> dict | None:
    p = host.path(RECORD)
    return json.loads(p.read_text()) if p.exists() else None


def sha256(host, path: str) -> str | None:
    r = host.run(["sha256sum", path], check=False)
    return r.stdout.split()[0] if r.returncode == 0 else None


def look(host) -> dict:
    """Everything a test compares before and after: links, what they select, versions, the daemon."""
    def link(name):
        r = host.run(["readlink", f"{BIN}/{name}"], check=False)
        return r.stdout.strip() or None

    current, last_good = link("unbounded-agent-current"), link("unbounded-agent-last-good")
    d = daemon(host)
    return {
        "current": current,
        "last_good": last_good,
        "current_sha": sha256(host, f"{BIN}/unbounded-agent-current"),
        "last_good_sha": sha256(host, f"{BIN}/unbounded-agent-last-good"),
        "version": host.run(["unbounded-agent", "version"], check=False, timeout=30).stdout.strip(),
        "daemon_state": d["ActiveState"],
        "daemon_pid": d["MainPID"],
        "daemon_invocation": d["InvocationID"],
        "record": record(host),
        "hidden_files": host.run(["find", BIN, STATE, "-maxdepth", "1", "-name", ".*", "-not", "-name", "."],
                                 check=False).stdout.split(),
    }


def busy_units(host) -> list[str]:
    out = host.run(["systemctl", "list-units", "--no-legend", "--plain", "--all", *UPGRADE_UNITS], check=False).stdout
    busy = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[2] in ("active", "activating", "deactivating", "reloading"):
            busy.append(words[0])
    jobs = host.run(["systemctl", "list-jobs", "--no-legend"], check=False).stdout
    busy += [w for line in jobs.splitlines() for w in line.split()[1:2] if w.startswith(("unbounded-upgrade", "unbounded-agent"))]
    return busy


def settle(host, timeout: float = SETTLE_SECONDS) -> dict:
    """Wait until the record is final, nothing is queued, no upgrade unit (nor the dispatcher) is at work and
    the daemon is active."""
    def settled():
        rec = record(host)
        if rec and rec.get("phase") not in TERMINAL:
            return None
        if queued(host) or busy_units(host):
            return None
        if daemon(host)["ActiveState"] != "active":
            return None
        return rec or {}
    return wait_until("the upgrade to settle", settled, timeout)


def journal_but_the_release_server(host) -> str:
    """The whole journal but the test's own HTTPS server, whose access log shows what it was asked."""
    out = host.run(["journalctl", "--no-pager", "-o", "json"]).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    return "\n".join(str(e.get("MESSAGE")) for e in entries if e.get("_SYSTEMD_UNIT") != "testhost-https.service")


def journal(host, *units: str, lines: int = 300) -> str:
    args = ["journalctl", "--no-pager", "-o", "cat", "-n", str(lines)]
    for u in units:
        args += ["-u", u]
    return host.run(args, check=False).stdout


# -- hold points and kills -------------------------------------------------------------------------

def wait_held(host, point: str, timeout: float = 120) -> int:
    marker = host.path(f"{STATE}/test-hold/{point}")
    wait_until(f"a step to reach hold point {point}", marker.exists, timeout)
    return int(marker.read_text())


def release_hold(host, point: str) -> None:
    host.path(f"{STATE}/test-hold/{point}").unlink(missing_ok=True)


def power_cycle(host) -> None:
    """A power loss (TestHost.power_cycle), then the release server again: it died with the host."""
    host.power_cycle(hard=True)
    holds.clear(host)  # the manager that had them armed is gone
    host.start_https()


def unit_seconds(host, unit: str, prop: str = "TimeoutStartUSec") -> float:
    """A time span of a unit as systemctl shows it ("1min 15s", "500ms", "infinity"), in seconds."""
    text = host.run(["systemctl", "show", "-p", prop, "--value", unit]).stdout.strip()
    if text == "infinity":
        return float("inf")
    scale = {"h": 3600, "min": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    total = 0.0
    for word in text.split():
        m = re.fullmatch(r"([0-9.]+)(h|min|s|ms|us)", word)
        assert m, f"{unit} {prop}={text!r}"
        total += float(m[1]) * scale[m[2]]
    return total


def phase_time(rec: dict, phase: str) -> float:
    """When the record (as JSON) last entered phase, in seconds since the epoch."""
    return [h["t"] for h in rec["history"] if h["phase"] == phase][-1]


def tree(host, *paths: str) -> list[str]:
    """Every file, link and directory under paths (that exist), with its type and size: what a no-op must leave
    as it was."""
    existing = [p for p in paths if host.run(["test", "-e", p], check=False).returncode == 0]
    if not existing:
        return []
    out = host.run(["find", *existing, "-xdev", "-printf", "%p %y %s %l\\n"]).stdout
    return sorted(out.splitlines())
