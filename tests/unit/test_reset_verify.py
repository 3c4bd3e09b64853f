"""The verify step, last of phase 1: it succeeds only when every step of this run that can fail succeeded and a
fresh inventory finds nothing of them left — the running daemon aside, which phase 2 stops. It keeps the
checkpoint (finish removes it)."""

import pytest
from reset_fakes import reset_run

from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import reports
from unbounded_agent.reset.reports import read_report, write_report
from unbounded_agent.reset.runner import exit_code
from unbounded_agent.reset.steps import remove_links, verify

RUN = "req-0001"


@pytest.fixture
def env(tmp_path, monkeypatch):
    with reset_run(tmp_path, monkeypatch) as e:
        yield e


def test_verify_passes_with_the_daemon_still_running_and_keeps_the_checkpoint(env):
    env.write("/etc/wireguard/server.priv")
    env.write("/var/lib/unbounded-agent/bin/unbounded-agent-blue")
    assert all(r.succeeded for r in env.run_phase(1, but=[verify.STEP]))
    assert env.units.running_units == {"unbounded-agent-daemon.service"}  # nobody stopped it
    report = env.run(verify.STEP)
    assert (report.result, report.run_id) == ("succeeded", RUN), report
    assert report.notes == ["verified: nothing of the agent is left but its running daemon"]
    assert (env.dir / reports.CHECKPOINT).exists() and (env.dir / reports.REQUEST).exists()
    assert read_report(9, "verify", env.dir) == report


def test_verify_fails_when_something_is_left(env):
    env.run_phase(1, but=[verify.STEP])
    env.write("/etc/wireguard/server.priv")  # came back (or was never removed)
    env.write("/var/lib/unbounded-agent/upgrade.json")
    report = env.run(verify.STEP)
    assert (report.result, report.reason) == ("failed", "ResetIncomplete")
    assert "file /etc/wireguard/server.priv is still there" in report.failed[0].error
    assert "directory /var/lib/unbounded-agent is still there" in report.failed[0].error
    assert exit_code(report) == 24


def test_verify_fails_when_a_step_failed_or_did_not_run_in_this_run(env):
    reports_ = env.run_phase(1, but=[verify.STEP])
    failed = next(r for r in reports_ if r.step == "remove-agent")
    failed.result, failed.reason = "failed", Reason.UNSAFE_REMOVAL.value
    write_report(failed, env.dir)
    stale = next(r for r in reports_ if r.step == "remove-nspawn-config")
    stale.run_id = "req-0000"  # left by an earlier reset
    write_report(stale, env.dir)
    (env.dir / "reports" / "03-remove-wireguard-keys.json").unlink()
    report = env.run(verify.STEP)
    assert (report.result, report.reason) == ("failed", "ResetIncomplete")
    error = report.failed[0].error
    for problem in ("remove-wireguard-keys did not run in this reset", "remove-nspawn-config did not run in this reset",
                    "remove-agent failed (UnsafeRemoval)"):
        assert problem in error
    assert "stop-daemon" not in error  # phase 2's steps are not this step's to check


def test_an_inventory_that_cannot_be_read_is_not_taken_for_nothing_left(env, monkeypatch):
    env.run_phase(1, but=[verify.STEP])

    def unreadable(self, ctx):
        raise OpsError(Reason.INVENTORY_FAILED, "cannot list network links over netlink: EPERM")

    monkeypatch.setattr(remove_links.RemoveLinks, "plan", unreadable)
    report = env.run(verify.STEP)
    assert (report.result, report.reason) == ("failed", "ResetIncomplete")
    assert "remove-links: cannot list network links over netlink: EPERM" in report.failed[0].error
