"""The finish step, last of phase 2: the checkpoint (and the request) go only when every step of this run
succeeded and a fresh inventory finds nothing left, the daemon included; otherwise they stay, so the next
reset resumes."""

import pytest
from reset_fakes import reset_run

from unbounded_agent.reset import reports
from unbounded_agent.reset.reports import read_report
from unbounded_agent.reset.steps import finish

RUN = "req-0001"


@pytest.fixture
def env(tmp_path, monkeypatch):
    with reset_run(tmp_path, monkeypatch) as e:
        yield e


def test_finish_removes_the_checkpoint_only_after_a_clean_run(env):
    env.write("/etc/wireguard/server.priv")
    env.write("/var/lib/unbounded-agent/bin/unbounded-agent-blue")
    assert all(r.succeeded for r in env.run_phase(1))
    assert all(r.succeeded for r in env.run_phase(2, but=[finish.STEP]))
    assert env.units.calls[-1] == ("reload",)
    report = env.run(finish.STEP)
    assert (report.result, report.run_id) == ("succeeded", RUN), report
    assert report.notes == ["verified: no agent artifact is left; checkpoint removed"]
    assert not (env.dir / reports.CHECKPOINT).exists() and not (env.dir / reports.REQUEST).exists()
    assert read_report(10, "finish", env.dir) == report


def test_a_daemon_still_running_keeps_the_checkpoint(env):
    env.run_phase(1)
    env.units.stuck = {"unbounded-agent-daemon.service"}
    env.run_phase(2, but=[finish.STEP])
    report = env.run(finish.STEP)
    assert (report.result, report.reason) == ("failed", "ResetIncomplete")
    assert "stop-daemon failed (ExecutionFailed)" in report.failed[0].error
    assert "running unit unbounded-agent-daemon.service is still there" in report.failed[0].error
    assert (env.dir / reports.CHECKPOINT).exists() and (env.dir / reports.REQUEST).exists()


def test_something_left_by_phase_1_keeps_the_checkpoint(env):
    env.run_phase(1)
    env.run_phase(2, but=[finish.STEP])
    env.write("/etc/unbounded/agent/config.yaml")  # came back after phase 1
    report = env.run(finish.STEP)
    assert "directory /etc/unbounded/agent is still there" in report.failed[0].error
    assert (env.dir / reports.CHECKPOINT).exists()
