"""The dispatcher: requests run one at a time, in order, each under the host lock held for it; every request
ends in a result, whatever happens to it; a reset supersedes what is queued behind it and lets its
requester report before the daemon stops. The operations themselves are faked here (upgrade/api, reset/api
have their own tests); the spool, the lock and the records are real."""

import threading

import pytest

from unbounded_agent import hostlock
from unbounded_agent.queue import dispatch
from unbounded_agent.queue.spool import Request, Spool
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import api as reset_api
from unbounded_agent.upgrade import api as upgrade_api
from unbounded_agent.upgrade import units as upgrade_units
from unbounded_agent.upgrade.record import Binary, UpgradeRecord


@pytest.fixture
def spool(tmp_path, monkeypatch):
    monkeypatch.setenv(hostlock.ENV_LOCK, str(tmp_path / "install.lock"))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"stateDir: {tmp_path / 'state'}\nbinDir: {tmp_path / 'bin'}\n")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg))
    # the dispatcher asks systemd about the daemon at its start (queue/recover.py): not this machine's systemd
    monkeypatch.setattr(dispatch.recover, "check_daemon", lambda cfg, spool=None: None)
    return Spool(tmp_path / "ops").ensure()


class FakeOperations:
    """upgrade.api.run and reset.api.run as the dispatcher calls them, recording who held the host."""

    def __init__(self, monkeypatch, spool):
        self.ran: list[tuple[str, str | None]] = []
        self.forgotten: list[tuple[str, bool]] = []  # (id, its result already written)
        monkeypatch.setattr(upgrade_units, "forget", lambda id: self.forgotten.append((id, spool.result(id) is not None)))
        self.upgrade_outcome = "committed"
        self.fail_with: Exception | None = None
        monkeypatch.setattr(upgrade_api, "run", self.upgrade)
        monkeypatch.setattr(reset_api, "run", self.reset)
        self.reset_phase2 = []

    def upgrade(self, cfg, spec, on_change=None):
        self.ran.append((spec.id, hostlock.holder().operation))
        if self.fail_with:
            raise self.fail_with
        rec = UpgradeRecord(id=spec.id, operation=spec.operation, kind=spec.kind, from_=Binary(version="1.0.0"),
                            to=Binary(version="2.0.0"))
        rec.phase, rec.reason, rec.message = self.upgrade_outcome, "Succeeded", "upgraded"
        if self.upgrade_outcome == "rolled-back":
            rec.reason, rec.message = "DaemonFailed", "rolled back"
        return rec

    def reset(self, spec, before_daemon_stops):
        self.ran.append((spec.id, hostlock.holder().operation))
        phase1 = reset_api.PhaseOutcome(1, [reset_api.StepOutcome("remove-links", 2, True, "Succeeded", "", 1)])
        before_daemon_stops(phase1)
        self.reset_phase2.append(spec.id)
        return reset_api.Outcome(True, "Succeeded", "reset complete", phases=[phase1, phase1])


@pytest.fixture
def ops(monkeypatch, spool):
    return FakeOperations(monkeypatch, spool)


def test_requests_run_in_order_each_under_the_lock_held_for_it(spool, ops):
    ids = [spool.submit(Request(id=f"upgrade-{i}", kind="upgrade", url="https://h/a.tgz")).id for i in range(3)]
    dispatch.run(spool)
    assert ops.ran == [(i, i) for i in ids]
    assert [spool.result(i).succeeded for i in ids] == [True] * 3
    assert spool.result(ids[0]).from_version == "1.0.0" and spool.result(ids[0]).to_version == "2.0.0"
    assert spool.queue() == [] and hostlock.holder() is None


def test_the_chain_of_each_ended_upgrade_is_cleared_after_its_result(spool, ops):
    """Its failed steps would stay loaded in systemd, one more set per operation (units.forget)."""
    for id, kind in (("upgrade-1", "upgrade"), ("rollback-2", "rollback"), ("reset-3", "reset")):
        spool.submit(Request(id=id, kind=kind, url="https://h/a.tgz" if kind == "upgrade" else ""))
    ops.upgrade_outcome = "failed"
    dispatch.run(spool)
    assert ops.forgotten == [("upgrade-1", True), ("rollback-2", True)]  # a reset has no chain


def test_a_rolled_back_upgrade_ends_daemon_failed(spool, ops):
    ops.upgrade_outcome = "rolled-back"
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    dispatch.run(spool)
    r = spool.result("upgrade-1")
    assert not r.succeeded and r.reason == Reason.DAEMON_FAILED.value and r.exit_code() == Reason.DAEMON_FAILED.exit_code


