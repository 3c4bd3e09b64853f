"""The stage step in-process, with systemd and the network faked: what it writes to the record, the slots
and the links, what it leaves alone when it fails, and that it does nothing at all unless the host lock is
held for its operation."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import upgrade_fakes
from archives import MALFORMED
from upgrade_fakes import (
    ID,
    SECRET,
    SECRET_URL,
    URL,
    agent_body,
    begin,
    fake_download,
    hidden_files,
    links,
    read,
    seed,
    sha,
    slots,
    state_files,
    upgrade_to,
)

from unbounded_agent import hostlock, layout
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import preflight, record, stage, switch
from unbounded_agent.upgrade.record import QuarantineEntry, Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release

LIB = str(Path(__file__).resolve().parents[2] / "lib")


@pytest.fixture
def requested(cfg, tmp_path, release, host_lock, fake_systemd):
    """v1 seeded in blue, v2 served at URL, operation ID begun with the host held for it."""
    lay = seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    begin(cfg)
    return lay


def test_stage_writes_the_inactive_slot_and_never_current(cfg, requested):
    lay = requested
    before = lay.resolves(layout.CURRENT).read_bytes()
    rec = stage.run(cfg, ID)
    assert rec.phase == record.STAGED and read(cfg).phase == record.STAGED
    assert rec.from_.slot == layout.BLUE and rec.to.slot == layout.GREEN
    assert rec.from_.version == "1.0.0" and rec.from_.digest == sha(agent_body("1.0.0"))
    assert rec.to.digest == sha(agent_body("2.0.0"))
    assert rec.last_good_before.slot == layout.BLUE
    assert lay.path(layout.GREEN).read_bytes() == agent_body("2.0.0")
    assert os.stat(lay.path(layout.GREEN)).st_mode & 0o7777 == 0o755
    assert lay.resolves(layout.CURRENT).read_bytes() == before and lay.link_target(layout.CURRENT) == layout.BLUE
    assert hidden_files(lay) == []
    assert [h.phase for h in rec.history] == ["requested", "staging", "staged"]
    assert rec.progress.bytes == rec.progress.total > 0


def test_stage_reads_the_full_url_once_and_keeps_it_out_of_the_record(cfg, tmp_path, release, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    release(url=SECRET_URL)
    host_lock.hold(ID)
    begin(cfg, url=SECRET_URL)
    store = Store(cfg)
    assert store.read_request(ID).url == SECRET_URL
    rec = stage.run(cfg, ID)
    assert rec.phase == record.STAGED and rec.url == URL
    assert not store.request_path.exists()  # the secret is gone from disk once the stage has it
    assert all(SECRET not in text.decode(errors="replace") for text in state_files(cfg).values())


def test_a_download_failure_is_recorded_without_the_secret(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)
    release(url="https://releases.example/another.tar.gz")  # nothing at SECRET_URL: a 404 naming the URL
    host_lock.hold(ID)
    begin(cfg, url=SECRET_URL)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.DOWNLOAD_FAILED
    assert SECRET not in e.value.message and URL in e.value.message
    rec = read(cfg)
    assert rec.phase == record.FAILED and rec.reason == "DownloadFailed" and SECRET not in rec.message
    assert all(SECRET not in text.decode(errors="replace") for text in state_files(cfg).values())
    assert links(lay)[layout.CURRENT] == layout.BLUE and not lay.path(layout.GREEN).exists()


def test_same_content_as_current_commits_without_touching_anything(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path, "1.0.0")
    release(body=agent_body("1.0.0"))
    host_lock.hold(ID)
    begin(cfg)
    fake_systemd.calls.clear()
    before = links(lay), slots(lay)
    rec = stage.run(cfg, ID)
    assert rec.phase == record.COMMITTED and rec.same_content is True and rec.committed
    assert rec.reason == "Succeeded" and "no restart" in rec.message
    assert rec.to.slot == layout.BLUE and rec.to.digest == rec.from_.digest
    assert (links(lay), slots(lay)) == before
    # the following steps of the chain have nothing to do and say so without failing
    assert preflight.run(cfg, ID).phase == record.COMMITTED
    assert switch.run(cfg, ID).phase == record.COMMITTED
    assert fake_systemd.calls == []
    assert (links(lay), slots(lay)) == before


def test_download_failure_leaves_current_and_a_distinct_last_good(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")  # current green (v2), last-good blue (v1)
    assert (links(lay)[layout.CURRENT], links(lay)[layout.LAST_GOOD]) == (layout.GREEN, layout.BLUE)
    host_lock.hold("upgrade-second")
    begin(cfg, "upgrade-second", "https://releases.example/missing.tar.gz")
    with pytest.raises(OpsError) as e:
        stage.run(cfg, "upgrade-second")
    assert e.value.reason == Reason.DOWNLOAD_FAILED
    assert lay.link_target(layout.CURRENT) == layout.GREEN
    assert lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert lay.path(layout.BLUE).read_bytes() == agent_body("1.0.0")
    rec = read(cfg)
    assert rec.id == "upgrade-second" and rec.reason == "DownloadFailed"


def test_last_good_follows_current_before_the_inactive_slot_is_overwritten(cfg, tmp_path, release, host_lock,
                                                                           fake_systemd):
    """After a rollback current is blue and last-good green; staging must overwrite green, so last-good
    moves to blue first: a rollback from the new binary goes back to the binary that was running."""
    lay = seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")
    upgrade_to(cfg, host_lock, fake_systemd, "rollback-first", kind="rollback")
    assert (lay.link_target(layout.CURRENT), lay.link_target(layout.LAST_GOOD)) == (layout.BLUE, layout.GREEN)
    release("3.0.0", url="https://releases.example/v3.tar.gz")
    host_lock.hold("upgrade-third")
    begin(cfg, "upgrade-third", "https://releases.example/v3.tar.gz")
    rec = stage.run(cfg, "upgrade-third")
    assert rec.to.slot == layout.GREEN and lay.path(layout.GREEN).read_bytes() == agent_body("3.0.0")
    assert lay.link_target(layout.LAST_GOOD) == layout.BLUE == lay.link_target(layout.CURRENT)
    assert rec.last_good_before.slot == layout.GREEN


def test_a_failure_after_last_good_moved_points_it_back(cfg, tmp_path, release, host_lock, fake_systemd, monkeypatch):
    """The stage moves last-good to current before it writes the inactive slot; when writing the slot
    fails, last-good goes back to the slot it selected, which still holds the same binary."""
    lay = seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")
    upgrade_to(cfg, host_lock, fake_systemd, "rollback-first", kind="rollback")  # current blue, last-good green
    release("3.0.0", url="https://releases.example/v3.tar.gz")
    host_lock.hold("upgrade-third")
    begin(cfg, "upgrade-third", "https://releases.example/v3.tar.gz")
    real_rename = os.rename
    moved = []

    def rename(src, dst):
        if Path(dst) == lay.path(layout.GREEN):
            moved.append(lay.link_target(layout.LAST_GOOD))
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, "upgrade-third")
    assert e.value.reason == Reason.INSUFFICIENT_SPACE and "No space left on device" in e.value.message
    assert moved == [layout.BLUE]  # last-good did follow current before the slot was written
    assert lay.link_target(layout.LAST_GOOD) == layout.GREEN and lay.link_target(layout.CURRENT) == layout.BLUE
    assert lay.path(layout.GREEN).read_bytes() == agent_body("2.0.0") and hidden_files(lay) == []
    assert read(cfg).phase == record.FAILED


@pytest.mark.parametrize("case", ["traversal ../", "symlink", "duplicate member", "empty member", "wrong name",
                                  "truncated gzip", "gzip bomb in tar padding"])
def test_malformed_archives_fail_staging_with_invalid_archive(cfg, tmp_path, monkeypatch, host_lock, fake_systemd, case):
    lay = seed(cfg, tmp_path)
    path = MALFORMED[case](tmp_path / "bad.tar.gz", cfg.max_extracted_bytes)
    fake_download(monkeypatch, {URL: path})
    host_lock.hold(ID)
    begin(cfg)
    before = links(lay)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.INVALID_ARCHIVE
    assert read(cfg).phase == record.FAILED and read(cfg).reason == "InvalidArchive"
    assert links(lay) == before and not lay.path(layout.GREEN).exists()
    assert hidden_files(lay) == []


def test_quarantined_digest_is_refused_unless_forced(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    Store(cfg).quarantine_add(QuarantineEntry(digest=sha(agent_body("2.0.0")), version="2.0.0", operation="op-0",
                                              at="yesterday", failure="exit code 3"))
    host_lock.hold(ID)
    begin(cfg)  # the binary's digest is known only once extracted: refused by the stage
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.QUARANTINED
    assert "--force" in e.value.message and "exit code 3" in e.value.message and "op-0" in e.value.message
    assert read(cfg).reason == "Quarantined" and not lay.path(layout.GREEN).exists()
    assert links(lay)[layout.LAST_GOOD] == layout.BLUE
    host_lock.hold("upgrade-forced")
    begin(cfg, "upgrade-forced", force=True)
    assert stage.run(cfg, "upgrade-forced").phase == record.STAGED


def test_quarantined_archive_digest_is_refused_after_the_download(cfg, tmp_path, release, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    path = release()
    Store(cfg).quarantine_add(QuarantineEntry(digest="0" * 64, archive_sha256=sha(path.read_bytes()), version="2.0.0"))
    host_lock.hold(ID)
    begin(cfg)  # no digest in the request: known only after the download
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.QUARANTINED


def test_rollback_stages_last_good_as_the_candidate(cfg, tmp_path, release, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")
    before = slots(lay)
    host_lock.hold("rollback-1", "rollback")
    begin(cfg, "rollback-1", kind="rollback")
    assert not Store(cfg).request_path.exists()  # a rollback has no URL to keep
    rec = stage.run(cfg, "rollback-1")
    assert rec.kind == "rollback" and rec.phase == record.STAGED
    assert rec.to.slot == layout.BLUE and rec.from_.slot == layout.GREEN
    assert rec.to.digest == sha(agent_body("1.0.0"))
    assert slots(lay) == before  # nothing downloaded, no slot written


def test_rollback_to_a_quarantined_binary_needs_force(cfg, tmp_path, release, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    release()
    upgrade_to(cfg, host_lock, fake_systemd, "upgrade-first")
    Store(cfg).quarantine_add(QuarantineEntry(digest=sha(agent_body("1.0.0")), version="1.0.0"))
    host_lock.hold("rollback-1", "rollback")
    begin(cfg, "rollback-1", kind="rollback")
    with pytest.raises(OpsError) as e:
        stage.run(cfg, "rollback-1")
    assert e.value.reason == Reason.QUARANTINED
    host_lock.hold("rollback-2", "rollback")
    begin(cfg, "rollback-2", kind="rollback", force=True)
    assert stage.run(cfg, "rollback-2").phase == record.STAGED


def test_rollback_with_nothing_to_go_back_to_is_refused(cfg, tmp_path, host_lock, fake_systemd):
    lay = seed(cfg, tmp_path)  # fresh install: last-good is current
    host_lock.hold("rollback-1", "rollback")
    begin(cfg, "rollback-1", kind="rollback")
    before = links(lay), slots(lay)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, "rollback-1")
    assert "nothing to roll back to" in e.value.message
    assert read(cfg).phase == record.FAILED and (links(lay), slots(lay)) == before


def test_a_current_link_that_selects_no_slot_is_refused(cfg, requested):
    lay = requested
    os.unlink(lay.path(layout.CURRENT))
    os.symlink("nowhere", lay.path(layout.CURRENT))
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert "does not select an executable slot" in e.value.message
    assert read(cfg).phase == record.FAILED and not lay.path(layout.GREEN).exists()


def test_temporaries_of_an_interrupted_stage_are_removed(cfg, requested):
    lay = requested
    (lay.bin_dir / ".unbounded-agent-XYZ").write_bytes(b"half an agent")
    stage.run(cfg, ID)
    assert hidden_files(lay) == []


def test_a_request_whose_url_is_gone_fails_without_touching_the_slots(cfg, requested):
    lay = requested
    Store(cfg).remove_request()  # a stage killed after reading it
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.EXECUTION_FAILED and "URL is gone" in e.value.message
    assert read(cfg).phase == record.FAILED and not lay.path(layout.GREEN).exists()


def test_stage_runs_once_per_operation(cfg, requested):
    stage.run(cfg, ID)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)  # started again by hand: the record is past requested
    assert e.value.reason == Reason.EXECUTION_FAILED and "is not waiting to stage" in e.value.message
    assert read(cfg).phase == record.STAGED


# -- the host lock ----------------------------------------------------------------------------------------


def test_stage_refuses_and_changes_nothing_when_no_operation_holds_the_host(cfg, requested, host_lock):
    lay = requested
    host_lock.free()
    before = state_files(cfg), links(lay), slots(lay)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.HOST_LOCKED and "no host operation is running" in e.value.message
    assert (state_files(cfg), links(lay), slots(lay)) == before
    assert read(cfg).phase == record.REQUESTED and Store(cfg).read_request(ID).url == URL


def test_stage_refuses_and_changes_nothing_while_another_operation_holds_the_host(cfg, requested, host_lock):
    lay = requested
    host_lock.hold("reset-1", "reset")
    before = state_files(cfg), links(lay), slots(lay)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.HOST_LOCKED and "reset reset-1" in e.value.message
    assert (state_files(cfg), links(lay), slots(lay)) == before


def test_a_step_of_another_operation_leaves_the_record_alone(cfg, requested, host_lock):
    """The host held for a second operation whose step runs while the record still describes the first:
    the step refuses (it is not that operation's record) and writes nothing."""
    host_lock.hold("upgrade-second")
    before = state_files(cfg)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, "upgrade-second")
    assert e.value.reason == Reason.EXECUTION_FAILED and "is not waiting to stage" in e.value.message
    assert state_files(cfg) == before and read(cfg).id == ID


def test_a_killed_holder_leaves_the_host_free_and_the_step_still_refuses(cfg, requested, host_lock):
    """The lock held by another process for this very operation lets the step run; once that process is
    killed the kernel drops the lock, and the step — now belonging to no running operation — refuses."""
    host_lock.free()
    code = (f"import sys, time; sys.path.insert(0, {LIB!r}); from unbounded_agent import hostlock\n"
            f"hostlock.HostLock({ID!r}, 'upgrade').acquire(); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert child.stdout.readline() == "held\n"
        assert hostlock.require(ID, "stage").pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    before = state_files(cfg)
    with pytest.raises(OpsError) as e:
        stage.run(cfg, ID)
    assert e.value.reason == Reason.HOST_LOCKED and state_files(cfg) == before

