"""A new agent that passes preflight but whose daemon fails under systemd — crashing at once, crashing a
few seconds after it reported ready, dying by a signal, or never becoming ready — is rolled back by
probation to the binary it replaced: the daemon runs the old version again, the record says
DaemonFailed with the real exit detail and journal lines, and the release is quarantined (refused
next time unless --force)."""

import json

import pytest
import releases
from upgrade_host import daemon, journal, look, prepare, request_id, result, settle, upgrade

pytestmark = pytest.mark.testhost

CASES = {
    # name: (script daemon behaviour, what the failure must say)
    "crash at once": ("crash", {"exit_code": 3}),
    "crash after ready": ("crash-after", {"exit_code": 4}),
    "killed by a signal after ready": ("segfault", {"signal": "SIGSEGV"}),
    "never ready": ("never-ready", {"detail": "did not report ready within 8 s"}),
}
JOURNAL_WORDS = {"crash": "cannot start (simulated)", "crash-after": "crashed after ready (simulated)",
                 "never-ready": "starting, never ready", "segfault": "status=11/SEGV"}


@pytest.fixture(scope="module")
def host(testhost_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("crashing")
    with testhost_factory("crashing", installed=True) as h:
        prepare(h)
        h.urls = {name: h.serve(releases.script_release(out / f"{i}.tar.gz", version=f"9.{i}.0", daemon=behaviour,
                                                        seconds=1.5), f"crash-{i}.tar.gz")
                  for i, (name, (behaviour, _)) in enumerate(CASES.items())}
        h.urls["onfailure only"] = h.serve(releases.script_release(out / "of.tar.gz", version="9.9.0", daemon="crash"),
                                           "crash-onfailure.tar.gz")
        yield h


@pytest.mark.parametrize("name", CASES)
def test_failing_daemon_rolls_back_to_last_good(host, name, version):
    behaviour, expect = CASES[name]
    before = look(host)
    r = upgrade(host, host.urls[name], "--wait")
    assert r.returncode == 15, r.stdout + r.stderr  # DaemonFailed
    assert "DaemonFailed" in r.stderr and "rolled back" in r.stderr
    rec = settle(host)
    after = look(host)
    # back where it was, byte for byte, and running
    assert after["current"] == before["current"] and after["current_sha"] == before["current_sha"]
    assert after["last_good"] == before["current"]
    assert after["version"] == f"unbounded-agent {version}" and after["daemon_state"] == "active"
    assert f"version {version} starting" in journal(host, "unbounded-agent-daemon.service", lines=15)
    # the record and the rollback signal carry the real failure
    assert rec["phase"] == "rolled-back" and rec["reason"] == "DaemonFailed"
    for key, value in expect.items():
        assert str(value) in str(rec["failure"][key]), rec["failure"]
    # probation caught it (within its bound), not the daemon's start limit through OnFailure=
    assert "failed under systemd" not in rec["failure"]["detail"]
    assert [h["phase"] for h in rec["history"]][-3:] == ["probation", "recovering", "rolled-back"]
    # the operation's result says the same, with the same failure
    res = result(host, request_id(r))
    assert (rec["id"], res["succeeded"], res["reason"]) == (res["id"], False, "DaemonFailed")
    assert res["failure"] == rec["failure"] and res["message"] == rec["message"]
    signal = json.loads(host.read("/var/lib/unbounded-agent/rollback-signal.json"))
    assert signal["operation"] == rec["operation"] and signal["failed"]["digest"] == rec["to"]["digest"]
    assert signal["failed"]["version"] == rec["to"]["version"]
    assert any(JOURNAL_WORDS[behaviour] in line for line in signal["failure"]["journal"]), signal["failure"]["journal"]
    # only the failed run's lines, not the previous daemon's goodbye
    assert not any("received SIGTERM" in line for line in signal["failure"]["journal"]), signal["failure"]["journal"]
    # quarantined: refused next time, with a clear message
    again = upgrade(host, host.urls[name], "--wait")
    assert again.returncode == 17 and "quarantined" in again.stderr and "--force" in again.stderr
    assert look(host)["daemon_pid"] == after["daemon_pid"]


def test_status_shows_the_rollback_and_the_quarantine(host):
    out = host.run(["unbounded-agent", "status"]).stdout
    assert "rolled back: " in out and "rolled back to 0.1.0" in out and "quarantined:" in out
    assert out.count("quarantined:") == len(CASES)
    st = json.loads(host.run(["unbounded-agent", "status", "--json"]).stdout)
    assert st["rollback_signal"]["failed"]["version"] == "9.3.0"  # the last case


def test_force_tries_a_quarantined_release_again(host):
    before = look(host)
    r = upgrade(host, host.urls["crash at once"], "--wait", "--force")
    assert r.returncode == 15, r.stdout + r.stderr  # it is still broken: rolled back again
    rec = settle(host)
    assert rec["force"] is True and rec["phase"] == "rolled-back"
    assert look(host)["current_sha"] == before["current_sha"]
    assert daemon(host)["ActiveState"] == "active"


def test_daemon_onfailure_rolls_back_even_without_probation(host, version):
    """The second path: with the probation unit unable to start, the daemon's own OnFailure= (at its
    start limit) runs recovery, which finds the upgrade on probation and rolls it back."""
    before = look(host)
    host.run(["systemctl", "mask", "--runtime", "unbounded-upgrade-probation.service"])
    try:
        r = upgrade(host, host.urls["onfailure only"], "--wait")
    finally:
        host.run(["systemctl", "unmask", "--runtime", "unbounded-upgrade-probation.service"])
    assert r.returncode == 15, r.stdout + r.stderr
    rec = settle(host)
    assert rec["phase"] == "rolled-back" and "failed under systemd" in rec["failure"]["detail"]
    assert rec["failure"]["exit_code"] == 3
    # the operation waited for it: its result is the rollback, not the probation unit that could not start
    assert result(host, request_id(r))["reason"] == "DaemonFailed"
    after = look(host)
    assert after["current_sha"] == before["current_sha"] and after["version"] == f"unbounded-agent {version}"
    assert "Triggering OnFailure= dependencies" in journal(host, "unbounded-agent-daemon.service", lines=100)