def test_a_claim_left_by_a_killed_dispatcher_goes_on_first(spool, ops):
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    spool.submit(Request(id="upgrade-2", kind="upgrade"))
    path, req = spool.claim_next()  # a dispatcher claimed it, then died
    req.attempts = 1
    spool.update(path, req)
    dispatch.run(spool)
    assert [r for r, _ in ops.ran] == ["upgrade-1", "upgrade-2"]


def test_a_request_interrupted_too_often_fails_without_running_again(spool, ops):
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    path, req = spool.claim_next()
    req.attempts = dispatch.MAX_ATTEMPTS
    spool.update(path, req)
    dispatch.run(spool)
    r = spool.result("upgrade-1")
    assert not r.succeeded and "interrupted 3 times" in r.message and ops.ran == []


def test_an_error_in_one_operation_is_its_result_and_the_queue_goes_on(spool, ops):
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    spool.submit(Request(id="upgrade-2", kind="upgrade"))
    ops.fail_with = RuntimeError("boom")
    dispatch.run(spool)
    for i in ("upgrade-1", "upgrade-2"):
        r = spool.result(i)
        assert not r.succeeded and r.reason == Reason.EXECUTION_FAILED.value and "RuntimeError: boom" in r.message
    ops.fail_with = OpsError(Reason.QUARANTINED, "quarantined")
    spool.submit(Request(id="upgrade-3", kind="upgrade"))
    dispatch.run(spool)
    assert spool.result("upgrade-3").reason == "Quarantined"


def test_a_broken_config_fails_every_request_with_its_reason(spool, ops, tmp_path):
    (tmp_path / "config.yaml").write_text("probationSeconds: [1\n")
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    spool.submit(Request(id="reset-1", kind="reset"))
    dispatch.run(spool)
    assert [spool.result(i).reason for i in ("upgrade-1", "reset-1")] == ["InvalidConfig"] * 2
    assert ops.ran == [] and spool.queue() == []


def test_an_unreadable_request_gets_a_result_and_does_not_stop_the_queue(spool, ops):
    (spool.requests / "00000000000000000001-upgrade-1.request").write_text("{garbage")
    spool.submit(Request(id="upgrade-2", kind="upgrade"))
    dispatch.run(spool)
    assert spool.result("upgrade-1").reason == Reason.INVALID_PARAMETERS.value
    assert spool.result("upgrade-2").succeeded


def test_the_lock_held_by_another_operation_is_waited_for(spool, ops, monkeypatch):
    monkeypatch.setattr(dispatch, "LOCK_WAIT_SECONDS", 0.2)
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    with hostlock.HostLock("recovery-x", "recovery").acquire():
        dispatch.run(spool)
    r = spool.result("upgrade-1")
    assert r.reason == Reason.HOST_LOCKED.value and "recovery recovery-x" in r.message and ops.ran == []


def test_a_reset_supersedes_what_is_queued_behind_it_but_not_another_reset(spool, ops, monkeypatch):
    spool.submit(Request(id="reset-1", kind="reset"))
    # queued behind the reset by a path that does not refuse them (a request written before the reset's)
    for i, kind in ((2, "upgrade"), (3, "reset"), (4, "rollback")):
        name = f"{99999999999999999990 + i:020d}-{kind}-{i}.request"
        (spool.incoming / name).write_text(f'{{"id": "{kind}-{i}", "kind": "{kind}", "source": "cli"}}')
        (spool.incoming / name).rename(spool.requests / name)
    dispatch.run(spool)
    assert [r for r, _ in ops.ran] == ["reset-1", "reset-3"]
    for i in ("upgrade-2", "rollback-4"):
        r = spool.result(i)
        assert r.reason == Reason.SUPERSEDED.value and "superseded by reset reset-1" in r.message
    assert spool.result("reset-1").succeeded and spool.result("reset-3").succeeded


