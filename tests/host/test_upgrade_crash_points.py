"""`kill -9` of each step at its most delicate point, of the dispatcher in the middle of an operation, and a
power loss (every process of the host killed at once, then a boot) at the points that matter, each
converging without help: before the switch the upgrade fails and the old binary keeps running; after it,
the new one goes back on probation and is committed; a rollback in progress finishes. Never a dangling
link, a half-written slot made current, or an operation stuck in progress: every operation ends in a
terminal record and a result.

Who converges it: a killed step leaves its unit failed and the record mid-phase; the dispatcher, which
holds the host for the operation and sees no unit of it at work, decides the record. A killed dispatcher
is started again by unbounded-agent-requests.path (its claimed request is still in the spool) and goes on
with the same operation. After a power loss the dispatcher starts at boot and does the same.

Steps are paused at named points through a test-only environment variable set in a runtime drop-in
(holdpoint.py); the drop-in is removed before the kill, so the step's re-run does not pause."""

import json

import pytest
import releases
from upgrade_host import (
    BIN,
    DISPATCH,
    STATE,
    daemon,
    hold,
    journal,
    look,
    power_cycle,
    prepare,
    release_hold,
    request_id,
    result,
    settle,
    unhold,
    upgrade,
    wait_held,
    wait_until,
)

pytestmark = pytest.mark.testhost

STAGE, PREFLIGHT, SWITCH = ("unbounded-upgrade-stage@.service", "unbounded-upgrade-preflight@.service",
                            "unbounded-upgrade-switch@.service")
PROBATION, RECOVERY = "unbounded-upgrade-probation.service", "unbounded-agent-daemon-recovery.service"

# id: (unit to hold, hold point, what is killed: "step", "dispatcher" or "power", release: "good" or "crash",
#      expected final phase)
POINTS = {
    "stage killed while downloading": (STAGE, "stage-before-extract", "step", "good", "failed"),
    "stage killed before the slot rename": (STAGE, "stage-before-rename", "step", "good", "failed"),
    "preflight killed while running the candidate": (PREFLIGHT, "preflight-before-run", "step", "good", "failed"),
    "switch killed before the links move": (SWITCH, "switch-before-links", "step", "good", "failed"),
    "switch killed after the links moved": (SWITCH, "switch-before-restart", "step", "good", "committed"),
    "probation killed while watching": (PROBATION, "probation-watching", "step", "good", "committed"),
    "recovery killed before the links move back": (RECOVERY, "recovery-before-links", "step", "crash", "rolled-back"),
    "recovery killed before the restart": (RECOVERY, "recovery-before-restart", "step", "crash", "rolled-back"),
    "dispatcher killed while the stage runs": (STAGE, "stage-before-extract", "dispatcher", "good", "committed"),
    "dispatcher killed before the switch": (SWITCH, "switch-before-links", "dispatcher", "good", "committed"),
    "dispatcher killed on probation": (PROBATION, "probation-watching", "dispatcher", "good", "committed"),
    "dispatcher killed while recovering": (RECOVERY, "recovery-before-links", "dispatcher", "crash", "rolled-back"),
    "power lost before the slot rename": (STAGE, "stage-before-rename", "power", "good", "failed"),
    "power lost after the links moved": (SWITCH, "switch-before-restart", "power", "good", "committed"),
    "power lost on probation": (PROBATION, "probation-watching", "power", "good", "committed"),
    "power lost while recovering": (RECOVERY, "recovery-before-restart", "power", "crash", "rolled-back"),
}
REASON = {"failed": "ExecutionFailed", "committed": "Succeeded", "rolled-back": "DaemonFailed"}
LOCK = "/run/unbounded-agent-install.lock"


