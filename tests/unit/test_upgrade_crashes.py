"""The failure-detection window after a commit: which exits of the daemon are crashes, how they are kept, and
when the committed binary counts as failing (CRASHES within WINDOW_SECONDS of the commit)."""

import pytest
import upgrade_fakes
from upgrade_fakes import ID, seed, upgrade_to

from unbounded_agent import fsutil, layout, systemd
from unbounded_agent.upgrade import crashes, record
from unbounded_agent.upgrade.record import Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release

CRASH = {"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "1", "INVOCATION_ID": "inv-1"}


@pytest.fixture
def committed(cfg, tmp_path, release, host_lock, fake_systemd):
    """v2 committed over v1: (the record, the time of its commit)."""
    seed(cfg, tmp_path)
    release()
    rec = upgrade_to(cfg, host_lock, fake_systemd, ID)
    return rec, rec.phase_time(record.COMMITTED)


@pytest.mark.parametrize("jobs, env, crashed", [
    ([], CRASH, True),  # nobody asked: a crash, whatever the result
    ([], {"SERVICE_RESULT": "success", "EXIT_CODE": "exited", "EXIT_STATUS": "0"}, True),  # exited 0 on its own
    ([{"unit": systemd.DAEMON_UNIT, "type": "start"}], CRASH, True),  # crashed before ready
    ([{"unit": systemd.DAEMON_UNIT, "type": "restart"}], {"SERVICE_RESULT": "success"}, False),  # systemctl restart
    ([{"unit": systemd.DAEMON_UNIT, "type": "stop"}], {"SERVICE_RESULT": "timeout"}, False),  # a slow stop, asked for
    ([{"unit": "other.service", "type": "stop"}], CRASH, True),
])
def test_a_run_is_a_crash_when_nobody_asked_the_daemon_to_stop(monkeypatch, jobs, env, crashed):
    monkeypatch.setattr(systemd, "jobs", lambda: jobs)
    assert crashes.crashed(env, crashes.stop_requested()) is crashed


@pytest.mark.parametrize("result, crashed", [("exit-code", True), ("signal", True), ("watchdog", True),
                                             ("success", False), ("timeout", False)])
def test_without_systemd_the_result_alone_decides(monkeypatch, result, crashed):
    def unreachable():
        raise systemd.SystemdError("ListJobs failed: Connection refused")

    monkeypatch.setattr(systemd, "jobs", unreachable)
    assert crashes.stop_requested() is None
    assert crashes.crashed({"SERVICE_RESULT": result}, None) is crashed


def test_a_crash_is_kept_with_the_binary_it_ran_and_the_list_stays_short(cfg, committed):
    rec, t = committed
    store = Store(cfg)
    for i in range(crashes.KEEP + 5):
        last, exits = crashes.record_exit(store, dict(CRASH, INVOCATION_ID=f"inv-{i}"), t + i)
    assert len(exits) == crashes.KEEP == len(crashes.read_exits(store))
    assert last.digest == rec.to.digest and last.invocation == f"inv-{crashes.KEEP + 4}"
    assert (last.result, last.exit_code, last.exit_status, last.text()) == ("exit-code", "exited", "1", "exit code 1")


def test_keeping_a_crash_never_makes_the_state_dir(cfg, tmp_path):
    seed(cfg, tmp_path)
    fsutil.remove_stale_temps(cfg.state_dir)
    cfg.state_dir.rmdir()
    crashes.record_exit(Store(cfg), CRASH, 1.0)
    assert not cfg.state_dir.exists()


def exits_at(rec, *offsets, digest=None):
    return [crashes.DaemonExit(at="", t=rec.phase_time(record.COMMITTED) + o, digest=digest or rec.to.digest)
            for o in offsets]


def test_the_committed_binary_is_failing_on_its_third_crash_within_the_window(committed):
    rec, _ = committed
    assert crashes.after_commit(rec, exits_at(rec, 15, 35), rec.phase_time(record.COMMITTED) + 40) is None
    failing = crashes.after_commit(rec, exits_at(rec, 15, 35, 55), rec.phase_time(record.COMMITTED) + 56)
    assert failing is not None and len(failing) == crashes.CRASHES


def test_crashes_before_the_commit_of_another_binary_or_after_the_window_do_not_count(committed):
    rec, t = committed
    assert crashes.after_commit(rec, exits_at(rec, -30, -20, 15), t + 20) is None  # two were on probation
    assert crashes.after_commit(rec, exits_at(rec, 15, 35, 55, digest="other"), t + 60) is None
    late = crashes.WINDOW_SECONDS + 1
    assert crashes.after_commit(rec, exits_at(rec, 15, 35, late), t + late) is None  # only the start limit, then


def test_only_a_committed_upgrade_that_changed_the_binary_is_judged(committed):
    rec, t = committed
    exits = exits_at(rec, 15, 35, 55)
    for change in ({"phase": record.PROBATION}, {"phase": record.ROLLED_BACK}, {"same_content": True}):
        other = record.UpgradeRecord(**{**rec.__dict__, **change})
        assert crashes.after_commit(other, exits, t + 60) is None
    assert crashes.after_commit(None, exits, t + 60) is None


def test_last_good_is_a_slot_holding_another_binary(cfg, committed):
    rec, _ = committed
    lay = layout.Layout(cfg.bin_dir)
    assert crashes.last_good(lay, rec) == layout.BLUE
    fsutil.atomic_symlink(layout.GREEN, lay.path(layout.LAST_GOOD))  # the committed binary itself
    assert crashes.last_good(lay, rec) is None
    lay.path(layout.LAST_GOOD).unlink()
    assert crashes.last_good(lay, rec) is None


def test_the_failure_names_the_last_crash_and_its_journal(cfg, committed, fake_systemd):
    rec, t = committed
    store = Store(cfg)
    crashes.record_exit(store, CRASH, t + 15)
    crashes.record_exit(store, {"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "SEGV",
                                "INVOCATION_ID": "inv-2"}, t + 35)
    fake_systemd.journal(unit_lines=["segfault in worker"])
    f = crashes.failure(store, rec, "the committed daemon crashed 2 times")
    assert (f.detail, f.signal, f.result, f.exit_code) == ("the committed daemon crashed 2 times", "SIGSEGV", "signal", None)
    assert f.journal == ["segfault in worker"] and f.blames_release
    assert any("_SYSTEMD_INVOCATION_ID=inv-2" in q for q in fake_systemd.journal_queries())
