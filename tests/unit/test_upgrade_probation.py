"""Probation against scripted daemon states: when the upgrade is committed, when it goes to recovery (with
the real exit detail and the failed run's journal), how often it may be interrupted, and that it decides
nothing unless the host lock is held for the operation on probation."""

import errno
import os
from pathlib import Path

import pytest
import upgrade_fakes
from upgrade_fakes import ID, SECRET, SECRET_URL, agent_body, begin, links, read, run_chain, seed, sha, state_files, upgrade_to

from unbounded_agent import layout, records, systemd
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import crashes, probation, record, units
from unbounded_agent.upgrade.record import Failure, QuarantineEntry, Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release
switched = upgrade_fakes.switched

BASE = {"sub_state": "running", "job": 0, "main_pid": 7, "n_restarts": 0, "result": "success", "exec_main_code": None,
        "exec_main_status": 0}


def crashed(status=3, **kw):
    return {"invocation": "new", "active_state": "activating", "sub_state": "auto-restart", "result": "exit-code",
            "exec_main_code": "exited", "exec_main_status": status, **kw}


def watch(cfg, snaps, clock_start=0.0, expected_version=None, ended=None):
    """probation.watch over a script of snapshots (the last repeats; an exception in it is raised, as a D-Bus
    error would be) and a clock that moves only by sleeps."""
    seq = [s if isinstance(s, Exception) else dict(BASE, **s) for s in snaps]
    t = [clock_start]

    def snapshot():
        item = seq.pop(0) if len(seq) > 1 else seq[0]
        if isinstance(item, Exception):
            raise item
        return item

    return probation.watch(cfg, "old", snapshot=snapshot, clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s),
                           expected_version=expected_version, ended=ended or (lambda invocation: None))


READY = {"invocation": "new", "active_state": "active"}
HICCUP = systemd.SystemdError("cannot query unbounded-agent-daemon.service over D-Bus: Connection reset by peer")


# -- watch --------------------------------------------------------------------------------------------------


def test_watch_passes_a_daemon_that_gets_ready_and_stays(cfg):
    assert watch(cfg, [{"invocation": "old", "active_state": "active", "job": 1},  # restart queued
                       {"invocation": "new", "active_state": "activating", "sub_state": "start", "job": 1},
                       {"invocation": "new", "active_state": "active"}]) is None


def test_watch_does_not_take_the_old_invocation_for_the_new_daemon(cfg):
    """The old daemon still active (the restart never begun) is not readiness; past the longest a stop can
    take, the watch ends without blaming the release."""
    failure, _ = watch(cfg, [{"invocation": "old", "active_state": "active"}])
    assert "the previous run was still active/running" in failure.detail and not failure.blames_release


def test_the_old_daemons_slow_stop_is_not_the_new_releases_time(cfg):
    """An old daemon that ignores SIGTERM stops only when killed (TimeoutStopSec=): ten times the ready timeout
    passes meanwhile, and the new release that then reports ready at once passes."""
    stopping = {"invocation": "old", "active_state": "deactivating", "sub_state": "stop-sigterm", "job": 3}
    n = int(10 * cfg.ready_timeout_seconds / probation.POLL_SECONDS)
    assert watch(cfg, [stopping] * n + [{"invocation": "new", "active_state": "activating", "sub_state": "start",
                                         "job": 3, "started_monotonic": n * probation.POLL_SECONDS}, READY]) is None


def test_the_ready_deadline_counts_from_the_new_runs_own_start(cfg):
    """Seen late (polling, a slow bus), a run that started long ago has had its ready time already."""
    late = {"invocation": "new", "active_state": "activating", "sub_state": "start", "job": 3, "started_monotonic": 100.0}
    failure, _ = watch(cfg, [late], clock_start=100.0 + cfg.ready_timeout_seconds + 1)
    assert f"did not report ready within {cfg.ready_timeout_seconds:g} s of its start" in failure.detail
    assert failure.blames_release


