"""A release that reports ready, then exits 1 fifteen seconds later, every time: with the default probation
(10 s) it is committed, and `unbounded-agent upgrade --wait` says so. After the commit its daemon crash-loops
(one 15 s life per 20 s: the start limit is never reached). The daemon unit's ExecStopPost= counts each crash
against the committed binary; the third within the window queues a recover request, and the dispatcher rolls
back to the previous binary: the daemon is active on it again, the upgrade's record and result say
DaemonFailedAfterCommit with the exit detail and the crashed run's journal lines, `unbounded-agent status`
shows it, and the release is quarantined. The time from the first crash to the previous binary active is
printed for the closing note (measured, never asserted)."""

import json

import pytest
import releases
from upgrade_host import (
    STATE,
    daemon,
    look,
    phase_time,
    prepare,
    record,
    request_id,
    result,
    settle,
    upgrade,
    wait_until,
)

pytestmark = pytest.mark.testhost
LIFE_SECONDS = 15  # ready, then exit 1 this long after
CRASHES = 3  # upgrade/crashes.py: CRASHES within WINDOW_SECONDS of the commit


@pytest.fixture(scope="module")
def host(testhost_factory):
    with testhost_factory("late-crash", installed=True) as h:
        prepare(h, config="")  # every setting at its default: probationSeconds 10, readyTimeoutSeconds 60
        yield h


def unix_time(host, prop: str) -> float:
    """A timestamp of the daemon unit, in seconds since the epoch (microseconds from the bus)."""
    out = host.run(["busctl", "get-property", "org.freedesktop.systemd1",
                    "/org/freedesktop/systemd1/unit/unbounded_2dagent_2ddaemon_2eservice",
                    "org.freedesktop.systemd1.Unit", prop]).stdout.split()
    return int(out[1]) / 1e6


def test_a_release_that_crashes_after_its_commit_is_rolled_back(host, version, tmp_path, capsys):
    url = host.serve(releases.script_release(tmp_path / "late.tar.gz", version="9.5.0", daemon="late-crash",
                                             seconds=LIFE_SECONDS), "late.tar.gz")
    before = look(host)
    r = upgrade(host, url, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr  # committed: it was ready and stayed up for 10 s
    id = request_id(r)
    assert result(host, id)["succeeded"] and record(host)["phase"] == "committed"

    rec = wait_until("the rollback after the commit", lambda: (x := record(host)) and x["phase"] == "rolled-back" and x,
                     timeout=600)
    settle(host)
    after = look(host)
    # back on the previous binary, byte for byte, and running it
    assert after["current"] == before["current"] and after["current_sha"] == before["current_sha"]
    assert after["version"] == f"unbounded-agent {version}" and after["daemon_state"] == "active"
    # the record: committed, then re-opened and rolled back, with the reason, the exit detail and the journal
    assert [h["phase"] for h in rec["history"]][-4:] == ["probation", "committed", "recovering", "rolled-back"]
    assert rec["after_commit"] and rec["reason"] == "DaemonFailedAfterCommit" and rec["restored_daemon"] == "active"
    assert rec["failure"]["exit_code"] == 1 and f"crashed {CRASHES} times within" in rec["failure"]["detail"]
    assert any("fatal: crashed late (simulated)" in line for line in rec["failure"]["journal"]), rec["failure"]
    assert "version 9.5.0 failed after its commit" in rec["message"]
    # on the third crash of the committed binary, as the window's rule says: not before, and not the start limit
    exits = json.loads(host.read(f"{STATE}/daemon-exits.json"))["exits"]
    committed = phase_time(rec, "committed")
    crashed = [e for e in exits if e["t"] >= committed and e["digest"] == rec["to"]["digest"]]
    assert len(crashed) == CRASHES and {e["exit_status"] for e in crashed} == {"1"}
    assert all(e["t"] < phase_time(rec, "recovering") for e in crashed)
    assert "Start request repeated too quickly" not in host.journal("unbounded-agent-daemon.service", lines=400)
    # the upgrade's own result, and the recover request's
    res = result(host, id)
    assert res["succeeded"] and res["after_commit"]["reason"] == "DaemonFailedAfterCommit"
    assert res["after_commit"]["failure"]["exit_code"] == 1
    rec_res = result(host, res["after_commit"]["request"])
    assert (rec_res["kind"], rec_res["source"], rec_res["succeeded"]) == ("recover", "daemon", True)
    assert (rec_res["from_version"], rec_res["to_version"]) == ("9.5.0", version)
    # status says it, and the release is quarantined
    out = host.run(["unbounded-agent", "status"]).stdout
    assert "rolled-back after its commit" in out and "then rolled back after its commit (DaemonFailedAfterCommit)" in out
    assert "quarantined: version 9.5.0" in out
    again = upgrade(host, url, "--wait")
    assert again.returncode == 17 and "quarantined" in again.stderr
    active = unix_time(host, "ActiveEnterTimestamp")
    at = ", ".join(f"+{e['t'] - committed:.1f}" for e in crashed)
    with capsys.disabled():
        print(f"\nlate crash: first crash → last-good active {active - crashed[0]['t']:.1f} s "
              f"(crashes at {at} s after the commit)")
    assert daemon(host)["ActiveState"] == "active"
