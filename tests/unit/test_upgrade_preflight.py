"""The preflight step: running a candidate's `version` (only the exit status counts, within a timeout, with
bounded output, retrying while the file is busy, a clear word for a file that cannot run here), and what
the step records — current is never touched, and nothing happens without the host lock."""

import os
import threading
import time

import pytest
import upgrade_fakes
from upgrade_fakes import ID, agent_body, begin, links, read, seed, slots, state_files

from unbounded_agent import layout
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import preflight, record, stage, switch
from unbounded_agent.upgrade.preflight import run_candidate

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release

ARM64_ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\xb7\x00\x01\x00\x00\x00" + bytes(44)


def script(tmp_path, body: str, name="cand"):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


# -- run_candidate ------------------------------------------------------------------------------------------


def test_exit_zero_passes_and_reads_the_version(tmp_path):
    r = run_candidate(script(tmp_path, 'echo "unbounded-agent 2.0.0"\n'), timeout=10)
    assert r.ok and r.version == "2.0.0" and r.detail == "exit status 0"


def test_exit_42_fails_with_status_and_output(tmp_path):
    r = run_candidate(script(tmp_path, "echo nope >&2; exit 42\n"), timeout=10)
    assert not r.ok and r.detail == "exit status 42" and r.excerpt() == "nope"


def test_a_candidate_killed_by_a_signal_says_which(tmp_path):
    r = run_candidate(script(tmp_path, "kill -SEGV $$\n"), timeout=10)
    assert not r.ok and r.detail == "killed by signal SIGSEGV"


def test_a_hanging_version_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    r = run_candidate(script(tmp_path, f"sleep 30 & echo $! > {pidfile}; wait\n"), timeout=1)
    assert not r.ok and "did not exit within 1 s" in r.detail
    # the background child was in the killed process group: it dies too (at most a zombie briefly)
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {pid} still running")


def test_endless_output_is_bounded(tmp_path):
    r = run_candidate(script(tmp_path, "yes unbounded-agent | head -c 50000000; exit 3\n"), timeout=20, max_output=1000)
    assert not r.ok and r.detail == "exit status 3" and len(r.output) == 1000
    assert len(r.excerpt()) <= 402 and r.excerpt().endswith(" …")


def test_wrong_architecture_is_named(tmp_path):
    p = tmp_path / "arm64"
    # an ELF header for aarch64 (e_machine 0xb7): the kernel refuses it with ENOEXEC
    p.write_bytes(ARM64_ELF)
    p.chmod(0o755)
    r = run_candidate(p, timeout=5)
    assert not r.ok and "Exec format error" in r.detail and "architecture" in r.detail


def test_missing_interpreter(tmp_path):
    p = tmp_path / "cand"
    p.write_text("#!/nonexistent/python\n")
    p.chmod(0o755)
    r = run_candidate(p, timeout=5)
    assert not r.ok and "No such file or directory" in r.detail


def test_busy_text_file_is_retried_until_released(tmp_path):
    p = tmp_path / "cand"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o755)
    os.write(fd, b"#!/bin/sh\necho unbounded-agent 3.0\n")
    threading.Timer(0.5, os.close, [fd]).start()  # a writer still holds it: exec gives ETXTBSY
    started = time.monotonic()
    r = run_candidate(p, timeout=10)
    assert r.ok and r.version == "3.0"
    assert time.monotonic() - started >= 0.4  # it did have to wait (a bound the code sets, not a timing assert)


def test_the_candidate_runs_with_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UNBOUNDED_SECRET", "leaked")
    r = run_candidate(script(tmp_path, 'echo "x${UNBOUNDED_SECRET}x $PATH"\n'), timeout=10)
    assert r.ok and r.output.decode().split() == ["xx", "/usr/sbin:/usr/bin:/sbin:/bin"]


# -- the step -----------------------------------------------------------------------------------------------