@pytest.mark.parametrize("snaps,expect", [
    ([crashed(3)], {"exit_code": 3, "result": "exit-code"}),
    ([crashed(9, exec_main_code="killed", result="signal")], {"signal": "SIGKILL", "exit_code": None}),
    ([crashed(6, exec_main_code="dumped", result="core-dump")], {"signal": "SIGABRT"}),
    ([{"invocation": "new", "active_state": "failed", "sub_state": "failed", "result": "start-limit-hit",
       "exec_main_code": "exited", "exec_main_status": 1}], {"exit_code": 1, "result": "start-limit-hit"}),
])
def test_watch_reports_how_the_new_daemon_failed_before_ready(cfg, snaps, expect):
    failure, invocation = watch(cfg, snaps)
    assert "exited before it reported ready" in failure.detail and invocation == "new"
    assert failure.cause == probation.EXITED_BEFORE_READY  # the rollbacks metric's reason
    for k, v in expect.items():
        assert getattr(failure, k) == v


def test_watch_reports_a_daemon_that_stops_during_the_window(cfg):
    failure, _ = watch(cfg, [{"invocation": "new", "active_state": "active"}, crashed(3)])
    assert "stopped during probation" in failure.detail and failure.exit_code == 3
    assert failure.cause == probation.STOPPED
    assert failure.text() == f"{failure.detail} (exit code 3)"


@pytest.mark.parametrize("change", [{"main_pid": 8}, {"n_restarts": 1}, {"invocation": "newer", "n_restarts": 1}])
def test_watch_reports_a_daemon_restarted_behind_its_back(cfg, change):
    failure, _ = watch(cfg, [READY, dict(READY, **change)])
    assert "stopped during probation" in failure.detail and failure.blames_release


SEGV = crashes.DaemonExit(at="", t=0.0, invocation="new", result="core-dump", exit_code="dumped", exit_status="SEGV")


@pytest.mark.parametrize("first,cause", [
    (READY, probation.STOPPED),
    ({"invocation": "new", "active_state": "activating", "sub_state": "start", "job": 3}, probation.EXITED_BEFORE_READY),
])
def test_a_crash_the_poll_missed_is_told_by_the_exit_the_daemons_exit_hook_kept(cfg, first, cause):
    """The watched run died and systemd restarted it between two polls: what killed it comes from the exit
    kept for that invocation, and the journal asked for is the watched run's, not the restarted one's."""
    restarted = dict(READY, invocation="newer", main_pid=9, n_restarts=1)
    asked = []
    failure, invocation = watch(cfg, [first, restarted], ended=lambda inv: asked.append(inv) or SEGV)
    assert (failure.signal, failure.result, failure.exit_code, failure.cause) == ("SIGSEGV", "core-dump", None, cause)
    assert invocation == "new" and asked == ["new"] and failure.blames_release
    assert "restarted" in failure.state and failure.text().endswith("(signal SIGSEGV)")
    exited = crashes.DaemonExit(at="", t=0.0, invocation="new", result="exit-code", exit_code="exited", exit_status="4")
    failure, _ = watch(cfg, [first, restarted], ended=lambda inv: exited)
    assert (failure.exit_code, failure.signal) == (4, None)
    failure, invocation = watch(cfg, [first, restarted])  # nothing kept: still the watched run's failure
    assert invocation == "new" and failure.exit_code is None and failure.signal is None


def test_the_exit_the_hook_kept_is_found_by_invocation(cfg):
    store = Store(cfg)
    store.dir.mkdir(parents=True, exist_ok=True)
    other = crashes.DaemonExit(at="", t=0.0, invocation="other", exit_code="exited", exit_status="1")
    records.save(crashes.DaemonExits([SEGV, other]), store.dir / crashes.EXITS_FILE)
    assert crashes.exit_of(store, "new") == SEGV and crashes.exit_of(store, "gone") is None


def test_a_restart_from_outside_is_watched_again_not_held_against_the_release(cfg):
    """systemctl restart during probation: a restart job, the stop, then a run whose NRestarts did not grow
    (it counts only automatic restarts). The next run is watched again, and passes."""
    stopping = dict(READY, active_state="deactivating", sub_state="stop-sigterm", job=5)
    newer = {"invocation": "newer", "main_pid": 9}
    assert watch(cfg, [READY, dict(READY, job=5), stopping, dict(newer, active_state="activating", sub_state="start",
                                                                  job=5), dict(newer, active_state="active")]) is None