def test_a_reset_with_a_report_gate_waits_for_the_ack_before_stopping_the_daemon(spool, ops, monkeypatch):
    monkeypatch.setattr(dispatch, "_can_report", lambda unit: True)
    monkeypatch.setattr(dispatch, "GATE_POLL_SECONDS", 0.01)
    spool.submit(Request(id="reset-1", kind="reset", source="machineoperation", report_gate=True))
    seen = []

    def requester():
        gate = None
        while gate is None:
            gate = spool.gate("reset-1")
        seen.append((gate.message, list(ops.reset_phase2)))  # phase 2 has not started while the gate is open
        spool.ack("reset-1")

    t = threading.Thread(target=requester)
    t.start()
    dispatch.run(spool)
    t.join(10)
    assert seen and seen[0][1] == []
    assert seen[0][0] == ("AgentReset completed: the agent, its machines, links, keys and routing are gone from "
                          "this host (its daemon stops next)")
    assert ops.reset_phase2 == ["reset-1"] and spool.result("reset-1").succeeded
    assert spool.gate("reset-1") is None  # cleared with the result


def test_a_gate_nobody_can_answer_does_not_hold_the_reset(spool, ops, monkeypatch, tmp_path):
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))  # nothing kept for a reporter there
    monkeypatch.setattr(dispatch, "_can_report", lambda unit: False)
    started = []
    monkeypatch.setattr(dispatch.systemd, "start_unit", started.append)
    spool.submit(Request(id="reset-1", kind="reset", source="machineoperation", report_gate=True))
    dispatch.run(spool)
    assert spool.result("reset-1").succeeded and ops.reset_phase2 == ["reset-1"]
    assert started == []


class Reporter:
    """systemd as the gate asks it: the daemon has no process; the reporter runs once started, acks the gate
    (when it can), or ends without."""

    def __init__(self, monkeypatch, spool, acks: bool):
        self.spool, self.acks, self.started, self.running, self.acked = spool, acks, [], False, False
        monkeypatch.setattr(dispatch.systemd, "start_unit", self.start)
        monkeypatch.setattr(dispatch.systemd, "wait_jobs_done", lambda jobs: None)
        monkeypatch.setattr(dispatch.systemd, "unit_state", self.state)

    def start(self, unit):
        self.started.append(unit)
        self.running = True
        return "/job/1"

    def state(self, unit):
        if unit == "unbounded-agent-daemon.service" or not self.running:
            return {"active_state": "failed", "main_pid": 0}
        if self.acks:
            self.spool.ack("reset-1")
            self.acked = True
        else:
            self.running = False  # it ends at once (no API server, say)
        return {"active_state": "active", "main_pid": 7}


def hold_kit(tmp_path, monkeypatch, run_id: str):
    from unbounded_agent.reset import reporter_kit

    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "kubeconfig").write_text(KUBECONFIG)
    (tmp_path / "etc" / "config.yaml").write_text(f"kubeconfig: {tmp_path / 'etc' / 'kubeconfig'}\n")
    (tmp_path / "ops" / "reset").mkdir(parents=True)
    reporter_kit.hold(tmp_path / "ops" / "reset", run_id, str(tmp_path / "etc" / "config.yaml"))


KUBECONFIG = """\
current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
"""


@pytest.mark.parametrize("acks", [True, False], ids=["the reporter reports", "the reporter ends without"])
def test_a_daemon_that_cannot_start_again_is_stood_in_for_by_the_reporter(spool, ops, monkeypatch, tmp_path, acks):
    """It waits for the reporter's acknowledgement; a reporter that ends without one does not hold the reset."""
    hold_kit(tmp_path, monkeypatch, "reset-1")
    monkeypatch.setattr(dispatch, "GATE_POLL_SECONDS", 0.01)
    reporter = Reporter(monkeypatch, spool, acks=acks)
    spool.submit(Request(id="reset-1", kind="reset", source="machineoperation", report_gate=True))
    dispatch.run(spool)
    assert reporter.started == ["unbounded-agent-reset-reporter.service"]
    assert reporter.acked is acks
    assert spool.result("reset-1").succeeded and ops.reset_phase2 == ["reset-1"]


def test_a_copy_kept_for_another_reset_starts_no_reporter(spool, ops, monkeypatch, tmp_path):
    hold_kit(tmp_path, monkeypatch, "reset-0")
    reporter = Reporter(monkeypatch, spool, acks=True)
    spool.submit(Request(id="reset-1", kind="reset", source="machineoperation", report_gate=True))
    dispatch.run(spool)
    assert reporter.started == [] and ops.reset_phase2 == ["reset-1"]


