"""The switch step: last-good keeps the binary being left, current selects the candidate, the record says
probation before the daemon is restarted and probation started — and nothing moves unless the host lock is
held for the operation and the slots still hold what was staged."""

import pytest
import upgrade_fakes
from upgrade_fakes import ID, begin, links, read, seed, slots, state_files

from unbounded_agent import fsutil, layout, systemd
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import preflight, record, stage, switch, units
from unbounded_agent.upgrade.record import Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release

DAEMON = systemd.DAEMON_UNIT


@pytest.fixture
def preflighted(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    begin(cfg)
    stage.run(cfg, ID)
    preflight.run(cfg, ID)
    fake_systemd.calls.clear()
    return lay


def test_switch_moves_current_keeps_last_good_and_starts_probation(cfg, preflighted, fake_systemd):
    lay = preflighted
    rec = switch.run(cfg, ID)
    assert rec.phase == record.PROBATION == read(cfg).phase
    assert lay.link_target(layout.CURRENT) == layout.GREEN and lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert lay.link_target(layout.COMPAT) == layout.CURRENT
    assert lay.resolves(layout.COMPAT).read_bytes() == lay.path(layout.GREEN).read_bytes()
    assert [h.phase for h in rec.history][-2:] == ["switching", "probation"]
    assert rec.switched_at and rec.probation.started_at and rec.probation.attempts == 0
    assert rec.probation.old_invocation == "inv1"  # the daemon before the restart: a new one must come
    assert fake_systemd.calls == [("reset-failed", DAEMON), ("restart", DAEMON), ("start", units.PROBATION_UNIT)]


def test_switch_without_preflight_is_refused(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    begin(cfg)
    stage.run(cfg, ID)
    before = links(lay)
    with pytest.raises(OpsError) as e:
        switch.run(cfg, ID)
    assert e.value.reason == Reason.EXECUTION_FAILED and "is not waiting to switch" in e.value.message
    assert links(lay) == before and read(cfg).phase == record.STAGED


def test_current_changed_since_staging_fails_the_switch(cfg, preflighted, fake_systemd):
    lay = preflighted
    fsutil.atomic_symlink(layout.GREEN, lay.path(layout.CURRENT))  # someone moved it by hand
    with pytest.raises(OpsError) as e:
        switch.run(cfg, ID)
    assert e.value.reason == Reason.EXECUTION_FAILED and "changed since staging" in e.value.message
    assert read(cfg).phase == record.FAILED
    assert lay.link_target(layout.LAST_GOOD) == layout.BLUE and fake_systemd.calls == []


def test_a_slot_changed_after_preflight_fails_the_switch(cfg, preflighted, fake_systemd):
    lay = preflighted
    lay.path(layout.GREEN).write_bytes(b"#!/bin/sh\nexit 1\n")
    with pytest.raises(OpsError) as e:
        switch.run(cfg, ID)
    assert "no longer holds the preflighted binary" in e.value.message
    assert read(cfg).phase == record.FAILED and lay.link_target(layout.CURRENT) == layout.BLUE
    assert fake_systemd.calls == []


def test_a_daemon_that_cannot_be_restarted_leaves_the_record_on_probation(cfg, preflighted, fake_systemd):
    """The record is durable before the restart: a failed restart still ends in probation (the dispatcher
    starts probation again, and a daemon that never gets ready rolls back)."""
    lay = preflighted
    fake_systemd.fail_restart = True
    with pytest.raises(OpsError) as e:
        switch.run(cfg, ID)
    assert e.value.reason == Reason.EXECUTION_FAILED
    assert read(cfg).phase == record.PROBATION and lay.link_target(layout.CURRENT) == layout.GREEN
    assert ("start", units.PROBATION_UNIT) not in fake_systemd.calls


def test_a_refused_reset_failed_does_not_stop_the_switch(cfg, preflighted, fake_systemd, monkeypatch):
    def refuse(name):
        raise systemd.SystemdError("ResetFailedUnit: Access denied")

    monkeypatch.setattr(systemd, "reset_failed", refuse)
    assert switch.run(cfg, ID).phase == record.PROBATION
    assert fake_systemd.calls == [("restart", DAEMON), ("start", units.PROBATION_UNIT)]


def test_enter_probation_without_restart_only_starts_the_probation_unit(cfg, preflighted, fake_systemd):
    store = Store(cfg)
    rec = store.advance(store.read(), record.SWITCHING)
    rec = switch.enter_probation(store, rec, restart=False)
    assert rec.phase == record.PROBATION and fake_systemd.calls == [("start", units.PROBATION_UNIT)]


@pytest.mark.parametrize("holder", [None, ("reset-1", "reset"), ("upgrade-other", "upgrade")])
def test_switch_refuses_and_changes_nothing_without_the_lock_for_its_operation(cfg, preflighted, host_lock,
                                                                               fake_systemd, holder):
    lay = preflighted
    if holder:
        host_lock.hold(*holder)
    else:
        host_lock.free()
    before = state_files(cfg), links(lay), slots(lay)
    with pytest.raises(OpsError) as e:
        switch.run(cfg, ID)
    assert e.value.reason == Reason.HOST_LOCKED
    assert (state_files(cfg), links(lay), slots(lay)) == before and fake_systemd.calls == []
    host_lock.hold(ID)  # the same step goes on once the host is held for its operation
    assert switch.run(cfg, ID).phase == record.PROBATION
