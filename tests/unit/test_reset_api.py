"""What the dispatcher calls: phase 1 (everything that can fail, the agent's files included), the report gate,
phase 2 (the daemon stops) — and the outcome of each phase read back from the steps' reports (a missing or
stale report is a failure, told apart by the unit's state). systemd is faked."""

import pytest

from unbounded_agent import systemd
from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import api
from unbounded_agent.reset.reports import FailedItem, StepReport, read_checkpoint, read_request, write_report
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.steps import (
    of_phase,
    remove_links,
    remove_machine_trees,
    remove_routing,
    stop_machines,
)

RUN = "req-0001"
SPEC = api.Spec(RUN, "machineoperation/reset-node-7", all_wg=True)


def report_of(step, run_id=RUN, failure=None, removed=()):
    return StepReport(step=step.name, number=step.number, phase=step.phase, run_id=run_id,
                      result="failed" if failure else "succeeded", reason=failure[0] if failure else "Succeeded",
                      removed=list(removed), failed=[FailedItem(None, *failure)] if failure else [])


class FakeSystemd:
    """Starting a phase target 'runs' its steps: each writes the report the test scripted (or none)."""

    def __init__(self, monkeypatch, reports=None, units=None, refuse=False):
        self.reports = reports or {}  # step name -> StepReport, or None for "no report"
        self.units = units or {}  # unit -> unit_state dict
        self.refuse, self.calls = refuse, []
        self.left_at_work: list[list[str]] = []  # what busy() answers, one answer per call, then nothing
        self.busy_asked: list[int] = []
        for name in ("start_unit", "wait_jobs_done", "unit_state", "busy"):
            monkeypatch.setattr(systemd, name, getattr(self, name))

    def start_unit(self, name, mode="replace"):
        self.calls.append(("start", name))
        if self.refuse:
            raise systemd.SystemdError(f"StartUnit({name}, replace) failed: Unit {name} not found.")
        phase = {api.PHASE1_TARGET: 1, api.PHASE2_TARGET: 2}[name]
        for step in of_phase(phase):
            report = self.reports.get(step.name, report_of(step))
            if report is not None:
                write_report(report)
        return f"/org/freedesktop/systemd1/job/{len(self.calls)}"

    def wait_jobs_done(self, jobs, **kw):
        self.calls.append(("wait", tuple(jobs)))

    def busy(self, names):
        self.busy_asked.append(len(self.calls))  # how many calls were made before this question
        return self.left_at_work.pop(0) if self.left_at_work else []

    def unit_state(self, name):
        if name not in self.units:
            raise systemd.SystemdError(f"cannot query {name} over D-Bus: Access denied")
        return self.units[name]


@pytest.fixture(autouse=True)
def ops_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    return tmp_path / "ops"


def test_a_clean_reset_runs_phase_1_then_the_gate_then_phase_2(monkeypatch):
    fake = FakeSystemd(monkeypatch, reports={"remove-links": report_of(remove_links.STEP, removed=["link wg51820"])})
    gate = []
    out = api.run(SPEC, before_daemon_stops=lambda phase1: gate.append((phase1, list(fake.calls))))
    assert (out.succeeded, out.reason, out.step) == (True, "Succeeded", None)
    assert out.message.startswith("reset complete")
    assert fake.calls == [("start", api.PHASE1_TARGET), ("wait", ("/org/freedesktop/systemd1/job/1",)),
                          ("start", api.PHASE2_TARGET), ("wait", ("/org/freedesktop/systemd1/job/3",))]
    # The gate runs once, after phase 1 has finished and before phase 2 starts.
    [(phase1, calls_then)] = gate
    assert calls_then == fake.calls[:2] and phase1 is out.phases[0]
    assert [p.phase for p in out.phases] == [1, 2]
    assert [s.step for s in out.phases[0].steps] == [s.name for s in of_phase(1)]
    assert [s.step for s in out.phases[0].steps][-2:] == ["remove-agent", "verify"]
    assert [s.step for s in out.phases[1].steps] == ["begin", "stop-daemon", "reload-systemd", "finish"]
    assert next(s for s in out.phases[0].steps if s.step == "remove-links").removed == 1
    req = read_request()
    assert (req.run_id, req.all_wg, req.requested_by) == (RUN, True, "machineoperation/reset-node-7")


def test_a_failed_phase_1_step_stops_before_the_gate_and_the_daemon_keeps_running(monkeypatch):
    fake = FakeSystemd(monkeypatch, reports={"remove-machine-trees": report_of(
        remove_machine_trees.STEP, failure=("MachineStillRunning", "refusing to remove /var/lib/machines/kube2"))})
    gate = []
    out = api.run(SPEC, before_daemon_stops=gate.append)
    assert (out.succeeded, out.reason, out.step) == (False, "MachineStillRunning", "remove-machine-trees")
    assert out.message == ("reset step 5 (remove-machine-trees) failed: refusing to remove /var/lib/machines/kube2; "
                           "the agent's daemon keeps running; fix the cause and reset again")
    assert gate == [] and ("start", api.PHASE2_TARGET) not in fake.calls
    assert [p.phase for p in out.phases] == [1]


def test_a_failed_phase_2_step_says_to_run_the_reset_again(monkeypatch):
    from unbounded_agent.reset.steps import stop_daemon

    FakeSystemd(monkeypatch, reports={"stop-daemon": report_of(stop_daemon.STEP, failure=(
        "ExecutionFailed", "unbounded-agent-daemon.service did not stop within 120 s"))})
    out = api.run(SPEC)
    assert (out.succeeded, out.reason, out.step) == (False, "ExecutionFailed", "stop-daemon")
    assert "run `unbounded-agent reset` again" in out.message
    assert [p.phase for p in out.phases] == [1, 2] and out.phases[0].succeeded


