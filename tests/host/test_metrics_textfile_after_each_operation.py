"""node_exporter's textfile, scraped as its collector reads it: written at install (the daemon's start), again
at each start of the daemon, and after each operation — an upgrade, a rollback on request, a release that
crashes and is rolled back, a reset — with the operations by kind, result and reason, the rollbacks by
why, the reset's steps by result, the current and last-good agents, and the last operation's time and
duration as its result file has them."""

import datetime
import json
import re

import pytest
import releases
from upgrade_host import TEST_CONFIG, busy_units, queued, request_id, result, rollback, upgrade, wait_until

pytestmark = pytest.mark.testhost

TEXTFILE = "/var/lib/prometheus/node-exporter/unbounded_agent.prom"
SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


@pytest.fixture(scope="module")
def host(testhost_factory, deb_path, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("releases")
    good = releases.real_release(repo_root, "2.0.0", out / "2.0.0")
    crash = releases.script_release(out / "crash.tar.gz", version="9.0.0", daemon="crash")
    with testhost_factory("metrics") as h:
        h.run(["mkdir", "-p", "/var/lib/prometheus/node-exporter"])  # as prometheus-node-exporter makes it
        h.install_deb(deb_path)
        h.write("/etc/unbounded/agent/config.yaml", TEST_CONFIG)
        h.urls = {"2.0.0": h.serve(good, "agent-2.0.0.tar.gz"), "crash": h.serve(crash, "crash.tar.gz")}
        yield h


def scrape(host) -> dict[str, dict[tuple, float]]:
    """name -> {((label, value), ...): value}: every line must be one a collector takes. First the
    dispatcher finishes: it writes an operation's result (which ends `--wait`), then counts it and writes
    the textfile, then exits."""
    wait_until("the dispatcher to finish", lambda: not queued(host) and not busy_units(host))
    out: dict[str, dict[tuple, float]] = {}
    for line in host.read(TEXTFILE).splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) unbounded_agent_\w+ \S", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        out.setdefault(m[1], {})[tuple(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))] = float(m[3])
    return out


def operations(m) -> dict[tuple[str, str, str], float]:
    return {tuple(v for _, v in labels): n for labels, n in m.get("unbounded_agent_operations_total", {}).items()}


def agent(m, which: str) -> tuple[str, str] | None:
    series = list(m.get(f"unbounded_agent_{which}_info", {}))
    assert len(series) <= 1
    return tuple(v for _, v in series[0]) if series else None


def last_operation_is(m, res: dict) -> None:
    ended = datetime.datetime.fromisoformat(res["finished_at"].replace("Z", "+00:00")).timestamp()
    assert m["unbounded_agent_last_operation_timestamp_seconds"][()] == pytest.approx(ended, abs=0.001)
    assert m["unbounded_agent_last_operation_duration_seconds"][()] == pytest.approx(res["seconds"], abs=0.001)


def test_the_install_writes_the_agent_it_seeded(host, version):
    m = scrape(host)
    assert agent(m, "current") == agent(m, "last_good") == ("unbounded-agent-blue", version)
    assert operations(m) == {} and "unbounded_agent_last_operation_timestamp_seconds" not in m
    assert host.run(["stat", "-c", "%a %U", TEXTFILE]).stdout == "644 root\n"


def test_each_start_of_the_daemon_writes_it_again(host, version):
    host.run(["rm", TEXTFILE])
    host.run(["systemctl", "restart", "unbounded-agent-daemon.service"])
    wait_until("the metrics unit to write the textfile", lambda: host.path(TEXTFILE).exists(), timeout=60)
    assert agent(scrape(host), "current") == ("unbounded-agent-blue", version)


def test_after_an_upgrade(host, version):
    r = upgrade(host, host.urls["2.0.0"], "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    m = scrape(host)
    assert operations(m) == {("upgrade", "succeeded", "Succeeded"): 1}
    assert agent(m, "current") == ("unbounded-agent-green", "2.0.0")
    assert agent(m, "last_good") == ("unbounded-agent-blue", version)
    assert m.get("unbounded_agent_rollbacks_total", {}) == {}
    last_operation_is(m, result(host, request_id(r)))


def test_after_a_rollback_on_request(host, version):
    r = rollback(host, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    m = scrape(host)
    assert operations(m) == {("upgrade", "succeeded", "Succeeded"): 1, ("rollback", "succeeded", "Succeeded"): 1}
    assert m["unbounded_agent_rollbacks_total"] == {(("reason", "Requested"),): 1}
    assert agent(m, "current") == ("unbounded-agent-blue", version)
    assert agent(m, "last_good") == ("unbounded-agent-green", "2.0.0")
    last_operation_is(m, result(host, request_id(r)))


def test_after_a_release_that_crashes_and_is_rolled_back(host, version):
    r = upgrade(host, host.urls["crash"], "--wait")
    assert r.returncode == 15, r.stdout + r.stderr  # DaemonFailed
    m = scrape(host)
    assert operations(m)[("upgrade", "failed", "DaemonFailed")] == 1
    rec = json.loads(host.read("/var/lib/unbounded-agent/upgrade.json"))
    assert rec["phase"] == "rolled-back" and rec["failure"]["cause"] == "ExitedBeforeReady"
    assert m["unbounded_agent_rollbacks_total"] == {(("reason", "Requested"),): 1, (("reason", "ExitedBeforeReady"),): 1}
    assert agent(m, "current") == agent(m, "last_good") == ("unbounded-agent-blue", version)
    last_operation_is(m, result(host, request_id(r)))


def test_after_a_reset(host):
    r = host.run(["unbounded-agent", "reset"], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    id = re.search(r"^unbounded-agent reset \(request (\S+)\): queued$", r.stdout, re.M)[1]
    m = scrape(host)
    assert operations(m) == {("upgrade", "succeeded", "Succeeded"): 1, ("rollback", "succeeded", "Succeeded"): 1,
                             ("upgrade", "failed", "DaemonFailed"): 1, ("reset", "succeeded", "Succeeded"): 1}
    steps = {labels: n for labels, n in m["unbounded_agent_reset_steps_total"].items()}
    reports = [json.loads(host.read(f"/var/lib/unbounded-agent-ops/reset/reports/{p.name}"))
               for p in sorted(host.path("/var/lib/unbounded-agent-ops/reset/reports").iterdir())]
    assert steps == {(("step", rep["step"]), ("result", "succeeded")): 1 for rep in reports}
    assert len(steps) >= 9 and all(rep["run_id"] == id for rep in reports)
    assert agent(m, "current") is None and agent(m, "last_good") is None  # the agent is gone
    last_operation_is(m, result(host, id))
    # the counters outlive the reset, as the toolset's own state does
    assert host.path("/var/lib/unbounded-agent-ops/metrics.json").is_file()
