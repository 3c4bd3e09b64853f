"""Deciding an interrupted upgrade (resume.resolve) from the record and the links alone: failed before the
switch (current untouched, last-good as it was), probation again after it, recovery when the new slot is
not what was staged or the record was recovering."""

import pytest
import upgrade_fakes
from upgrade_fakes import ID, agent_body, begin, read, seed, upgrade_to

from unbounded_agent import fsutil, layout, systemd
from unbounded_agent.upgrade import preflight, probation, record, recovery, resume, stage, units
from unbounded_agent.upgrade.record import Failure, Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release
switched = upgrade_fakes.switched

DAEMON = systemd.DAEMON_UNIT


def resolve(cfg, **kw):
    store = Store(cfg)
    return resume.resolve(store, store.read(), **kw)


@pytest.fixture
def upgraded_once(cfg, tmp_path, release, host_lock, fake_systemd):
    """current green (v2), last-good blue (v1): the next stage moves last-good to green before writing blue."""
    lay = seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")
    release("3.0.0", url="https://releases.example/v3.tar.gz")
    host_lock.hold(ID)
    begin(cfg, url="https://releases.example/v3.tar.gz")
    fake_systemd.calls.clear()
    return lay


@pytest.mark.parametrize("phase", [record.REQUESTED, record.STAGING, record.STAGED, record.PREFLIGHTED])
def test_an_upgrade_interrupted_before_the_switch_fails_and_leaves_current(cfg, upgraded_once, fake_systemd, phase):
    lay = upgraded_once
    if phase != record.REQUESTED:
        stage.run(cfg, ID)  # last-good moved to green (current), blue overwritten with v3
        assert lay.link_target(layout.LAST_GOOD) == layout.GREEN
    if phase == record.PREFLIGHTED:
        preflight.run(cfg, ID)
    store = Store(cfg)
    store.advance(store.read(), phase)
    rec = resolve(cfg)
    assert rec.phase == record.FAILED == read(cfg).phase and rec.reason == "ExecutionFailed"
    assert f"interrupted while {phase}" in rec.message
    assert lay.link_target(layout.CURRENT) == layout.GREEN
    # last-good goes back to where it was only if that slot still holds the same binary
    expected = layout.BLUE if phase == record.REQUESTED else layout.GREEN
    assert lay.link_target(layout.LAST_GOOD) == expected
    assert lay.resolves(layout.LAST_GOOD).read_bytes() != agent_body("3.0.0")
    assert fake_systemd.calls == [] and not store.request_path.exists()


def test_last_good_is_put_back_when_its_slot_was_not_overwritten(cfg, upgraded_once, fake_systemd):
    """Killed after last-good moved to current, before the inactive slot was written."""
    lay = upgraded_once
    fsutil.atomic_symlink(layout.GREEN, lay.path(layout.LAST_GOOD))
    store = Store(cfg)
    rec = store.read()
    rec.last_good_before = record.Binary(slot=layout.BLUE, digest=record.file_digest(lay.path(layout.BLUE)))
    store.advance(rec, record.STAGING)
    assert resolve(cfg).phase == record.FAILED
    assert lay.link_target(layout.LAST_GOOD) == layout.BLUE


def test_temporaries_of_an_interrupted_link_update_are_removed(cfg, upgraded_once, fake_systemd):
    lay = upgraded_once
    (lay.bin_dir / f".{layout.CURRENT}.tmp-123").symlink_to(layout.BLUE)
    resolve(cfg)
    assert not (lay.bin_dir / f".{layout.CURRENT}.tmp-123").is_symlink()


def test_switching_with_current_on_the_new_slot_goes_back_on_probation(cfg, switched, fake_systemd):
    store = Store(cfg)
    store.advance(store.read(), record.SWITCHING)
    rec = resolve(cfg)
    assert rec.phase == record.PROBATION == read(cfg).phase
    assert fake_systemd.calls == [("reset-failed", DAEMON), ("restart", DAEMON), ("start", units.PROBATION_UNIT)]
    assert switched.link_target(layout.CURRENT) == layout.GREEN


