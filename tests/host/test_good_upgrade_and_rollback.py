"""A good upgrade end to end on a real systemd host, as a user drives it: v1 (the .deb) → v2 with
`unbounded-agent upgrade --wait`, v2 → v3 with `systemctl start unbounded-upgrade@<URL>.service`, then
`unbounded-agent rollback` back to v2. Also: the same release again changes nothing and restarts
nothing, and requests made while one runs wait in the queue and run after it, one at a time, in order."""

import json

import pytest
import releases
from upgrade_host import (
    BIN,
    daemon,
    escape,
    hold,
    journal,
    journal_but_the_release_server,
    look,
    prepare,
    queued,
    release_hold,
    request_id,
    result,
    rollback,
    settle,
    unhold,
    upgrade,
    wait_held,
    wait_until,
)

pytestmark = pytest.mark.testhost


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("releases")
    return {v: releases.real_release(repo_root, v, out / v) for v in ("2.0.0", "3.0.0")}


@pytest.fixture(scope="module")
def host(testhost_factory, built):
    with testhost_factory("upgrade", installed=True) as h:
        prepare(h)
        h.urls = {v: h.serve(path, f"agent-{v}.tar.gz") for v, path in built.items()}
        yield h


def shown_phases(stdout: str, id: str) -> list[str]:
    """The phases the CLI's progress lines named for operation id, in order, each once."""
    phases = []
    for line in stdout.splitlines():
        if line.startswith(f"upgrade {id}: ") or line.startswith(f"rollback {id}: "):
            phase = line.split(": ", 1)[1].split(",")[0].split(" (")[0]
            if not phases or phases[-1] != phase:
                phases.append(phase)
    return phases


