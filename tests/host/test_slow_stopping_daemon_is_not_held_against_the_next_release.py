"""An honest probation clock. An old daemon that ignores SIGTERM keeps the restart waiting for the daemon unit's
explicit TimeoutStopSec= (30 s, far beyond the 8 s ready timeout here) until systemd kills it: the healthy
release after it is still committed, not quarantined, because its ready clock starts when its own run starts.
And an operator's `systemctl restart` of the daemon during probation is not held against the release: the next
run is watched again, and the upgrade is committed."""

import json
from pathlib import Path

import pytest
import releases
from queue_host import TOOLSET_CLI
from upgrade_host import (
    CONFIG,
    STATE,
    TEST_CONFIG,
    daemon,
    journal,
    prepare,
    record,
    request_id,
    result,
    settle,
    unit_seconds,
    upgrade,
    wait_until,
)

pytestmark = pytest.mark.testhost
REPO = Path(__file__).resolve().parents[2]
DAEMON = "unbounded-agent-daemon.service"


@pytest.fixture(scope="module")
def host(testhost_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("slow")
    with testhost_factory("slow-stop", installed=True) as h:
        prepare(h)
        h.urls = {"slow": h.serve(releases.script_release(out / "slow.tar.gz", version="8.0.0", daemon="ignores-sigterm"),
                                  "slow.tar.gz")}
        for v in ("2.0.0", "3.0.0"):
            h.urls[v] = h.serve(releases.real_release(REPO, v, out / v), f"agent-{v}.tar.gz")
        yield h


def quarantine(host) -> list:
    p = host.path(f"{STATE}/quarantine.json")
    return json.loads(p.read_text())["entries"] if p.exists() else []


def test_the_daemon_unit_bounds_its_stop(host):
    # the old daemon may take longer to stop (30 s) than the new one has to report ready (readyTimeoutSeconds 8)
    assert unit_seconds(host, DAEMON, "TimeoutStopUSec") == 30
    # systemd's own start bound is readyTimeoutSeconds plus a margin: probation judges readiness
    assert unit_seconds(host, DAEMON, "TimeoutStartUSec") == 8 + 30


def test_a_healthy_release_after_a_daemon_that_ignores_sigterm_is_committed(host):
    r = upgrade(host, host.urls["slow"], "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready; ignoring SIGTERM" in journal(host, DAEMON, lines=20)
    # the test release knows only `version` and `daemon`: the toolset's own CLI asks for the next upgrade
    r = host.run([TOOLSET_CLI, "upgrade", host.urls["2.0.0"], "--wait"], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = settle(host)
    assert rec["phase"] == "committed" and rec["to"]["version"] == "2.0.0" and rec["id"] == request_id(r)
    assert quarantine(host) == []
    # the premise: the old daemon was not stopped by SIGTERM but killed after TimeoutStopSec=
    assert "State 'stop-sigterm' timed out. Killing." in journal(host, DAEMON, lines=200)
    # and its stop, asked for, is no crash of anything
    assert not host.path(f"{STATE}/daemon-exits.json").exists()
    assert host.run(["unbounded-agent", "version"]).stdout.strip() == "unbounded-agent 2.0.0"


def test_an_operators_restart_during_probation_is_not_held_against_the_release(host):
    host.write(CONFIG, TEST_CONFIG.replace("probationSeconds: 3", "probationSeconds: 20"))
    host.run(["systemctl", "daemon-reload"])
    id = request_id(upgrade(host, host.urls["3.0.0"]))
    wait_until("probation to watch the new daemon",
               lambda: "probation for 20 s" in journal(host, "unbounded-upgrade-probation.service", lines=20))
    host.run(["systemctl", "restart", DAEMON])  # Type=notify: returns once the restarted daemon is ready
    res = wait_until(f"the result of {id}", lambda: result(host, id), timeout=300)
    assert res["succeeded"] and res["to_version"] == "3.0.0", res
    assert "restarted or stopped from outside during probation" in journal(host, "unbounded-upgrade-probation.service",
                                                                          lines=40)
    assert record(host)["phase"] == "committed" and quarantine(host) == []
    assert daemon(host)["ActiveState"] == "active"
    host.write(CONFIG, TEST_CONFIG)
    host.run(["systemctl", "daemon-reload"])
