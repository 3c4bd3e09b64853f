"""Recover requests: the daemon's ExecStopPost= queues one on the third crash of a committed binary within the
window, the dispatcher queues one for a daemon systemd gave up on after a crash; never two for one upgrade,
never without a last-good to go back to, never while a reset is on its way."""

import pytest
import upgrade_fakes
from upgrade_fakes import ID, seed, upgrade_to

from unbounded_agent import fsutil, layout, systemd
from unbounded_agent.queue import recover
from unbounded_agent.queue.spool import Request, Spool
from unbounded_agent.upgrade import crashes, record
from unbounded_agent.upgrade.record import Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release

CRASH = {"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "1"}


@pytest.fixture
def committed(cfg, tmp_path, release, host_lock, fake_systemd, monkeypatch):
    seed(cfg, tmp_path)
    release()
    rec = upgrade_to(cfg, host_lock, fake_systemd, ID)
    host_lock.free()
    monkeypatch.setattr(systemd, "jobs", lambda: [])  # nobody asked the daemon to stop
    return rec


def crash(cfg, rec, seconds_after_commit, n):
    t = rec.phase_time(record.COMMITTED) + seconds_after_commit
    return recover.exited(cfg, env=dict(CRASH, INVOCATION_ID=f"inv-{n}"), now=lambda: t)


def recover_requests():
    return [r for _, r in Spool().queue() if r.kind == "recover"]


def test_the_third_crash_within_the_window_queues_one_recover_request(cfg, committed):
    assert crash(cfg, committed, 15, 1) is None and crash(cfg, committed, 35, 2) is None
    assert recover_requests() == []
    id = crash(cfg, committed, 55, 3)
    (req,) = recover_requests()
    assert (req.id, req.target, req.operation, req.source) == (id, ID, committed.operation, "daemon")
    assert "crashed 3 times within 600 s of its commit (the last: exit code 1)" in req.detail
    assert crash(cfg, committed, 75, 4) == id and len(recover_requests()) == 1  # not a second one


def test_a_stop_somebody_asked_for_is_not_counted(cfg, committed, monkeypatch):
    monkeypatch.setattr(systemd, "jobs", lambda: [{"unit": systemd.DAEMON_UNIT, "type": "restart"}])
    for n in range(5):
        assert crash(cfg, committed, 15 + n, n) is None
    assert crashes.read_exits(Store(cfg)) == [] and recover_requests() == []


def test_crashes_after_the_window_queue_nothing(cfg, committed):
    late = crashes.WINDOW_SECONDS + 10
    for n in range(3):
        assert crash(cfg, committed, late + 20 * n, n) is None
    assert recover_requests() == []


def test_without_a_last_good_the_daemon_is_left_to_systemd(cfg, committed):
    lay = layout.Layout(cfg.bin_dir)
    fsutil.atomic_symlink(layout.GREEN, lay.path(layout.LAST_GOOD))
    assert [crash(cfg, committed, 15 + 20 * n, n) for n in range(3)] == [None] * 3
    assert recover_requests() == []


def test_no_recover_request_while_a_reset_is_queued(cfg, committed):
    Spool().submit(Request(id="reset-1", kind="reset"))
    assert [crash(cfg, committed, 15 + 20 * n, n) for n in range(3)] == [None] * 3
    assert recover_requests() == []


def test_the_dispatcher_queues_one_for_a_daemon_systemd_gave_up_on(cfg, committed, fake_systemd):
    """The start limit stopped restarting it; its last run was a crash of the committed binary."""
    crash(cfg, committed, 15, "last")
    fake_systemd.daemon.update(active_state="failed", sub_state="failed", job=0, invocation="inv-last")
    id = recover.check_daemon(cfg)
    (req,) = recover_requests()
    assert req.id == id and req.target == ID and "systemd stopped restarting it" in req.detail


@pytest.mark.parametrize("state", [
    {"active_state": "active", "invocation": "inv-last"},  # running
    {"active_state": "failed", "invocation": "inv-operator"},  # its last run was not a crash (a stop that timed out)
    {"active_state": "failed", "invocation": "inv-last", "job": 4},  # being started again
])
def test_the_dispatcher_leaves_a_daemon_that_did_not_crash_last_alone(cfg, committed, fake_systemd, state):
    crash(cfg, committed, 15, "last")
    fake_systemd.daemon.update({"job": 0, **state})
    assert recover.check_daemon(cfg) is None and recover_requests() == []
