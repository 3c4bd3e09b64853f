"""Running one reset step: only for the reset that holds the host, from its checkpoint, verified by a fresh
inventory, and always with a report — also when it fails, and also for an error nobody foresaw."""

import fcntl
import os
from types import SimpleNamespace

import pytest

from unbounded_agent import records
from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import runner
from unbounded_agent.reset.reports import Checkpoint, Recorded, StepReport, report_path, write_checkpoint
from unbounded_agent.reset.step import Item, Step
from unbounded_agent.reset.steps import remove_wireguard_keys

RUN = "req-0001"


class Probe(Step):
    """A step whose inventory and work the test decides; it remembers the Context it was given."""

    name, number, phase = "probe", 3, 1
    title = "a step for the runner's tests"

    def __init__(self, left=(), error=None):
        self.left, self.error, self.ctx = list(left), error, None

    def plan(self, ctx):
        return list(self.left)

    def apply(self, ctx, rec):
        self.ctx = ctx
        if self.error:
            raise self.error
        rec.did("thing one")
        rec.already_absent("thing two")


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A reset run in progress (its checkpoint written, as begin leaves it); the test holds the lock."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    root, directory = tmp_path / "root", tmp_path / "reset"
    root.mkdir()
    write_checkpoint(Checkpoint(run_id=RUN, all_wg=True, recorded=Recorded(
        config_path="/etc/unbounded/agent/config.yaml", machine_name="node-7", bin_dir="/opt/agent/bin",
        state_dir="/var/lib/unbounded-agent")), directory)
    h = SimpleNamespace(root=root, dir=directory)
    h.run = lambda step, **kw: runner.run_step(step, directory=directory, root=str(root), **kw)
    with HostLock(RUN, "reset").acquire() as lock:
        h.lock = lock
        yield h


def on_disk(report: StepReport, directory) -> StepReport:
    return records.load(StepReport, report_path(report.number, report.step, directory))


def test_a_step_reports_what_it_did_for_its_run(host):
    step = Probe()
    report = host.run(step)
    assert (report.result, report.reason, report.run_id) == ("succeeded", "Succeeded", RUN)
    assert (report.step, report.number, report.phase, report.title) == ("probe", 3, 1, "a step for the runner's tests")
    assert report.unit == "unbounded-agent-reset-probe.service"
    assert (report.removed, report.absent, report.failed) == (["thing one"], ["thing two"], [])
    assert report.started_at <= report.finished_at and report.seconds >= 0
    assert on_disk(report, host.dir) == report
    assert runner.exit_code(report) == 0


def test_the_context_comes_from_the_checkpoint(host):
    step = Probe()
    host.run(step, graceful_timeout=3.0)
    ctx = step.ctx
    assert (ctx.machine_name, ctx.all_wg, ctx.graceful_timeout, ctx.root) == ("node-7", True, 3.0, str(host.root))
    # What the checkpoint recorded first, then the defaults (an earlier install may have used them).
    assert ctx.bin_dirs == ("/opt/agent/bin", "/var/lib/unbounded-agent/bin")
    assert ctx.state_dirs == ("/var/lib/unbounded-agent",)
    assert ctx.config_files == ()  # the config in the default dir goes with that dir


def test_a_step_without_a_checkpoint_fails_and_still_reports(host):
    (host.dir / "checkpoint.json").unlink()
    step = Probe()
    report = host.run(step)
    assert (report.result, report.reason, report.run_id) == ("failed", "ExecutionFailed", None)
    assert "no reset in progress" in report.failed[0].error
    assert step.ctx is None  # did nothing
    assert on_disk(report, host.dir) == report


def test_a_corrupt_checkpoint_is_not_taken_for_no_reset(host):
    (host.dir / "checkpoint.json").write_text("{not json")
    report = host.run(Probe())
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert "remove it only if no reset is in progress" in report.failed[0].error


def _another_reset():
    return HostLock("req-0002", "reset")


def _an_upgrade():
    return HostLock("up-0009", "upgrade")


@pytest.mark.parametrize("other", [None, _another_reset, _an_upgrade], ids=["free", "another-reset", "an-upgrade"])
def test_a_step_runs_only_for_the_reset_that_holds_the_host(host, other):
    key = host.root / "etc/wireguard/server.priv"
    key.parent.mkdir(parents=True)
    key.write_text("secret")
    host.lock.release()
    taken = other().acquire() if other else None
    try:
        report = host.run(remove_wireguard_keys.STEP)
    finally:
        if taken:
            taken.release()
    assert (report.result, report.reason) == ("failed", Reason.HOST_LOCKED.value)
    error = report.failed[0].error
    assert "reset step remove-wireguard-keys" in error
    assert ("no host operation is running" in error) if other is None else (f"not by operation {RUN}" in error)
    assert key.read_text() == "secret"  # nothing touched
    assert on_disk(report, host.dir) == report
    assert runner.exit_code(report) == 20


def test_a_lock_taken_by_someone_who_does_not_say_who_is_not_this_reset(host):
    # e.g. the upstream agent's bootstrap: it flocks the same file without our description in it.
    host.lock.release()
    fd = os.open(os.environ["UNBOUNDED_AGENT_LOCK"], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        report = host.run(Probe())
    finally:
        os.close(fd)
    assert (report.result, report.reason) == ("failed", "HostLocked")
    assert f"held by pid {os.getpid()}" in report.failed[0].error


def test_anything_still_there_after_the_work_fails_the_step(host):
    report = host.run(Probe(left=[Item("link wg51820", "(wireguard)")]))
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert report.failed[0].error == "still present after removal: link wg51820 (wireguard)"
    assert report.removed == ["thing one"]  # what it did is still reported


def test_the_work_failing_is_reported_with_its_own_reason(host):
    report = host.run(Probe(left=[Item("x")], error=OpsError(Reason.UNSAFE_REMOVAL, "refusing: a mount inside")))
    assert (report.result, report.reason) == ("failed", "UnsafeRemoval")
    assert [(f.item, f.reason, f.error) for f in report.failed] == [(None, "UnsafeRemoval", "refusing: a mount inside")]
    assert runner.exit_code(report) == Reason.UNSAFE_REMOVAL.exit_code


def test_an_unexpected_error_still_writes_a_report(host):
    report = host.run(Probe(error=RuntimeError("boom")))
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert report.failed[0].error == "unexpected error: RuntimeError: boom"
    assert on_disk(report, host.dir) == report
    assert runner.exit_code(report) == 5


def test_step_main_parses_the_arguments_and_returns_the_exit_code(host, monkeypatch):
    # step_main writes to the ops dir's reset dir (what a step unit uses): give it the run's checkpoint.
    directory = host.dir.parent / "ops/reset"
    write_checkpoint(Checkpoint(run_id=RUN), directory)
    step = Probe()

    def arguments(ap):
        ap.add_argument("--graceful-timeout", type=float, default=30.0)

    code = runner.step_main(step, "the probe", ["--graceful-timeout", "7"], arguments,
                            lambda a: {"graceful_timeout": a.graceful_timeout, "root": str(host.root)})
    assert code == 0 and step.ctx.graceful_timeout == 7.0
    assert records.load(StepReport, report_path(3, "probe", directory)).succeeded

    failing = Probe(error=OpsError(Reason.MACHINE_STILL_RUNNING, "kube2 still running"))
    assert runner.step_main(failing, "the probe", []) == 23