@pytest.fixture(scope="module")
def host(testhost_factory, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("crash-points")
    with testhost_factory("crashpts", installed=True) as h:
        prepare(h)
        h.good = {v: h.serve(releases.real_release(repo_root, v, out / v), f"good-{v}.tar.gz") for v in ("2.0.0", "3.0.0")}
        h.crash = [h.serve(releases.script_release(out / f"crash-{i}.tar.gz", version=f"8.{i}.0", daemon="crash"),
                           f"crash-{i}.tar.gz") for i in range(len(POINTS))]
        yield h


def next_good(host, current_version: str) -> tuple[str, str]:
    v = "3.0.0" if current_version.endswith("2.0.0") else "2.0.0"
    return v, host.good[v]


def lock_holder(host) -> dict:
    """The host-operation lock's description (hostlock.py), {} when nobody wrote one."""
    text = host.run(["cat", LOCK], check=False).stdout.strip()
    return json.loads(text) if text else {}


def kill_the_dispatcher(host, id: str) -> int:
    """kill -9 of the dispatcher that runs operation id; returns once a new one holds the host for it."""
    pid = int(daemon(host, DISPATCH)["MainPID"])
    assert pid > 0 and lock_holder(host).get("pid") == pid and lock_holder(host).get("operation") == id
    host.run(["kill", "-9", str(pid)])

    def taken_over():
        new = int(daemon(host, DISPATCH)["MainPID"])
        held = lock_holder(host)
        return new not in (0, pid) and held.get("pid") == new and held.get("operation") == id
    wait_until("a new dispatcher to hold the host for the same operation", taken_over, timeout=60)
    return pid


@pytest.mark.parametrize("name", POINTS)
def test_interrupted_upgrade_converges(host, name):
    unit, point, how, kind, expected = POINTS[name]
    # each case on its own: a release another case rolled back (a daemon that systemd itself failed to start
    # under load, say) must not be refused here as quarantined
    host.run(["rm", "-rf", f"{STATE}/test-hold", f"{STATE}/quarantine.json"])
    before = look(host)
    if kind == "good":
        target_version, url = next_good(host, before["version"])
    else:
        target_version, url = None, host.crash[list(POINTS).index(name)]
    hold(host, unit, point)
    try:
        r = upgrade(host, url)
        assert r.returncode == 0, r.stderr
        id = request_id(r)
        pid = wait_held(host, point)
    finally:
        unhold(host, unit)
    if how == "step":
        host.run(["kill", "-9", str(pid)])  # the step's own process, as an operator's kill -9 would
    elif how == "dispatcher":
        kill_the_dispatcher(host, id)
        release_hold(host, point)  # the step goes on, under the new dispatcher's hold
    else:
        power_cycle(host)
    rec = settle(host)
    after = look(host)

    assert rec["id"] == id and rec["phase"] == expected, rec
    assert rec["reason"] == REASON[expected]
    # the operation ended with a result that says the same
    res = result(host, id)
    assert (res["succeeded"], res["reason"]) == (expected == "committed", REASON[expected]), res
    # both links resolve to executable slots; the daemon runs what current selects
    assert after["current"] in ("unbounded-agent-blue", "unbounded-agent-green") and after["current_sha"]
    assert after["last_good"] in ("unbounded-agent-blue", "unbounded-agent-green") and after["last_good_sha"]
    assert after["daemon_state"] == "active" and after["version"].startswith("unbounded-agent ")
    assert host.run(["test", "-x", f"{BIN}/unbounded-agent-current"], check=False).returncode == 0
    if expected == "committed":
        assert after["version"] == f"unbounded-agent {target_version}"
        assert after["current_sha"] == rec["to"]["digest"] and after["last_good_sha"] == before["current_sha"]
        assert after["daemon_invocation"] != before["daemon_invocation"]
    else:
        # the old binary, byte for byte, and selected by current again
        assert after["current_sha"] == before["current_sha"] and after["version"] == before["version"]
        if expected == "failed":
            assert "interrupted" in rec["message"]
    assert after["hidden_files"] == []  # no temp file of the killed step is left
    # who converged it, and said so
    dispatcher_log = journal(host, DISPATCH, lines=2000)
    if how == "step":
        assert f"no unit of {id} is at work: deciding" in dispatcher_log
    else:  # a new dispatcher went on with the claimed request
        assert f"{id}, from cli): going on after an interruption (attempt 2)" in dispatcher_log


def test_status_is_clean_after_all_that(host):
    out = host.run(["unbounded-agent", "status"]).stdout
    assert "dangling" not in out and "daemon:      active (running)" in out and "queue:       empty" in out
    failed_units = host.run(["systemctl", "list-units", "--failed", "--no-legend", "unbounded-agent-daemon*"]).stdout
    assert failed_units.strip() == ""