def test_superseding_an_operation_of_a_machineoperation_opens_a_gate_for_the_watcher(spool, ops, monkeypatch):
    gates = []
    monkeypatch.setattr(dispatch, "_wait_at_gate", lambda sp, req, phase1: gates.append(req.id))
    spool.submit(Request(id="reset-1", kind="reset"))
    name = f"{99999999999999999999:020d}-mop-1.request"
    (spool.incoming / name).write_text('{"id": "mop-1", "kind": "upgrade", "source": "machineoperation"}')
    (spool.incoming / name).rename(spool.requests / name)
    dispatch.run(spool)
    assert gates == ["reset-1"] and spool.result("mop-1").reason == "Superseded"


def test_the_dispatcher_leaves_the_spool_empty_even_of_stray_files(spool, ops):
    (spool.requests / "notes.txt").write_text("x")
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    dispatch.run(spool)
    assert list(spool.requests.iterdir()) == [] and spool.result("upgrade-1").succeeded


@pytest.mark.parametrize("state, can", [
    ({"active_state": "active", "main_pid": 42}, True),
    ({"active_state": "activating", "main_pid": 42}, True),  # started before its files went, not ready yet
    ({"active_state": "activating", "main_pid": 0}, False),  # auto-restart: it cannot start without its files
    ({"active_state": "failed", "main_pid": 0}, False),
    ({"active_state": "inactive", "main_pid": 0}, False)])
def test_who_can_still_report_at_the_gate(monkeypatch, state, can):
    from unbounded_agent import systemd

    monkeypatch.setattr(systemd, "unit_state", lambda name: dict(state, unit=name))
    assert dispatch._can_report("unbounded-agent-daemon.service") is can


def test_a_systemd_that_cannot_be_asked_keeps_the_gate_waiting(monkeypatch):
    from unbounded_agent import systemd

    def broken(name):
        raise systemd.SystemdError("cannot query: timeout")
    monkeypatch.setattr(systemd, "unit_state", broken)
    assert dispatch._can_report("unbounded-agent-daemon.service") is True


def test_a_recover_request_runs_under_the_id_of_the_upgrade_it_reopens(spool, ops, monkeypatch):
    """It re-opens a committed upgrade: its recovery unit checks the host is held for that upgrade's record. Its
    own result says what happened, and the upgrade's result gets the rollback after its commit."""
    spool.submit(Request(id="upgrade-1", kind="upgrade", url="https://h/a.tgz"))
    dispatch.run(spool)
    assert spool.result("upgrade-1").succeeded
    held = []

    def recover(cfg, request_id, target, detail):
        held.append((hostlock.holder().operation, hostlock.holder().kind, request_id, target, detail))
        rec = UpgradeRecord(id=target, operation="op-1", from_=Binary(version="1.0.0"), to=Binary(version="2.0.0"),
                            phase="rolled-back", reason="DaemonFailedAfterCommit", restored_daemon="active",
                            after_commit=True, message="version 2.0.0 failed after its commit: ...")
        rec.finished_at = "2026-01-01T00:00:00.000Z"
        return rec, ""

    monkeypatch.setattr(upgrade_api, "recover", recover)
    spool.submit(Request(id="recover-1", kind="recover", source="daemon", target="upgrade-1", detail="crashed 3 times"))
    dispatch.run(spool)
    assert held == [("upgrade-1", "recover", "recover-1", "upgrade-1", "crashed 3 times")]
    res = spool.result("recover-1")
    assert (res.succeeded, res.reason, res.from_version, res.to_version) == (True, "DaemonFailedAfterCommit", "2.0.0",
                                                                             "1.0.0")
    late = spool.result("upgrade-1").after_commit
    assert late["reason"] == "DaemonFailedAfterCommit" and late["request"] == "recover-1" and "after its commit" in late["message"]
    assert "then rolled back after its commit" in spool.result("upgrade-1").describe()


def test_a_recover_request_with_nothing_to_recover_says_so(spool, ops, monkeypatch):
    monkeypatch.setattr(upgrade_api, "recover", lambda cfg, rid, target, detail: (None, "nothing to recover: x"))
    spool.submit(Request(id="recover-1", kind="recover", source="daemon", target="upgrade-1"))
    dispatch.run(spool)
    res = spool.result("recover-1")
    assert res.succeeded and res.message == "nothing to recover: x"


def test_at_its_start_the_dispatcher_asks_whether_a_recover_request_is_due(spool, ops, monkeypatch):
    asked = []
    monkeypatch.setattr(dispatch.recover, "check_daemon", lambda cfg, spool=None: asked.append(cfg.state_dir))
    dispatch.run(spool)
    assert len(asked) == 1
