"""`kill -9` of each step at its most delicate point, and a power loss (every process of the host killed at
once, then a boot) at the points that matter, each converging without help: before the switch the
upgrade fails and the old binary keeps running; after it, the new one goes back on probation and is
committed; a rollback in progress finishes. Never a dangling link, a half-written slot made current,
or an operation stuck in progress.

Steps are paused at named points through a test-only environment variable set in a runtime drop-in
(upgrade.hold_point); the drop-in is removed before the kill, so the step's re-run does not pause."""

import pytest

import releases
from upgrade_host import (BIN, STATE, hold, look, power_cycle, prepare, settle, unhold, upgrade,
                          wait_held)

pytestmark = pytest.mark.testhost

STAGE, PREFLIGHT, SWITCH = ("unbounded-upgrade-stage@.service", "unbounded-upgrade-preflight@.service",
                            "unbounded-upgrade-switch@.service")
PROBATION, RECOVERY = "unbounded-upgrade-probation.service", "unbounded-agent-daemon-recovery.service"

# id: (unit to hold, hold point, "kill" or "power", release: "good" or "crash", expected final phase)
POINTS = {
    "stage killed while downloading": (STAGE, "stage-before-extract", "kill", "good", "failed"),
    "stage killed before the slot rename": (STAGE, "stage-before-rename", "kill", "good", "failed"),
    "preflight killed while running the candidate": (PREFLIGHT, "preflight-before-run", "kill", "good", "failed"),
    "switch killed before the links move": (SWITCH, "switch-before-links", "kill", "good", "failed"),
    "switch killed after the links moved": (SWITCH, "switch-before-restart", "kill", "good", "committed"),
    "probation killed while watching": (PROBATION, "probation-watching", "kill", "good", "committed"),
    "recovery killed before the links move back": (RECOVERY, "recovery-before-links", "kill", "crash", "rolled-back"),
    "recovery killed before the restart": (RECOVERY, "recovery-before-restart", "kill", "crash", "rolled-back"),
    "power lost before the slot rename": (STAGE, "stage-before-rename", "power", "good", "failed"),
    "power lost after the links moved": (SWITCH, "switch-before-restart", "power", "good", "committed"),
    "power lost on probation": (PROBATION, "probation-watching", "power", "good", "committed"),
    "power lost while recovering": (RECOVERY, "recovery-before-restart", "power", "crash", "rolled-back"),
}


@pytest.fixture(scope="module")
def host(testhost_factory, deb_path, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("crash-points")
    with testhost_factory("crashpts") as h:
        prepare(h, deb_path)
        h.good = {v: h.serve(releases.real_release(repo_root, v, out / v), f"good-{v}.tar.gz") for v in ("2.0.0", "3.0.0")}
        h.crash = [h.serve(releases.script_release(out / f"crash-{i}.tar.gz", version=f"8.{i}.0", daemon="crash"),
                           f"crash-{i}.tar.gz") for i in range(len(POINTS))]
        yield h


def next_good(host, current_version: str) -> tuple[str, str]:
    v = "3.0.0" if current_version.endswith("2.0.0") else "2.0.0"
    return v, host.good[v]


@pytest.mark.parametrize("name", POINTS)
def test_interrupted_upgrade_converges(host, name):
    unit, point, how, kind, expected = POINTS[name]
    host.run(["rm", "-rf", f"{STATE}/test-hold"])
    before = look(host)
    if kind == "good":
        target_version, url = next_good(host, before["version"])
    else:
        target_version, url = None, host.crash[list(POINTS).index(name)]
    hold(host, unit, point)
    try:
        r = upgrade(host, url)
        assert r.returncode == 0, r.stderr
        pid = wait_held(host, point)
    finally:
        unhold(host, unit)
    if how == "kill":
        host.run(["kill", "-9", str(pid)])  # the step's own process, as an operator's kill -9 would
    else:
        power_cycle(host)
    rec = settle(host)
    after = look(host)

    assert rec["phase"] == expected, rec
    assert rec["reason"] == {"failed": "ExecutionFailed", "committed": "Succeeded", "rolled-back": "DaemonFailed"}[expected]
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
    # resume is what noticed and converged it, and said so
    assert rec["operation"] in host.journal("unbounded-upgrade-resume*")


def test_status_is_clean_after_all_that(host):
    out = host.run(["unbounded-agent", "status"]).stdout
    assert "dangling" not in out and "daemon:      active (running)" in out
    failed_units = host.run(["systemctl", "list-units", "--failed", "--no-legend", "unbounded-agent-daemon*"]).stdout
    assert failed_units.strip() == ""
