"""The verify step: the checkpoint (and the request) go only when every step of this run succeeded and a fresh
inventory finds nothing left; otherwise it stays, so the next reset resumes."""

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import reports
from unbounded_agent.reset.reports import ResetRequest, read_report, write_report, write_request
from unbounded_agent.reset.runner import exit_code, run_step
from unbounded_agent.reset.steps import (
    all_steps,
    remove_links,
    remove_machine_trees,
    remove_routing,
    stop_machines,
    verify,
)

RUN = "req-0001"


class FakeUnits:
    """Stands in for step.AgentUnits: nothing runs, nothing is enabled; reloads are counted."""

    def __init__(self):
        self.calls = []

    def matching(self, patterns):
        return []

    def running(self, name):
        return False

    def enabled(self, name):
        return False

    def reload(self):
        self.calls.append(("reload",))


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A whole reset run on a temporary root, its lock held; steps that need machined or netlink find
    nothing (they have their own tests)."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    cfg = tmp_path / "root/etc/unbounded/agent/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("machineName: node-7\n")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg))
    for step in (stop_machines.STEP, remove_links.STEP, remove_routing.STEP, remove_machine_trees.STEP):
        monkeypatch.setattr(type(step), "plan", lambda self, ctx: [])
        monkeypatch.setattr(type(step), "apply", lambda self, ctx, rec: None)

    class Env:
        def __init__(self):
            self.root, self.dir, self.units = tmp_path / "root", tmp_path / "reset", FakeUnits()

        def run(self, step):
            return run_step(step, directory=self.dir, root=str(self.root), systemd=self.units)

        def run_all_but_verify(self):
            return [self.run(s) for s in all_steps() if s is not verify.STEP]

    write_request(ResetRequest(run_id=RUN), tmp_path / "reset")
    with HostLock(RUN, "reset").acquire():
        yield Env()


def write(root, path, text="x"):
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_verify_removes_the_checkpoint_only_after_a_clean_run(env):
    write(env.root, "/etc/wireguard/server.priv")
    write(env.root, "/var/lib/unbounded-agent/bin/unbounded-agent-blue")
    assert all(r.succeeded for r in env.run_all_but_verify())
    assert env.units.calls[-1] == ("reload",)
    assert (env.dir / reports.CHECKPOINT).exists()
    report = env.run(verify.STEP)
    assert (report.result, report.run_id) == ("succeeded", RUN), report
    assert report.notes == ["verified: no agent artifact is left; checkpoint removed"]
    assert not (env.dir / reports.CHECKPOINT).exists() and not (env.dir / reports.REQUEST).exists()
    assert read_report(9, "verify", env.dir) == report


def test_verify_keeps_the_checkpoint_when_something_is_left(env):
    env.run_all_but_verify()
    write(env.root, "/etc/wireguard/server.priv")  # came back (or was never removed)
    report = env.run(verify.STEP)
    assert (report.result, report.reason) == ("failed", "ResetIncomplete")
    assert "file /etc/wireguard/server.priv is still there" in report.failed[0].error
    assert (env.dir / reports.CHECKPOINT).exists() and (env.dir / reports.REQUEST).exists()
    assert exit_code(report) == 24


def test_verify_keeps_the_checkpoint_when_a_step_failed_or_did_not_run_in_this_run(env):
    reports_ = env.run_all_but_verify()
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
    assert (env.dir / reports.CHECKPOINT).exists()


def test_an_inventory_that_cannot_be_read_is_not_taken_for_nothing_left(env, monkeypatch):
    env.run_all_but_verify()

    def unreadable(self, ctx):
        raise OpsError(Reason.INVENTORY_FAILED, "cannot list network links over netlink: EPERM")

    monkeypatch.setattr(remove_links.RemoveLinks, "plan", unreadable)
    report = env.run(verify.STEP)
    assert (report.result, report.reason) == ("failed", "ResetIncomplete")
    assert "remove-links: cannot list network links over netlink: EPERM" in report.failed[0].error
    assert (env.dir / reports.CHECKPOINT).exists()