def test_a_stop_from_outside_that_is_never_undone_does_not_blame_the_release(cfg):
    stopped = dict(READY, active_state="inactive", sub_state="dead", result="success", main_pid=0)
    failure, _ = watch(cfg, [READY, dict(READY, active_state="deactivating", sub_state="stop-sigterm", job=5), stopped])
    assert "was not started" in failure.detail and not failure.blames_release


def test_a_daemon_restarted_from_outside_again_and_again_ends_the_watch(cfg):
    runs = [{"invocation": f"run{i}", "active_state": "active", "main_pid": 10 + i} for i in range(12)]
    failure, _ = watch(cfg, runs)
    assert f"restarted from outside {units.MAX_REWATCH + 1} times" in failure.detail and not failure.blames_release


def test_a_moment_when_systemd_cannot_be_asked_is_waited_out(cfg):
    assert watch(cfg, [READY, HICCUP, HICCUP, HICCUP, READY]) is None
    assert watch(cfg, [HICCUP, HICCUP, {"invocation": "new", "active_state": "activating", "sub_state": "start",
                                        "job": 3}, HICCUP, READY]) is None


def test_a_crash_while_systemd_could_not_be_asked_still_shows(cfg):
    failure, _ = watch(cfg, [READY, HICCUP, HICCUP, dict(READY, invocation="newer", n_restarts=1, main_pid=9)])
    assert "stopped during probation" in failure.detail


def test_systemd_unreachable_for_longer_than_the_grace_is_no_verdict(cfg):
    with pytest.raises(systemd.SystemdError):
        watch(cfg, [READY, HICCUP])


def test_watch_reports_a_daemon_that_never_gets_ready(cfg):
    failure, _ = watch(cfg, [{"invocation": "new", "active_state": "activating", "sub_state": "start", "job": 1}])
    assert "did not report ready within 2 s" in failure.detail and "activating/start" in failure.detail
    assert failure.exit_code is None and failure.text() == failure.detail and failure.cause == probation.NOT_READY


@pytest.mark.parametrize("ended", [
    {"active_state": "deactivating", "sub_state": "stop-sigterm", "job": 0},  # systemd is stopping it
    {"active_state": "activating", "sub_state": "auto-restart"},  # already stopped, to be started again
])
def test_a_daemon_systemd_ended_at_its_start_timeout_is_not_ready_whoever_saw_the_deadline_first(cfg, ended):
    """TimeoutStartSec= is readyTimeoutSeconds: when systemd's timer fires before this loop's deadline check
    (a poll late on a busy host), the verdict is the same as when the loop sees it first."""
    failure, _ = watch(cfg, [{"invocation": "new", "active_state": "activating", "sub_state": "start", "job": 1},
                             {"invocation": "new", "result": "timeout", "exec_main_code": "killed",
                              "exec_main_status": 15, **ended}])
    assert "did not report ready within 2 s" in failure.detail and failure.cause == probation.NOT_READY
    assert failure.result == "timeout" and failure.signal == "SIGTERM" and failure.blames_release


@pytest.mark.parametrize("status", [
    "unbounded-agent 2.0.0: connected to the API server",
    "unbounded-agent 2.0.0",
    "",  # an agent that sends no STATUS= claims nothing
    "another daemon's status line",
])
def test_watch_passes_a_daemon_that_claims_the_version_it_printed_or_none(cfg, status):
    assert watch(cfg, [{"invocation": "new", "active_state": "active", "status_text": status}],
                 expected_version="2.0.0") is None


