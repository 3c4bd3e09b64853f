"""Step 7's end, after the gate: stop and disable the daemon; the state directory systemd makes again for a
daemon restarted after its files went goes too; a daemon that does not stop fails the step."""

import pytest
from reset_fakes import DAEMON, reset_run

from unbounded_agent.reset.steps import stop_daemon


@pytest.fixture
def env(tmp_path, monkeypatch):
    with reset_run(tmp_path, monkeypatch) as e:
        e.run_phase(1)
        yield e


def test_the_daemon_is_stopped_then_disabled(env):
    report = env.run(stop_daemon.STEP)
    assert report.succeeded, report
    assert env.units.calls == [("stop", DAEMON), ("disable", DAEMON)]
    assert report.removed == [f"running unit {DAEMON}", f"enabled unit {DAEMON}"]
    again = env.run(stop_daemon.STEP)
    assert (again.result, again.removed) == ("succeeded", [])


def test_a_state_dir_made_again_for_a_restart_goes(env):
    env.write("/var/lib/unbounded-agent/machineoperations/.keep", "")  # StateDirectory= of a restarted daemon
    report = env.run(stop_daemon.STEP)
    assert report.succeeded and "directory /var/lib/unbounded-agent" in report.removed
    assert not (env.root / "var/lib/unbounded-agent").exists()


def test_a_daemon_that_does_not_stop_fails_the_step_and_stays_enabled(env):
    env.units.stuck = {DAEMON}
    report = env.run(stop_daemon.STEP)
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert (report.failed[0].item, report.failed[0].error) == (f"running unit {DAEMON}", f"{DAEMON} did not stop within 120 s")
    assert ("disable", DAEMON) not in env.units.calls


def test_the_plan_names_the_daemon(env):
    from unbounded_agent.reset.step import Context

    ctx = Context(machine_name="m", bin_dirs=(), state_dirs=(), root=str(env.root), systemd=env.units)
    assert [(i.what, i.action) for i in stop_daemon.STEP.plan(ctx)] == [
        (f"running unit {DAEMON}", "stop"), (f"enabled unit {DAEMON}", "disable")]
    assert env.units.calls == []


def test_the_reporter_and_the_copy_kept_for_it_go_too(env):
    from unbounded_agent.reset import reporter_kit
    from unbounded_agent.reset.steps import finish, reload_systemd

    env.units.running_units.add(reporter_kit.REPORTER_UNIT)
    (env.dir / "reporter").mkdir()
    (env.dir / "reporter" / "kubeconfig").write_text("x")
    assert {i.what for i in stop_daemon.STEP.plan(env.context())} >= {
        f"running unit {reporter_kit.REPORTER_UNIT}", f"directory {env.dir / 'reporter'}"}
    report = env.run(stop_daemon.STEP)
    assert report.succeeded, report
    assert ("stop", reporter_kit.REPORTER_UNIT) in env.units.calls and not (env.dir / "reporter").exists()
    assert env.run(reload_systemd.STEP).succeeded and env.run(finish.STEP).succeeded  # nothing is left