def test_at_boot_the_starting_daemon_is_not_restarted(cfg, switched, fake_systemd):
    store = Store(cfg)
    store.advance(store.read(), record.SWITCHING)
    fake_systemd.daemon.update(active_state="inactive", job=5)
    assert resume.daemon_starting()
    rec = resolve(cfg, restart_daemon=not resume.daemon_starting())
    assert rec.phase == record.PROBATION
    assert fake_systemd.calls == [("start", units.PROBATION_UNIT)]


def test_daemon_starting_is_false_when_systemd_cannot_say(fake_systemd, monkeypatch):
    def unreachable(name):
        raise systemd.SystemdError("no bus")

    monkeypatch.setattr(systemd, "service_snapshot", unreachable)
    assert resume.daemon_starting() is False


def test_switching_before_the_links_moved_fails_cleanly(cfg, switched, fake_systemd):
    lay = switched
    fsutil.atomic_symlink(layout.BLUE, lay.path(layout.CURRENT))
    store = Store(cfg)
    store.advance(store.read(), record.SWITCHING)
    rec = resolve(cfg)
    assert rec.phase == record.FAILED and "before the switch" in rec.message
    assert lay.link_target(layout.CURRENT) == layout.BLUE and lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert fake_systemd.calls == []


def test_switching_with_a_dangling_current_puts_it_back(cfg, switched, fake_systemd):
    lay = switched
    lay.path(layout.CURRENT).unlink()  # killed between removing and renaming (cannot happen with rename,
    store = Store(cfg)                 # but a hand-edited host can look like this)
    store.advance(store.read(), record.SWITCHING)
    rec = resolve(cfg)
    assert rec.phase == record.FAILED
    assert lay.link_target(layout.CURRENT) == layout.BLUE and lay.resolves(layout.CURRENT) is not None


def test_switching_with_a_new_slot_that_is_not_what_was_staged_recovers(cfg, switched, fake_systemd):
    lay = switched
    lay.path(layout.GREEN).write_bytes(b"#!/bin/sh\necho tampered\n")
    store = Store(cfg)
    store.advance(store.read(), record.SWITCHING)
    rec = resolve(cfg)
    assert rec.phase == record.RECOVERING and "does not hold the staged binary" in rec.failure.detail
    assert fake_systemd.calls == [("start", units.RECOVERY_UNIT)]
    recovery.run(cfg)  # the host is held for ID (the dispatcher): recovery goes on
    assert read(cfg).phase == record.ROLLED_BACK and lay.link_target(layout.CURRENT) == layout.BLUE


def test_probation_interrupted_is_watched_again(cfg, switched, fake_systemd):
    rec = resolve(cfg)
    assert rec.phase == record.PROBATION and fake_systemd.calls == [("start", units.PROBATION_UNIT)]


def test_recovery_interrupted_is_started_again(cfg, switched, fake_systemd):
    store = Store(cfg)
    store.advance(store.read(), record.RECOVERING, failure=Failure(detail="exit code 3"))
    rec = resolve(cfg)
    assert rec.phase == record.RECOVERING and fake_systemd.calls == [("start", units.RECOVERY_UNIT)]


def test_interrupted_probation_converges_within_its_attempts(cfg, switched, fake_systemd):
    """Each interruption of probation is resolved by starting it again; the attempt after the last one
    decides for recovery even though the daemon looks healthy."""
    store = Store(cfg)
    for _ in range(probation.MAX_ATTEMPTS):
        rec = store.read()
        rec.probation.attempts += 1  # a probation unit that was killed while watching
        store.write(rec)
        assert resolve(cfg).phase == record.PROBATION
    rec = probation.run(cfg)
    assert rec.phase == record.RECOVERING and f"interrupted {probation.MAX_ATTEMPTS} times" in rec.failure.detail
    assert fake_systemd.calls.count(("start", units.PROBATION_UNIT)) == probation.MAX_ATTEMPTS


def test_a_terminal_record_is_left_alone(cfg, switched, fake_systemd):
    assert probation.run(cfg).committed
    before = read(cfg)
    assert resolve(cfg) == before and read(cfg) == before and fake_systemd.calls == []
