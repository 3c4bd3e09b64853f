"""Recovery that always ends, and no phase that can be stranded.

- The daemon masked while recovery rolls back: the rollback ends in a terminal record (DaemonNotRestarted) with
  the host free, and the next upgrade is accepted (and, the daemon unmasked, committed).
- The state dir remounted read-only while a healthy release is on probation: the verdict's write is retried, and
  once the state dir can be written again the upgrade is committed.
- The state dir full while a crashing release is on probation: nothing can be written, yet the links flip and the
  daemon runs the previous binary again; the operation ends (StateUnwritable) with the host free, and once there
  is room the next run of the dispatcher finishes the record (rolled-back, quarantined).

The state dir is a small tmpfs of its own here, so it can be remounted and filled (and is read from inside
the host: a mount made there is not in the files the test sees from outside).
"""

import json
from pathlib import Path

import pytest
import releases
from queue_host import submit, wait_result
from upgrade_host import CONFIG, STATE, TEST_CONFIG, daemon, hold, journal, look, prepare, unhold, upgrade, wait_until

pytestmark = pytest.mark.testhost
REPO = Path(__file__).resolve().parents[2]
DAEMON = "unbounded-agent-daemon.service"
PROBATION = "unbounded-upgrade-probation.service"
RECOVERY = "unbounded-agent-daemon-recovery.service"


@pytest.fixture(scope="module")
def host(testhost_factory, deb_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ends")
    with testhost_factory("ends") as h:  # a bare host: the package seeds its slots into the tmpfs
        h.run(["mkdir", "-p", STATE])
        h.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", STATE])
        h.install_deb(deb_path)
        prepare(h)
        h.urls = {"2.0.0": h.serve(releases.real_release(REPO, "2.0.0", out / "v2"), "agent-2.0.0.tar.gz"),
                  "3.0.0": h.serve(releases.real_release(REPO, "3.0.0", out / "v3"), "agent-3.0.0.tar.gz")}
        h.urls["crash"] = h.serve(releases.script_release(out / "crash.tar.gz", version="9.1.0", daemon="crash"),
                                  "crash.tar.gz")
        h.urls["never-ready"] = h.serve(releases.script_release(out / "nr.tar.gz", version="9.2.0", daemon="never-ready"),
                                        "never-ready.tar.gz")
        yield h


def read(host, path: str) -> dict | None:
    r = host.run(["cat", path], check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def record(host) -> dict | None:
    return read(host, f"{STATE}/upgrade.json")


def wait_held(host, point: str) -> None:
    marker = f"{STATE}/test-hold/{point}"
    wait_until(f"a step to reach hold point {point}", lambda: host.run(["test", "-e", marker], check=False).returncode == 0)


def release_hold(host, point: str) -> None:
    host.run(["rm", "-f", f"{STATE}/test-hold/{point}"])


def settled(host) -> dict:
    """The record once it is final and the dispatcher is done with it."""
    return wait_until("the upgrade to settle", lambda: (r := record(host)) and r["phase"] in
                      ("committed", "failed", "rolled-back") and dispatcher_idle(host) and r)


def dispatcher_idle(host) -> bool:
    return host.run(["systemctl", "is-active", "unbounded-agent-dispatch.service"], check=False).stdout.strip() \
        in ("inactive", "failed")


def test_a_masked_daemon_during_recovery_ends_in_a_terminal_record_and_the_next_upgrade_runs(host, version):
    before = look(host)
    hold(host, RECOVERY, "recovery-before-restart")
    try:
        id = submit(host, "upgrade", host.urls["crash"])
        wait_held(host, "recovery-before-restart")
        host.run(["systemctl", "mask", "--runtime", DAEMON])
    finally:
        release_hold(host, "recovery-before-restart")
        unhold(host, RECOVERY)
    res = wait_result(host, id)
    assert (res["succeeded"], res["reason"]) == (False, "DaemonNotRestarted") and "masked" in res["message"]
    rec = record(host)
    assert rec["phase"] == "rolled-back" and rec["restored_daemon"] == "masked"
    assert look(host)["current"] == before["current"]  # rolled back all the same
    wait_until("the dispatcher to let the host go", lambda: dispatcher_idle(host))
    st = json.loads(host.run(["unbounded-agent", "status", "--json"]).stdout)
    assert st["queue"] == []
    host.run(["systemctl", "unmask", "--runtime", DAEMON])
    r = upgrade(host, host.urls["2.0.0"], "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert settled(host)["phase"] == "committed" and daemon(host)["ActiveState"] == "active"


def test_a_read_only_state_dir_during_probation_is_waited_out_then_committed(host):
    host.write(CONFIG, TEST_CONFIG.replace("probationSeconds: 3", "probationSeconds: 15"))
    host.run(["systemctl", "daemon-reload"])
    try:
        id = submit(host, "upgrade", host.urls["3.0.0"])
        wait_until("probation to watch", lambda: "probation for 15 s" in journal(host, PROBATION, lines=10))
        host.run(["mount", "-o", "remount,ro", STATE])
        try:
            wait_until("the verdict's write to be refused and retried",
                       lambda: "Read-only file system; retrying" in journal(host, PROBATION, lines=20), timeout=120)
        finally:
            host.run(["mount", "-o", "remount,rw", STATE])
        res = wait_result(host, id)
        assert res["succeeded"] and res["to_version"] == "3.0.0", res
        assert record(host)["phase"] == "committed"
    finally:
        host.write(CONFIG, TEST_CONFIG)
        host.run(["systemctl", "daemon-reload"])


def test_a_full_state_dir_during_probation_still_rolls_back_and_the_operation_ends(host):
    """A release that never reports ready: probation waits out its ready timeout (8 s), and the state dir is
    filled meanwhile, so the verdict, the quarantine and the record cannot be written."""
    before = look(host)
    id = submit(host, "upgrade", host.urls["never-ready"])
    wait_until("probation to watch", lambda: (r := record(host) or {}).get("id") == id and r["phase"] == "probation")
    try:
        host.run(["sh", "-c", f"dd if=/dev/zero of={STATE}/filler bs=1M 2>/dev/null; true"])
        assert host.run(["sh", "-c", f"echo x > {STATE}/probe"], check=False).returncode != 0  # full
        res = wait_result(host, id, timeout=600)
        assert (res["succeeded"], res["reason"]) == (False, "StateUnwritable") and "No space left" in res["message"]
        # nothing could be written, yet the node runs the previous binary again
        after = look(host)
        assert (after["current"], after["current_sha"]) == (before["current"], before["current_sha"])
        assert after["version"] == before["version"] and after["daemon_state"] == "active"
        assert record(host)["phase"] == "probation"  # as the disk left it
        assert "before it reported ready" in journal(host, PROBATION, lines=300) or \
            "did not report ready" in journal(host, PROBATION, lines=300)  # systemd's TimeoutStartSec= or probation first
        wait_until("the dispatcher to let the host go", lambda: dispatcher_idle(host))
    finally:
        host.run(["rm", "-f", f"{STATE}/filler"])
    # room again: the next run of the dispatcher finishes what it could not record
    host.run(["systemctl", "start", "unbounded-agent-dispatch.service"])
    rec = wait_until("the record to be finished", lambda: (r := record(host)) and r["phase"] == "rolled-back" and r)
    assert "state dir refused writes" in rec["failure"]["detail"]  # the failure itself is in the journal
    assert rec["restored_daemon"] == "active"
    quarantined = read(host, f"{STATE}/quarantine.json")["entries"]
    assert any(e["version"] == "9.2.0" for e in quarantined)
    assert look(host)["current_sha"] == before["current_sha"]