def test_the_removal_of_the_agent_failing_is_a_phase_1_failure(monkeypatch):
    from unbounded_agent.reset.steps import remove_agent

    gate = []
    FakeSystemd(monkeypatch, reports={"remove-agent": report_of(remove_agent.STEP, failure=(
        "UnsafeRemoval", "refusing to remove /var/lib/unbounded-agent: cannot unmount /var/lib/unbounded-agent/x"))})
    out = api.run(SPEC, before_daemon_stops=gate.append)
    assert (out.succeeded, out.reason, out.step) == (False, "UnsafeRemoval", "remove-agent")
    assert out.message.startswith("reset step 7 (remove-agent) failed: refusing to remove /var/lib/unbounded-agent")
    assert gate == [] and [p.phase for p in out.phases] == [1]


def test_a_step_that_ended_without_a_report_is_told_by_its_unit(monkeypatch):
    unit = stop_machines.STEP.unit
    FakeSystemd(monkeypatch, reports={"stop-machines": None},
                units={unit: {"active_state": "failed", "result": "signal", "exit_status": 0}})
    phase = api.run_phase(1, RUN)
    f = phase.first_failure()
    assert (f.step, f.number, f.succeeded, f.reason) == ("stop-machines", 1, False, "ExecutionFailed")
    assert f.message == (f"ended without a report (unit result signal, exit status 0) (see journalctl -u {unit})")


@pytest.mark.parametrize("state", [{"active_state": "inactive"}, None], ids=["inactive", "unreadable"])
def test_a_step_that_never_ran_is_a_failure(monkeypatch, state):
    unit = remove_routing.STEP.unit
    FakeSystemd(monkeypatch, reports={"remove-routing": None}, units={unit: state} if state else {})
    f = api.run_phase(1, RUN).first_failure()
    assert (f.step, f.reason) == ("remove-routing", "ExecutionFailed")
    assert f.message.startswith("did not run (a unit it requires failed, or the job was cancelled)")


def test_a_report_left_by_an_earlier_run_does_not_count(monkeypatch):
    FakeSystemd(monkeypatch, reports={"remove-links": None}, units={remove_links.STEP.unit: {"active_state": "inactive"}})
    write_report(report_of(remove_links.STEP, run_id="req-0000"))  # succeeded, but for another reset
    phase = api.run_phase(1, RUN)
    assert not phase.succeeded and phase.first_failure().step == "remove-links"


def test_a_target_systemd_will_not_start_is_an_execution_failure(monkeypatch):
    FakeSystemd(monkeypatch, refuse=True)
    with pytest.raises(OpsError) as e:
        api.run(SPEC)
    assert e.value.reason is Reason.EXECUTION_FAILED
    assert e.value.message.startswith(f"cannot run {api.PHASE1_TARGET}: StartUnit")


def test_the_real_steps_end_to_end_with_the_lock_held_for_the_run(monkeypatch, tmp_path):
    """Starting a target runs its steps in this process, as their units would: the whole reset, begin to finish."""
    for step in (stop_machines.STEP, remove_links.STEP, remove_routing.STEP, remove_machine_trees.STEP):
        monkeypatch.setattr(type(step), "plan", lambda self, ctx: [])  # machined and netlink: their own tests
        monkeypatch.setattr(type(step), "apply", lambda self, ctx, rec: None)
    root = tmp_path / "root"
    key = root / "etc/wireguard/server.priv"
    key.parent.mkdir(parents=True)
    key.write_text("x")
    agent = root / "var/lib/unbounded-agent/bin/unbounded-agent-blue"
    agent.parent.mkdir(parents=True)
    agent.write_text("the agent")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(tmp_path / "absent.yaml"))

    class Units:
        def matching(self, patterns):
            return []

        def running(self, name):
            return False

        def reporting(self, name):
            return False

        def enabled(self, name):
            return False

        def reload(self):
            pass

    units = Units()

    def start_unit(name, mode="replace"):
        phase = {api.PHASE1_TARGET: 1, api.PHASE2_TARGET: 2}[name]
        for step in of_phase(phase):
            run_step(step, root=str(root), systemd=units)
        return "job"

    monkeypatch.setattr(systemd, "start_unit", start_unit)
    monkeypatch.setattr(systemd, "wait_jobs_done", lambda jobs, **kw: None)
    checkpoints = []
    with HostLock(RUN, "reset").acquire():
        out = api.run(SPEC, before_daemon_stops=lambda phase1: checkpoints.append((read_checkpoint(), agent.exists())))
    assert out.succeeded, out
    checkpoints, agent_there = [c for c, _ in checkpoints], [a for _, a in checkpoints]
    assert agent_there == [False]  # at the gate the agent's files are gone already: only the daemon stops after it
    assert [p.succeeded for p in out.phases] == [True, True]
    assert checkpoints[0].run_id == RUN and checkpoints[0].all_wg is True  # phase 1 ran under the run's checkpoint
    assert read_checkpoint() is None and not key.exists()


def test_steps_left_at_work_by_an_interrupted_run_end_before_phase_1_starts(monkeypatch):
    fake = FakeSystemd(monkeypatch)
    fake.left_at_work = [["unbounded-agent-reset-verify.service"], ["unbounded-agent-reset-verify.service"]]
    monkeypatch.setattr(api.time, "sleep", lambda s: None)
    assert api.run(SPEC).succeeded
    assert fake.busy_asked == [0, 0, 0]  # asked until nothing was left at work, all before phase 1 started