def test_upgrade_v1_to_v2_with_the_cli(host, version):
    before = look(host)
    assert before["current"] == "unbounded-agent-blue" and before["version"] == f"unbounded-agent {version}"
    r = upgrade(host, host.urls["2.0.0"], "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    id = request_id(r)
    after = look(host)
    assert after["current"] == "unbounded-agent-green" and after["last_good"] == "unbounded-agent-blue"
    assert after["version"] == "unbounded-agent 2.0.0"
    assert after["last_good_sha"] == before["current_sha"]  # v1 kept byte for byte
    assert after["daemon_state"] == "active" and after["daemon_pid"] != before["daemon_pid"]
    rec = after["record"]
    assert rec["id"] == id and rec["phase"] == "committed" and rec["reason"] == "Succeeded"
    assert (rec["from"]["version"], rec["to"]["version"]) == (version, "2.0.0")
    phases = [h["phase"] for h in rec["history"]]
    assert phases == ["requested", "staging", "staged", "preflighted", "switching", "probation", "committed"]
    # the CLI showed a line for every phase the record went through (from its history), then the result
    assert shown_phases(r.stdout, id) == phases, r.stdout
    res = result(host, id)
    assert (res["succeeded"], res["reason"], res["source"]) == (True, "Succeeded", "cli")
    assert (res["from_version"], res["to_version"]) == (version, "2.0.0")
    assert r.stdout.splitlines()[-1] == f"upgrade {id} succeeded: {res['message']}"
    # the daemon that runs is the new binary: it said so when it started
    assert "version 2.0.0 starting" in host.journal("unbounded-agent-daemon.service")
    assert after["hidden_files"] == [] and queued(host) == []


def test_upgrade_v2_to_v3_with_systemctl_keeps_v2_as_last_good(host):
    before = look(host)
    unit = f"unbounded-upgrade@{escape(host, host.urls['3.0.0'])}.service"
    # the entry unit queues the request and returns once the upgrade is committed
    r = host.run(["systemctl", "start", unit], check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    after = look(host)
    assert after["current"] == "unbounded-agent-blue" and after["last_good"] == "unbounded-agent-green"
    assert after["version"] == "unbounded-agent 3.0.0" and after["last_good_sha"] == before["current_sha"]
    rec = after["record"]
    assert rec["phase"] == "committed" and rec["id"] != before["record"]["id"]
    res = result(host, rec["id"])
    assert (res["succeeded"], res["source"], res["to_version"]) == (True, "systemctl", "3.0.0")
    assert f"upgrade {rec['id']} succeeded" in journal(host, unit)
    # the chain is readable from systemd itself: each step its own unit, keyed by the request id
    switch, preflight, stage = (f"unbounded-upgrade-{s}@{rec['id']}.service" for s in ("switch", "preflight", "stage"))
    assert preflight in host.run(["systemctl", "show", "-p", "Requires", "--value", switch]).stdout.split()
    assert stage in host.run(["systemctl", "show", "-p", "Requires", "--value", preflight]).stdout.split()
    assert "staged unbounded-agent-blue" in journal(host, stage)


def test_rollback_returns_to_the_previous_binary(host):
    before = look(host)
    r = rollback(host, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    after = look(host)
    assert after["current"] == "unbounded-agent-green" and after["version"] == "unbounded-agent 2.0.0"
    assert after["last_good"] == "unbounded-agent-blue" and after["last_good_sha"] == before["current_sha"]
    rec = after["record"]
    assert rec["kind"] == "rollback" and rec["phase"] == "committed" and rec["id"] == request_id(r)
    assert "rolled back on request from 3.0.0 to 2.0.0" in rec["message"]
    assert result(host, rec["id"])["succeeded"] is True


def test_same_release_again_succeeds_without_a_restart(host):
    before = look(host)
    r = upgrade(host, host.urls["2.0.0"], "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    after = look(host)
    assert "no restart" in after["record"]["message"] and after["record"]["same_content"] is True
    assert (after["daemon_pid"], after["daemon_invocation"]) == (before["daemon_pid"], before["daemon_invocation"])
    assert {k: after[k] for k in ("current", "last_good", "current_sha")} == \
           {k: before[k] for k in ("current", "last_good", "current_sha")}


def test_requests_made_while_one_runs_wait_their_turn(host):
    before = look(host)
    hold(host, "unbounded-upgrade-stage@.service", "stage-before-extract")
    try:
        first = upgrade(host, host.urls["3.0.0"])  # no --wait: returns once the request is queued
        assert first.returncode == 0, first.stderr
        wait_held(host, "stage-before-extract")
        second = upgrade(host, host.urls["2.0.0"] + "?sig=topsecret")
        third = rollback(host)
        assert (second.returncode, third.returncode) == (0, 0), second.stderr + third.stderr
        ids = [request_id(r) for r in (first, second, third)]
        # the queue, as status shows it: the first runs, the others wait in the order they came
        st = json.loads(host.run(["unbounded-agent", "status", "--json"]).stdout)
        assert [(q["id"], q["state"]) for q in st["queue"]] == [
            (ids[0], "running"), (ids[1], "queued"), (ids[2], "queued")]
        assert f"queued: upgrade {ids[1]}" in host.run(["unbounded-agent", "status"]).stdout
        # a step started by hand for an operation that does not hold the host refuses, and changes nothing
        by_hand = f"unbounded-upgrade-stage@{ids[1]}.service"
        r = host.run(["systemctl", "start", by_hand], check=False, timeout=120)
        assert r.returncode != 0
        assert "HostLocked" in journal(host, by_hand)
        rec = look(host)["record"]
        assert (rec["id"], rec["phase"]) == (ids[0], "staging")
        assert look(host)["current_sha"] == before["current_sha"]
    finally:
        unhold(host, "unbounded-upgrade-stage@.service")
        release_hold(host, "stage-before-extract")
    results = [wait_until(f"the result of {id}", lambda id=id: result(host, id)) for id in ids]
    settle(host)
    assert [(r["kind"], r["succeeded"], r["to_version"]) for r in results] == [
        ("upgrade", True, "3.0.0"), ("upgrade", True, "2.0.0"), ("rollback", True, "3.0.0")]
    # one at a time, in order: each started only after the one before it had finished
    for earlier, later in zip(results, results[1:], strict=False):
        assert later["started_at"] >= earlier["finished_at"], (earlier, later)
    after = look(host)
    assert after["version"] == "unbounded-agent 3.0.0" and after["record"]["id"] == ids[2]
    assert queued(host) == []  # the request that carried the signed URL is gone with it
    everything = journal_but_the_release_server(host) + json.dumps(results)
    everything += json.dumps(after["record"]) + host.run(["unbounded-agent", "status"]).stdout
    assert "topsecret" not in everything
    assert host.run(["test", "-x", f"{BIN}/unbounded-agent-current"], check=False).returncode == 0


def test_status_shows_the_committed_upgrade(host):
    out = host.run(["unbounded-agent", "status"]).stdout
    assert "committed (2.0.0 → 3.0.0)" in out and "queue:       empty" in out
    st = json.loads(host.run(["unbounded-agent", "status", "--json"]).stdout)
    assert st["upgrade"]["phase"] == "committed" and st["upgrade"]["to"]["version"] == "3.0.0"
    assert st["results"][0]["succeeded"] is True and st["results"][0]["kind"] == "rollback"
    assert daemon(host)["ActiveState"] == "active"
