"""A good upgrade end to end on a real systemd host, as a user drives it: v1 (the .deb) → v2 with
`unbounded-agent upgrade --wait`, v2 → v3 with `systemctl start unbounded-upgrade@<URL>.service`, then
`unbounded-agent rollback` back to v2. Also: the same release again changes nothing and restarts
nothing, and a second request while one is in flight gets a clear refusal."""

import json

import pytest

import releases
from upgrade_host import (daemon, escape, hold, look, prepare, release_hold, rollback, settle, unhold, upgrade,
                          wait_held)

pytestmark = pytest.mark.testhost


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("releases")
    return {v: releases.real_release(repo_root, v, out / v) for v in ("2.0.0", "3.0.0")}


@pytest.fixture(scope="module")
def host(testhost_factory, deb_path, built):
    with testhost_factory("upgrade") as h:
        prepare(h, deb_path)
        h.urls = {v: h.serve(path, f"agent-{v}.tar.gz") for v, path in built.items()}
        yield h


def test_upgrade_v1_to_v2_with_the_cli(host, version):
    before = look(host)
    assert before["current"] == "unbounded-agent-blue" and before["version"] == f"unbounded-agent {version}"
    r = upgrade(host, host.urls["2.0.0"], "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    # the live progress line went through the stages
    for words in ("requested", "staging", "downloaded", "probation", "committed"):
        assert words in r.stdout
    after = look(host)
    assert after["current"] == "unbounded-agent-green" and after["last_good"] == "unbounded-agent-blue"
    assert after["version"] == "unbounded-agent 2.0.0"
    assert after["last_good_sha"] == before["current_sha"]  # v1 kept byte for byte
    assert after["daemon_state"] == "active" and after["daemon_pid"] != before["daemon_pid"]
    rec = after["record"]
    assert rec["phase"] == "committed" and rec["reason"] == "Succeeded"
    assert (rec["from"]["version"], rec["to"]["version"]) == (version, "2.0.0")
    assert [h["phase"] for h in rec["history"]] == ["requested", "staging", "staged", "preflighted", "switching",
                                                    "probation", "committed"]
    # the daemon that runs is the new binary: it said so when it started
    assert "version 2.0.0 starting" in host.journal("unbounded-agent-daemon.service")
    assert after["hidden_files"] == []


def test_upgrade_v2_to_v3_with_systemctl_keeps_v2_as_last_good(host):
    before = look(host)
    unit = f"unbounded-upgrade@{escape(host, host.urls['3.0.0'])}.service"
    # the entry unit runs the whole chain and returns once the upgrade is committed
    r = host.run(["systemctl", "start", unit], check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    after = look(host)
    assert after["current"] == "unbounded-agent-blue" and after["last_good"] == "unbounded-agent-green"
    assert after["version"] == "unbounded-agent 3.0.0" and after["last_good_sha"] == before["current_sha"]
    assert after["record"]["phase"] == "committed" and after["record"]["operation"].startswith("systemctl-")
    # the chain is readable from systemd itself: each step its own unit
    deps = host.run(["systemctl", "show", "-p", "Requires", "--value", unit]).stdout
    assert "unbounded-upgrade-switch@" in deps


def test_rollback_returns_to_the_previous_binary(host):
    before = look(host)
    r = rollback(host, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    after = look(host)
    assert after["current"] == "unbounded-agent-green" and after["version"] == "unbounded-agent 2.0.0"
    assert after["last_good"] == "unbounded-agent-blue" and after["last_good_sha"] == before["current_sha"]
    rec = after["record"]
    assert rec["kind"] == "rollback" and rec["phase"] == "committed"
    assert "rolled back on request from 3.0.0 to 2.0.0" in rec["message"]


def test_same_release_again_succeeds_without_a_restart(host):
    before = look(host)
    r = upgrade(host, host.urls["2.0.0"], "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    after = look(host)
    assert "no restart" in after["record"]["message"] and after["record"]["same_content"] is True
    assert (after["daemon_pid"], after["daemon_invocation"]) == (before["daemon_pid"], before["daemon_invocation"])
    assert {k: after[k] for k in ("current", "last_good", "current_sha")} == \
           {k: before[k] for k in ("current", "last_good", "current_sha")}


def test_a_second_request_is_refused_while_one_is_in_flight(host):
    hold(host, "unbounded-upgrade-stage@.service", "stage-before-extract")
    try:
        first = upgrade(host, host.urls["3.0.0"])  # no --wait: returns once the chain is started
        assert first.returncode == 0, first.stderr
        wait_held(host, "stage-before-extract")
        second = upgrade(host, host.urls["2.0.0"] + "?sig=topsecret", "--wait")
        assert second.returncode == 16  # UpgradeInProgress
        assert "UpgradeInProgress" in second.stderr and "one upgrade at a time" in second.stderr
        # a direct systemctl start of another URL is refused by its stage step just the same
        other = f"unbounded-upgrade@{escape(host, host.urls['2.0.0'])}.service"
        r = host.run(["systemctl", "start", other], check=False, timeout=120)
        assert r.returncode != 0
        assert "UpgradeInProgress" in host.journal(other.replace("unbounded-upgrade@", "unbounded-upgrade-stage@"))
        rollback_attempt = rollback(host)
        assert rollback_attempt.returncode == 16
    finally:
        unhold(host, "unbounded-upgrade-stage@.service")
        release_hold(host, "stage-before-extract")
    rec = settle(host)
    assert rec["phase"] == "committed" and rec["to"]["version"] == "3.0.0"  # the first one was not disturbed
    assert "topsecret" not in host.journal(lines=2000) + json.dumps(rec)


def test_status_shows_the_committed_upgrade(host):
    out = host.run(["unbounded-agent", "status"]).stdout
    assert "committed (2.0.0 → 3.0.0)" in out
    st = json.loads(host.run(["unbounded-agent", "status", "--json"]).stdout)
    assert st["upgrade"]["succeeded"] is True and st["upgrade"]["to_version"] == "3.0.0"
    assert daemon(host)["ActiveState"] == "active"
