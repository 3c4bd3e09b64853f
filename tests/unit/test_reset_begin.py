"""The begin step: the "resetting" checkpoint for the run that holds the host, with the run's flags and where
the agent's files are — kept from an interrupted reset — and a refusal when no reset holds the host."""

import fcntl
import os

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import Reason
from unbounded_agent.reset import reports
from unbounded_agent.reset.reports import ResetRequest, read_checkpoint, read_report, write_request
from unbounded_agent.reset.runner import exit_code, run_step
from unbounded_agent.reset.steps import begin

RUN = "req-0001"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    cfg = tmp_path / "config.yaml"
    cfg.write_text("machineName: node-7\nbinDir: /opt/agent/bin\nstateDir: /var/lib/unbounded-agent\n")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg))
    return tmp_path


def run_begin(env, run_id=RUN, kind="reset"):
    with HostLock(run_id, kind).acquire():
        return run_step(begin.STEP, directory=env / "reset")


def test_begin_writes_the_checkpoint_with_the_request_and_where_the_agent_is(env):
    write_request(ResetRequest(run_id=RUN, all_wg=True, requested_by="test"), env / "reset")
    report = run_begin(env)
    assert (report.result, report.run_id, report.number, report.phase) == ("succeeded", RUN, 0, 0)
    cp = read_checkpoint(env / "reset")
    assert (cp.checkpoint, cp.run_id, cp.all_wg) == ("resetting", RUN, True)
    assert (cp.recorded.machine_name, cp.recorded.bin_dir, cp.recorded.state_dir) == (
        "node-7", "/opt/agent/bin", "/var/lib/unbounded-agent")
    assert cp.recorded.config_path == str(env / "config.yaml") and cp.recorded.config_error is None
    assert any(n.startswith("checkpoint written: resetting (agent bin dir /opt/agent/bin") for n in report.notes)
    assert read_report(0, "begin", env / "reset") == report


@pytest.mark.parametrize("request_", [None, ResetRequest(run_id="req-0000", all_wg=True)], ids=["none", "older-run"])
def test_all_wg_comes_only_from_this_runs_request(env, request_):
    if request_:
        write_request(request_, env / "reset")
    assert run_begin(env).succeeded
    assert read_checkpoint(env / "reset").all_wg is False


def test_begin_keeps_what_an_interrupted_reset_recorded(env):
    write_request(ResetRequest(run_id=RUN), env / "reset")
    run_begin(env)
    first = read_checkpoint(env / "reset")
    (env / "config.yaml").unlink()  # step 7 of the interrupted run removed it
    write_request(ResetRequest(run_id="req-0002", all_wg=True), env / "reset")
    report = run_begin(env, "req-0002")
    cp = read_checkpoint(env / "reset")
    assert cp.recorded == first.recorded and cp.created_at == first.created_at
    assert (cp.run_id, cp.all_wg) == ("req-0002", True)
    assert f"resuming the interrupted reset begun at {first.created_at}" in report.notes


def test_begin_of_phase_2_continues_its_own_run(env):
    write_request(ResetRequest(run_id=RUN), env / "reset")
    first_report = run_begin(env)
    first = read_checkpoint(env / "reset")
    again = run_begin(env)
    # not a resume: the checkpoint stays as it was, and the report keeps what the run's first begin said
    assert again.succeeded and again.notes == first_report.notes
    assert not any("resuming" in n for n in again.notes)
    assert read_checkpoint(env / "reset") == first


def test_a_broken_config_does_not_make_the_host_unresettable(env):
    (env / "config.yaml").write_text("binDir: relative/bin\n")
    report = run_begin(env)
    assert report.succeeded
    cp = read_checkpoint(env / "reset")
    assert (cp.recorded.bin_dir, cp.recorded.state_dir) == ("/var/lib/unbounded-agent/bin", "/var/lib/unbounded-agent")
    assert "binDir must be an absolute path" in cp.recorded.config_error
    assert any("cleaning the default locations" in n for n in report.notes)


@pytest.mark.parametrize("holder", [None, ("up-0009", "upgrade")], ids=["nobody", "an-upgrade"])
def test_begin_refuses_unless_a_reset_holds_the_host(env, holder):
    write_request(ResetRequest(run_id=RUN), env / "reset")
    if holder:
        report = run_begin(env, *holder)
    else:
        report = run_step(begin.STEP, directory=env / "reset")
    assert (report.result, report.reason, report.run_id) == ("failed", Reason.HOST_LOCKED.value, None)
    error = report.failed[0].error
    assert "no reset is running on this host" in error
    assert ("held by upgrade up-0009" in error) if holder else ("held by" not in error)
    assert not (env / "reset" / reports.CHECKPOINT).exists()
    assert read_report(0, "begin", env / "reset") == report
    assert exit_code(report) == 20


def test_begin_refuses_when_someone_else_flocks_the_host(env):
    # e.g. the upstream agent's bootstrap: it takes the same lock without our description.
    fd = os.open(os.environ["UNBOUNDED_AGENT_LOCK"], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        report = run_step(begin.STEP, directory=env / "reset")
    finally:
        os.close(fd)
    assert (report.result, report.reason) == ("failed", "HostLocked")
    assert f"held by pid {os.getpid()}" in report.failed[0].error
    assert not (env / "reset" / reports.CHECKPOINT).exists()