@pytest.mark.parametrize("snaps", [
    [{"invocation": "new", "active_state": "active", "status_text": "unbounded-agent 1.0.0: ready"}],
    # honest at ready, then claims another version during the window
    [{"invocation": "new", "active_state": "active", "status_text": "unbounded-agent 2.0.0: ready"},
     {"invocation": "new", "active_state": "active", "status_text": "unbounded-agent 1.0.0: ready"}],
])
def test_watch_reports_a_daemon_that_claims_another_version_than_it_printed(cfg, snaps):
    failure, invocation = watch(cfg, snaps, expected_version="2.0.0")
    assert failure.cause == probation.VERSION_MISMATCH and invocation == "new"
    assert "claims version '1.0.0'" in failure.detail and "printed '2.0.0'" in failure.detail


@pytest.mark.parametrize("text, version", [("unbounded-agent 2.0.0: x", "2.0.0"), ("unbounded-agent 2.0.0", "2.0.0"),
                                           ("unbounded-agent ", None), ("unbounded-agent: x", None), (None, None)])
def test_claimed_version_reads_the_status_line(text, version):
    assert probation.claimed_version(text) == version


# -- the step -----------------------------------------------------------------------------------------------


def test_a_healthy_daemon_commits_the_upgrade(cfg, switched, fake_systemd):
    lay = switched
    rec = probation.run(cfg)
    assert rec.phase == record.COMMITTED == read(cfg).phase and rec.committed
    assert rec.reason == "Succeeded" and rec.reason_enum() is Reason.SUCCEEDED
    assert "upgraded from 1.0.0 to 2.0.0" in rec.message and rec.finished_at
    assert rec.probation.attempts == 1
    assert lay.link_target(layout.CURRENT) == layout.GREEN and lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert fake_systemd.calls == []  # nothing to start: the daemon already runs the new binary
    assert not Store(cfg).request_path.exists()


def test_a_crashing_daemon_goes_to_recovery_with_its_exit_and_journal(cfg, switched, fake_systemd):
    lay = switched
    switched_at = read(cfg).phase_time(record.SWITCHING)
    fake_systemd.daemon_crashed(3)
    fake_systemd.journal(
        unit_lines=["starting unbounded-agent 2.0.0", "panic: cannot parse config"],
        manager_lines=["unbounded-agent-daemon.service: Main process exited, code=exited, status=3/NOTIMPLEMENTED",
                       "unbounded-agent-daemon.service: Failed with result 'exit-code'.",
                       "unbounded-agent-daemon.service: Failed to kill control group: no such process",
                       "Started unbounded-agent-daemon.service."])
    rec = probation.run(cfg)
    assert rec.phase == record.RECOVERING == read(cfg).phase
    assert rec.failure.exit_code == 3 and rec.failure.result == "exit-code"
    assert rec.failure.text() == "the new daemon exited before it reported ready (exit code 3)"
    assert rec.failure.journal == [
        "starting unbounded-agent 2.0.0", "panic: cannot parse config",
        "unbounded-agent-daemon.service: Main process exited, code=exited, status=3/NOTIMPLEMENTED",
        "unbounded-agent-daemon.service: Failed with result 'exit-code'."]
    queries = fake_systemd.journal_queries()
    own = next(q for q in queries if "_SYSTEMD_UNIT=" in q)
    manager = next(q for q in queries if "_PID=1" in q)
    assert "_SYSTEMD_UNIT=unbounded-agent-daemon.service _SYSTEMD_INVOCATION_ID=inv-crashed" in own
    assert f"--since @{int(switched_at)}" in own and "UNIT=unbounded-agent-daemon.service _PID=1" in manager
    assert fake_systemd.calls == [("start", units.RECOVERY_UNIT)]
    assert lay.link_target(layout.CURRENT) == layout.GREEN  # probation itself changes no link


def test_the_journal_excerpt_is_bounded(cfg, switched, fake_systemd):
    fake_systemd.daemon_crashed(3)
    fake_systemd.journal(unit_lines=[f"line {i} " + "x" * 1000 for i in range(100)],
                         manager_lines=[f"Main process exited, code=exited, status={i}" for i in range(100)])
    rec = probation.run(cfg)
    journal = rec.failure.journal
    assert len(journal) == crashes.JOURNAL_LINES and all(len(line) <= 300 for line in journal)
    assert journal[0].startswith("line 85 ") and journal[-1] == "Main process exited, code=exited, status=99"