@pytest.fixture
def staged(cfg, tmp_path, release, host_lock, fake_systemd):
    """Stage whatever body the test serves; returns (layout, stage(body))."""
    lay = seed(cfg, tmp_path)
    host_lock.hold(ID)

    def run(body: bytes):
        release(body=body)
        begin(cfg)
        return stage.run(cfg, ID)

    return lay, run


def test_preflight_records_the_candidates_version(cfg, staged, fake_systemd):
    lay, stage_body = staged
    stage_body(agent_body("2.0.0"))
    before = links(lay)
    rec = preflight.run(cfg, ID)
    assert rec.phase == record.PREFLIGHTED == read(cfg).phase and rec.to.version == "2.0.0"
    assert links(lay) == before and fake_systemd.calls == [("start", f"unbounded-upgrade-switch@{ID}.service")]


@pytest.mark.parametrize("body,detail", [
    (b"#!/bin/sh\necho broken >&2\nexit 42\n", "exit status 42"),
    (ARM64_ELF, "Exec format error"),
    (b"just text, not a program\n", "Exec format error"),
])
def test_preflight_failure_leaves_current_untouched(cfg, staged, fake_systemd, body, detail):
    lay, stage_body = staged
    stage_body(body)
    before = links(lay)
    with pytest.raises(OpsError) as e:
        preflight.run(cfg, ID)
    assert e.value.reason == Reason.PREFLIGHT_FAILED and detail in e.value.message
    assert "verify agent binary" in e.value.message
    rec = read(cfg)
    assert rec.phase == record.FAILED and rec.reason == "PreflightFailed" and detail in rec.message
    assert links(lay)[layout.CURRENT] == layout.BLUE
    assert links(lay)[layout.LAST_GOOD] == layout.BLUE == before[layout.LAST_GOOD]
    # a switch started anyway (by hand) finds the failed record and changes nothing
    fake_systemd.calls.clear()
    assert switch.run(cfg, ID).phase == record.FAILED
    assert links(lay)[layout.CURRENT] == layout.BLUE and fake_systemd.calls == []


def test_preflight_output_goes_into_the_message_bounded(cfg, staged):
    _, stage_body = staged
    stage_body(b"#!/bin/sh\nyes 'panic: no config' | head -c 100000\nexit 2\n")
    with pytest.raises(OpsError) as e:
        preflight.run(cfg, ID)
    assert "panic: no config" in e.value.message and len(e.value.message) < 1000


def test_a_slot_changed_after_staging_fails_preflight(cfg, staged):
    lay, stage_body = staged
    stage_body(agent_body("2.0.0"))
    lay.path(layout.GREEN).write_bytes(agent_body("6.6.6"))
    with pytest.raises(OpsError) as e:
        preflight.run(cfg, ID)
    assert e.value.reason == Reason.PREFLIGHT_FAILED and "no longer holds the staged binary" in e.value.message
    assert read(cfg).phase == record.FAILED and lay.link_target(layout.CURRENT) == layout.BLUE


def test_preflight_before_staging_is_refused(cfg, tmp_path, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    host_lock.hold(ID)
    begin(cfg)
    with pytest.raises(OpsError) as e:
        preflight.run(cfg, ID)
    assert e.value.reason == Reason.EXECUTION_FAILED and "is not waiting to preflight" in e.value.message
    assert read(cfg).phase == record.REQUESTED


@pytest.mark.parametrize("holder", [None, ("reset-1", "reset")])
def test_preflight_refuses_and_changes_nothing_without_the_lock_for_its_operation(cfg, staged, host_lock, holder):
    lay, stage_body = staged
    stage_body(agent_body("2.0.0"))
    if holder:
        host_lock.hold(*holder)
    else:
        host_lock.free()
    before = state_files(cfg), links(lay), slots(lay)
    with pytest.raises(OpsError) as e:
        preflight.run(cfg, ID)
    assert e.value.reason == Reason.HOST_LOCKED
    assert (state_files(cfg), links(lay), slots(lay)) == before
