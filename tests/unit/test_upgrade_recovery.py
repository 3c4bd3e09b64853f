"""Recovery: rolling a failed upgrade back to the binary it replaced — links, quarantine, rollback signal,
the restored daemon (start limit included) — and when it may act at all: always on a recovering record, on
one still on probation only when no operation holds the host (it takes the host itself); while probation's
own operation holds the host probation decides, and while another operation holds it nothing changes."""

import errno
import os
import types
from pathlib import Path

import pytest
import upgrade_fakes
from upgrade_fakes import (
    ID,
    SECRET,
    SECRET_URL,
    agent_body,
    begin,
    links,
    read,
    run_chain,
    seed,
    sha,
    slots,
    state_files,
    upgrade_to,
)

from unbounded_agent import hostlock, layout, records, systemd
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import probation, record, recovery, stage, units
from unbounded_agent.upgrade.record import Failure, Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release
switched = upgrade_fakes.switched

DAEMON = systemd.DAEMON_UNIT


def recovering(cfg, detail="the new daemon exited before it reported ready", **failure):
    store = Store(cfg)
    return store.advance(store.read(), record.RECOVERING, failure=Failure(detail=detail, **failure))


def assert_rolled_back(cfg, lay):
    rec = read(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.reason == "DaemonFailed"
    assert rec.reason_enum() is Reason.DAEMON_FAILED and rec.restored_daemon == "active"
    assert lay.link_target(layout.CURRENT) == layout.BLUE and lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert lay.resolves(layout.COMPAT).read_bytes() == agent_body("1.0.0")
    return rec


# -- rolling back -------------------------------------------------------------------------------------------


def test_failed_probation_rolls_back_quarantines_and_signals(cfg, switched, fake_systemd, host_lock):
    lay = switched
    fake_systemd.daemon_crashed(3)
    assert probation.run(cfg).phase == record.RECOVERING
    fake_systemd.calls.clear()
    rec = recovery.run(cfg)  # started by probation: the dispatcher still holds the host for ID
    assert rec.phase == record.ROLLED_BACK and rec == read(cfg)
    assert_rolled_back(cfg, lay)
    assert "version 2.0.0 failed on probation" in rec.message and "exit code 3" in rec.message
    assert "rolled back to 1.0.0" in rec.message and "quarantined" in rec.message
    assert fake_systemd.calls == [("reset-failed", DAEMON), ("restart", DAEMON)]
    assert lay.path(layout.GREEN).read_bytes() == agent_body("2.0.0")  # kept for inspection, never run again
    signal = Store(cfg).read_signal()
    assert signal.operation == f"op-{ID}" and signal.kind == "upgrade"
    assert signal.failed.version == "2.0.0" and signal.failed.slot == layout.GREEN
    assert signal.restored.version == "1.0.0" and signal.restored.slot == layout.BLUE
    assert signal.failure.exit_code == 3 and "rolled back to 1.0.0" in signal.failure_message
    assert '"failureMessage"' in Store(cfg).signal_path.read_text()  # the key the restored daemon reads
    entry = Store(cfg).quarantined(sha(agent_body("2.0.0")))
    assert entry.version == "2.0.0" and entry.operation == f"op-{ID}" and "exit code 3" in entry.failure
    assert entry.archive_sha256 == rec.to.archive_sha256


def test_the_same_release_is_refused_after_its_rollback(cfg, switched, fake_systemd, host_lock):
    fake_systemd.daemon_crashed(3)
    probation.run(cfg)
    recovery.run(cfg)
    host_lock.hold("upgrade-again")
    begin(cfg, "upgrade-again")
    with pytest.raises(OpsError) as e:
        stage.run(cfg, "upgrade-again")
    assert e.value.reason == Reason.QUARANTINED and "--force" in e.value.message


def test_recovery_of_a_rollback_on_request_goes_back_to_what_was_running(cfg, tmp_path, release, host_lock,
                                                                         fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")  # v2 in green, current
    host_lock.hold("rollback-1", "rollback")
    begin(cfg, "rollback-1", kind="rollback")
    run_chain(cfg, "rollback-1")  # v1 in blue is current now, and it crashes
    fake_systemd.daemon_crashed(3)
    probation.run(cfg)
    rec = recovery.run(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.kind == "rollback"
    assert lay.link_target(layout.CURRENT) == layout.GREEN == lay.link_target(layout.LAST_GOOD)
    assert Store(cfg).quarantined(sha(agent_body("1.0.0"))).version == "1.0.0"


def test_recovery_when_both_slots_lost_the_previous_binary_restores_the_packaged_agent(cfg, switched, fake_systemd,
                                                                                     tmp_path):
    """Neither last-good nor the from slot holds the binary the upgrade replaced: the agent the package ships
    goes into the from slot, and the node runs it (a working agent rather than none)."""
    lay = switched
    lay.path(layout.BLUE).write_bytes(b"#!/bin/sh\necho overwritten\n")
    recovering(cfg)
    rec = recovery.run(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.restored_daemon == "active"
    assert lay.link_target(layout.CURRENT) == layout.BLUE == lay.link_target(layout.LAST_GOOD)
    assert lay.path(layout.BLUE).read_bytes() == (tmp_path / "packaged").read_bytes()
    assert "restored the agent the package ships" in rec.message and "rolled back to 1.0.0" in rec.message
    assert Store(cfg).read_signal().restored.digest == sha((tmp_path / "packaged").read_bytes())


def test_recovery_when_nothing_can_be_restored_fails_for_good(cfg, switched, fake_systemd, tmp_path):
    lay = switched
    lay.path(layout.BLUE).write_bytes(b"#!/bin/sh\necho overwritten\n")
    (tmp_path / "packaged").unlink()
    recovering(cfg)
    before = links(lay)
    with pytest.raises(OpsError) as e:
        recovery.run(cfg)
    assert "cannot roll back" in e.value.message
    rec = read(cfg)
    assert rec.phase == record.FAILED and rec.reason == "DaemonFailed" and "cannot roll back" in rec.message
    assert links(lay) == before and fake_systemd.calls == []


def test_recovery_outside_probation_changes_nothing(cfg, tmp_path, fake_systemd):
    lay = seed(cfg, tmp_path)
    before = links(lay), slots(lay)
    assert recovery.run(cfg) is None
    assert (links(lay), slots(lay)) == before and fake_systemd.calls == []


def test_after_a_reset_probation_and_recovery_make_nothing(cfg, fake_systemd):
    """No agent, no state dir: the daemon's OnFailure= or a stray probation start must not bring the
    agent's directories back."""
    assert probation.run(cfg) is None and recovery.run(cfg) is None
    assert not cfg.state_dir.exists() and not cfg.bin_dir.exists() and fake_systemd.calls == []


def test_recovery_after_a_commit_changes_nothing(cfg, switched, fake_systemd):
    lay = switched
    assert probation.run(cfg).committed
    before = state_files(cfg), links(lay)
    assert recovery.run(cfg).phase == record.COMMITTED
    # the daemon's OnFailure= after a commit: the dispatcher decides whether a recover request is due
    assert (state_files(cfg), links(lay)) == before and fake_systemd.calls == [("start", units.DISPATCH_UNIT)]


def test_recovery_runs_once(cfg, switched, fake_systemd):
    lay = switched
    recovering(cfg)
    recovery.run(cfg)
    fake_systemd.calls.clear()
    before = state_files(cfg), links(lay)
    assert recovery.run(cfg).phase == record.ROLLED_BACK
    assert (state_files(cfg), links(lay)) == before and fake_systemd.calls == []


def test_no_secret_reaches_the_quarantine_or_the_signal(cfg, tmp_path, release, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    release(url=SECRET_URL)
    host_lock.hold(ID)
    begin(cfg, url=SECRET_URL)
    run_chain(cfg)
    fake_systemd.daemon_crashed(3)
    probation.run(cfg)
    recovery.run(cfg)
    files = state_files(cfg)
    assert {"upgrade.json", "quarantine.json", "rollback-signal.json"} <= set(files)
    assert all(SECRET not in text.decode(errors="replace") for text in files.values())


# -- the restored daemon ------------------------------------------------------------------------------------


def test_recovery_through_onfailure_records_the_start_limit(cfg, switched, fake_systemd, host_lock):
    """The daemon's OnFailure= with nobody watching (probation gone, the host free): recovery records how
    the daemon failed itself."""
    host_lock.free()
    fake_systemd.daemon_crashed(3, active_state="failed", sub_state="failed", result="start-limit-hit")
    fake_systemd.journal(unit_lines=["panic: bad flag"])
    rec = recovery.run(cfg)
    assert rec.phase == record.ROLLED_BACK
    assert rec.failure.result == "start-limit-hit" and rec.failure.exit_code == 3
    assert "result start-limit-hit" in rec.failure.detail and rec.failure.journal == ["panic: bad flag"]
    assert [h.phase for h in rec.history][-3:] == ["probation", "recovering", "rolled-back"]


def test_recovery_waits_out_the_start_limit_when_restart_is_refused(cfg, switched, fake_systemd, monkeypatch):
    slept = []
    monkeypatch.setattr(recovery, "time", types.SimpleNamespace(sleep=slept.append, monotonic=lambda: 0.0))
    fake_systemd.fail_restart = True
    recovering(cfg, "x")
    rec = recovery.run(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.restored_daemon == "active"
    assert slept == [65.0]  # StartLimitIntervalSec=60s, plus 5 s
    assert fake_systemd.calls[-1] == ("start", DAEMON)


@pytest.mark.parametrize("usec,wait", [(600_000_000, units.START_LIMIT_WAIT_MAX), (0, 65.0), (2**64 - 1, 65.0),
                                       (10_000_000, 15.0)])
def test_the_start_limit_wait_is_bounded(fake_systemd, usec, wait):
    fake_systemd.start_limit_usec = usec
    assert recovery._start_limit_interval() == wait


def test_a_restored_daemon_that_does_not_come_up_ends_the_rollback_at_once(cfg, switched, fake_systemd, monkeypatch):
    t = [0.0]
    monkeypatch.setattr(recovery, "time", types.SimpleNamespace(sleep=lambda s: t.__setitem__(0, t[0] + s),
                                                                monotonic=lambda: t[0]))
    recovering(cfg)

    def restart_fails(name, mode="replace"):
        fake_systemd.calls.append(("restart", name))
        fake_systemd.daemon.update(active_state="failed", sub_state="failed", job=0, result="exit-code")

    monkeypatch.setattr(systemd, "restart_unit", restart_fails)
    with pytest.raises(OpsError) as e:
        recovery.run(cfg)
    assert e.value.reason == Reason.DAEMON_NOT_RESTARTED and "it failed again (result exit-code)" in e.value.message
    rec = read(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.restored_daemon == "failed" and rec.reason == "DaemonNotRestarted"
    assert "the restored daemon is not running: it failed again" in rec.message
    assert t[0] < 5  # a failed daemon is not waited for


@pytest.mark.parametrize("how", ["masked", "refused"])
def test_a_daemon_systemd_will_not_start_ends_in_a_terminal_record(cfg, switched, fake_systemd, host_lock, monkeypatch,
                                                                   how):
    """Masked, or a start refused outright: never recovering for ever with the host held."""
    lay = switched
    recovering(cfg)
    host_lock.free()
    if how == "masked":
        fake_systemd.daemon.update(load_state="masked")
    else:
        def refuse(name, mode="replace"):
            raise systemd.SystemdError(f"RestartUnit({name}) failed: Unit has a bad unit file setting (org.freedesktop.systemd1.BadUnitSetting)")
        monkeypatch.setattr(systemd, "restart_unit", refuse)
    with pytest.raises(OpsError) as e:
        recovery.run(cfg)
    assert e.value.reason == Reason.DAEMON_NOT_RESTARTED
    rec = read(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.reason == "DaemonNotRestarted" and rec.restored_daemon == how
    assert ("is masked" if how == "masked" else "bad unit file setting") in rec.message
    assert lay.link_target(layout.CURRENT) == layout.BLUE  # rolled back all the same
    assert hostlock.holder() is None  # and the host is free for the next operation


def test_a_refused_reset_failed_does_not_stop_the_rollback(cfg, switched, fake_systemd, monkeypatch):
    def refuse(name):
        raise systemd.SystemdError("ResetFailedUnit: Access denied")

    monkeypatch.setattr(systemd, "reset_failed", refuse)
    recovering(cfg)
    assert recovery.run(cfg).phase == record.ROLLED_BACK


# -- who may act: the host lock -----------------------------------------------------------------------------


def test_on_probation_with_the_host_free_recovery_takes_it_for_the_rollback(cfg, switched, fake_systemd, host_lock):
    lay = switched
    host_lock.free()
    fake_systemd.daemon_crashed(3, active_state="failed", sub_state="failed", result="exit-code")
    seen = []
    fake_systemd.on_restart = lambda name: seen.append(hostlock.holder())
    recovery.run(cfg)
    assert_rolled_back(cfg, lay)
    assert [(h.operation, h.kind) for h in seen] == [(ID, "recovery")]
    assert hostlock.holder() is None  # released once the record is final


def test_on_probation_with_the_host_held_for_its_operation_probation_decides(cfg, switched, fake_systemd):
    lay = switched  # the host held for ID: its probation unit watches
    fake_systemd.busy_units.add(units.PROBATION_UNIT)
    fake_systemd.daemon_crashed(3, active_state="failed", sub_state="failed")
    before = state_files(cfg), links(lay)
    assert recovery.run(cfg).phase == record.PROBATION
    assert (state_files(cfg), links(lay)) == before and fake_systemd.calls == []
    # ... and probation does decide: recovering, then recovery (started by it) rolls back
    assert probation.run(cfg).phase == record.RECOVERING
    recovery.run(cfg)
    assert_rolled_back(cfg, lay)


def test_on_probation_with_nobody_watching_recovery_acts_under_the_operations_hold(cfg, switched, fake_systemd):
    """The host held for the record's operation but no probation unit at work (it cannot start, e.g.
    masked): the daemon's OnFailure= is the only way back, and recovery rolls back without taking the
    lock from the dispatcher."""
    lay = switched
    fake_systemd.daemon_crashed(3, active_state="failed", sub_state="failed")
    seen = []
    fake_systemd.on_restart = lambda name: seen.append(hostlock.holder())
    recovery.run(cfg)
    rec = assert_rolled_back(cfg, lay)
    assert rec.failure.exit_code == 3
    assert [(h.operation, h.kind, h.pid) for h in seen] == [(ID, "upgrade", os.getpid())]
    assert hostlock.holder().kind == "upgrade"  # still the dispatcher's


def test_when_systemd_cannot_say_whether_probation_watches_recovery_leaves_it_to_probation(cfg, switched, fake_systemd):
    lay = switched

    def unreachable(names):
        raise systemd.SystemdError("cannot query units over D-Bus: Connection refused")

    fake_systemd.on_busy = unreachable
    before = state_files(cfg), links(lay)
    assert recovery.run(cfg).phase == record.PROBATION
    assert (state_files(cfg), links(lay)) == before and fake_systemd.calls == []


@pytest.mark.parametrize("phase", [record.PROBATION, record.RECOVERING])
def test_with_the_host_held_by_another_operation_recovery_changes_nothing(cfg, switched, fake_systemd, host_lock,
                                                                          phase):
    lay = switched
    if phase == record.RECOVERING:
        recovering(cfg)
    host_lock.hold("reset-1", "reset")
    fake_systemd.daemon_crashed(3, active_state="failed", sub_state="failed")
    before = state_files(cfg), links(lay)
    assert recovery.run(cfg).phase == phase
    assert (state_files(cfg), links(lay)) == before and fake_systemd.calls == []
    assert hostlock.holder().operation == "reset-1"


@pytest.mark.parametrize("held", [True, False])
def test_a_recovering_record_is_rolled_back_whether_or_not_its_operation_holds_the_host(cfg, switched, fake_systemd,
                                                                                        host_lock, held):
    lay = switched
    recovering(cfg)
    if not held:
        host_lock.free()  # the dispatcher gone (killed) with the record recovering
    seen = []
    fake_systemd.on_restart = lambda name: seen.append(hostlock.holder())
    recovery.run(cfg)
    assert_rolled_back(cfg, lay)
    assert [h.operation for h in seen] == [ID]
    assert (hostlock.holder() is not None) == held  # recovery releases only a lock it took


# -- a state dir that refuses writes --------------------------------------------------------------------------


def refuse_writes(monkeypatch, cfg):
    """Every records.save under the state dir fails as on a full file system (links still can be made)."""
    real = records.save

    def save(obj, path, mode=0o644):
        if Path(path).parent == Path(cfg.state_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, path, mode)

    monkeypatch.setattr(records, "save", save)
    monkeypatch.setattr(records, "STATE_RETRY_SECONDS", 0.3)
    return lambda: monkeypatch.setattr(records, "save", real)


def test_with_a_full_state_dir_the_links_flip_first_and_the_rollback_happens(cfg, switched, fake_systemd,
                                                                             monkeypatch, host_lock):
    """Probation could not record its verdict: recovery, finding the record on probation with nobody watching,
    flips the links and restarts the daemon before it writes anything; then it says what it could not write."""
    lay = switched
    fake_systemd.daemon_crashed(3, active_state="failed", sub_state="failed")
    room_again = refuse_writes(monkeypatch, cfg)
    with pytest.raises(OpsError) as e:
        recovery.run(cfg)
    assert e.value.reason is Reason.STATE_UNWRITABLE and "No space left on device" in e.value.message
    assert "rolled back to 1.0.0" in e.value.message
    assert lay.link_target(layout.CURRENT) == layout.BLUE == lay.link_target(layout.LAST_GOOD)
    assert ("restart", DAEMON) in fake_systemd.calls and fake_systemd.daemon["active_state"] == "active"
    assert read(cfg).phase == record.PROBATION  # nothing could be written
    # once there is room again, recovery (run again by the dispatcher) finishes the record without a second restart
    room_again()
    fake_systemd.calls.clear()
    rec = recovery.run(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.restored_daemon == "active"
    assert ("restart", DAEMON) not in fake_systemd.calls
    assert Store(cfg).quarantined(sha(agent_body("2.0.0"))) is not None


def test_a_release_not_to_blame_is_rolled_back_but_not_quarantined(cfg, switched, fake_systemd):
    recovering(cfg, "the new daemon was not started (state inactive/dead, result success)", blames_release=False)
    rec = recovery.run(cfg)
    assert rec.phase == record.ROLLED_BACK and "not quarantined" in rec.message
    assert Store(cfg).quarantine() == []


def test_a_rollback_after_the_commit_says_so(cfg, switched, fake_systemd):
    assert probation.run(cfg).committed
    store = Store(cfg)
    rec = store.advance(read(cfg), record.RECOVERING, after_commit=True, reopened_by="recover-1",
                        failure=Failure(detail="the committed daemon crashed 3 times within 600 s of its commit",
                                        exit_code=1))
    rec = recovery.run(cfg)
    assert rec.phase == record.ROLLED_BACK and rec.reason == "DaemonFailedAfterCommit"
    assert rec.reason_enum() is Reason.DAEMON_FAILED_AFTER_COMMIT
    assert "version 2.0.0 failed after its commit" in rec.message and "exit code 1" in rec.message
    assert [h.phase for h in rec.history][-4:] == ["probation", "committed", "recovering", "rolled-back"]
    signal = store.read_signal()
    assert signal.after_commit and signal.request_id == ID and signal.reason == "DaemonFailedAfterCommit"
    assert "kept failing after its commit" in signal.failure_message
    assert "after its commit" in rec.describe()