def test_probation_gives_up_after_repeated_interruptions(cfg, switched, fake_systemd):
    store = Store(cfg)
    rec = store.read()
    rec.probation.attempts = probation.MAX_ATTEMPTS  # started that often, killed each time
    store.write(rec)
    rec = probation.run(cfg)  # the daemon is healthy, but this record never got a whole window
    assert rec.phase == record.RECOVERING and rec.probation.attempts == probation.MAX_ATTEMPTS + 1
    assert f"interrupted {probation.MAX_ATTEMPTS} times" in rec.failure.detail
    assert fake_systemd.calls == [("start", units.RECOVERY_UNIT)]


def test_a_daemon_that_cannot_be_watched_gets_no_verdict(cfg, switched, fake_systemd, monkeypatch):
    """systemd unreachable past the grace: neither commit nor rollback; the record stays on probation and the
    dispatcher runs probation again (its attempts are counted)."""
    def unreachable(name):
        raise systemd.SystemdError("cannot query unbounded-agent-daemon.service over D-Bus: Connection refused")

    monkeypatch.setattr(systemd, "service_snapshot", unreachable)
    monkeypatch.setattr(probation, "DBUS_GRACE_SECONDS", 0.3)
    with pytest.raises(OpsError) as e:
        probation.run(cfg)
    assert "cannot watch the daemon" in e.value.message and "probation runs again" in e.value.message
    rec = read(cfg)
    assert rec.phase == record.PROBATION and rec.probation.attempts == 1 and fake_systemd.calls == []


def test_a_verdict_on_a_record_that_left_probation_is_dropped(cfg, switched, fake_systemd, monkeypatch):
    """Recovery (through the daemon's OnFailure=) decided while probation watched: probation's verdict
    must not overwrite it, nor start recovery a second time."""
    snapshot = fake_systemd.service_snapshot
    store = Store(cfg)

    def meanwhile(name):
        rec = store.read()
        if rec.phase == record.PROBATION:
            store.finish(rec, record.ROLLED_BACK, Reason.DAEMON_FAILED, "rolled back by recovery")
        return snapshot(name)

    monkeypatch.setattr(systemd, "service_snapshot", meanwhile)
    rec = probation.run(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.message == "rolled back by recovery"
    assert read(cfg).phase == record.ROLLED_BACK and fake_systemd.calls == []


def test_a_forced_release_that_passes_probation_leaves_quarantine(cfg, tmp_path, release, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    release()
    digest = sha(agent_body("2.0.0"))
    store = Store(cfg)
    store.quarantine_add(QuarantineEntry(digest=digest, version="2.0.0", operation="op-0"))
    store.quarantine_add(QuarantineEntry(digest="f" * 64, version="0.9.0", operation="op-older"))
    host_lock.hold(ID)
    begin(cfg, force=True)
    run_chain(cfg)
    assert probation.run(cfg).committed
    assert store.quarantined(digest) is None and [e.version for e in store.quarantine()] == ["0.9.0"]


def test_a_rollback_on_request_commits_with_its_own_words(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")
    host_lock.hold("rollback-1", "rollback")
    begin(cfg, "rollback-1", kind="rollback")
    run_chain(cfg, "rollback-1")
    assert lay.link_target(layout.CURRENT) == layout.BLUE and lay.link_target(layout.LAST_GOOD) == layout.GREEN
    rec = probation.run(cfg)
    assert rec.committed and "rolled back on request from 2.0.0 to 1.0.0" in rec.message


def test_probation_without_an_upgrade_on_probation_does_nothing(cfg, tmp_path, fake_systemd):
    seed(cfg, tmp_path)
    assert probation.run(cfg) is None and fake_systemd.calls == []


def test_no_secret_reaches_the_record_through_probation(cfg, tmp_path, release, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    release(url=SECRET_URL)
    host_lock.hold(ID)
    begin(cfg, url=SECRET_URL)
    run_chain(cfg)
    fake_systemd.daemon_crashed(3)
    probation.run(cfg)
    assert all(SECRET not in text.decode(errors="replace") for text in state_files(cfg).values())


@pytest.mark.parametrize("holder", [None, ("reset-1", "reset"), ("upgrade-other", "upgrade")])
def test_probation_refuses_and_changes_nothing_without_the_lock_for_its_operation(cfg, switched, host_lock,
                                                                                  fake_systemd, holder):
    lay = switched
    if holder:
        host_lock.hold(*holder)
    else:
        host_lock.free()
    fake_systemd.daemon_crashed(3)
    before = state_files(cfg), links(lay)
    with pytest.raises(OpsError) as e:
        probation.run(cfg)
    assert e.value.reason == Reason.HOST_LOCKED
    assert (state_files(cfg), links(lay)) == before and read(cfg).probation.attempts == 0
    assert fake_systemd.calls == []


# -- a state dir that refuses writes ---------------------------------------------------------------------------


def refuse_writes(monkeypatch, cfg, *names, err=errno.ENOSPC, times=None):
    """records.save of the named files under the state dir fails as a full (or read-only) file system does
    (the first ``times`` times, or always); returns the list of refused attempts."""
    real, refused = records.save, []

    def save(obj, path, mode=0o644):
        if Path(path).parent == Path(cfg.state_dir) and Path(path).name in names and (times is None or len(refused) < times):
            refused.append(Path(path).name)
            raise OSError(err, os.strerror(err))
        return real(obj, path, mode)

    monkeypatch.setattr(records, "save", save)
    monkeypatch.setattr(records, "STATE_RETRY_SECONDS", 0.6)
    return refused


def test_a_verdict_that_cannot_be_written_is_retried_then_fails_clearly(cfg, switched, fake_systemd, monkeypatch):
    """A full disk at the commit: retried with backoff for a bounded time, then StateUnwritable; the record stays
    on probation (the dispatcher decides it again) and nothing is rolled back."""
    refused = refuse_writes(monkeypatch, cfg, record.RECORD_FILE)
    with pytest.raises(OpsError) as e:
        probation.decide(Store(cfg), ID, None)
    assert e.value.reason is Reason.STATE_UNWRITABLE and "No space left on device" in e.value.message
    assert len(refused) >= 2 and read(cfg).phase == record.PROBATION and fake_systemd.calls == []


def test_a_verdict_written_once_the_disk_has_room_again_commits(cfg, switched, fake_systemd, monkeypatch):
    refused = refuse_writes(monkeypatch, cfg, record.RECORD_FILE, times=1)  # space is freed after the first try
    rec = probation.decide(Store(cfg), ID, None)
    assert refused and rec.committed and read(cfg).committed


def test_a_failure_that_cannot_be_recorded_still_starts_recovery(cfg, switched, fake_systemd, monkeypatch):
    refuse_writes(monkeypatch, cfg, record.RECORD_FILE)
    probation.decide(Store(cfg), ID, (Failure(detail="crashed"), "inv"))
    assert read(cfg).phase == record.PROBATION  # not written...
    assert fake_systemd.calls == [("start", units.RECOVERY_UNIT)]  # ...and recovery rolls back from the links


def test_an_attempt_that_cannot_be_counted_is_watched_anyway(cfg, switched, fake_systemd, monkeypatch):
    refused = refuse_writes(monkeypatch, cfg, record.RECORD_FILE)
    monkeypatch.setattr(probation, "decide", lambda store, id, verdict: ("decided", verdict))
    assert probation.run(cfg) == ("decided", None) and refused


def test_no_commit_when_current_no_longer_selects_the_new_binary(cfg, switched, fake_systemd):
    """Recovery flipped the links and could not record it: the healthy daemon it runs is the old binary, and
    committing would claim the new one. Recovery is started to finish, without blaming the release."""
    lay = switched
    from unbounded_agent import fsutil

    fsutil.atomic_symlink(layout.BLUE, lay.path(layout.CURRENT))
    rec = probation.decide(Store(cfg), ID, None)
    assert rec.phase == record.RECOVERING and not rec.failure.blames_release
    assert "selects unbounded-agent-blue" in rec.failure.detail
    assert fake_systemd.calls == [("start", units.RECOVERY_UNIT)]
