"""Running a candidate's `version`: only the exit status counts, within a timeout, with bounded output,
retrying while the file is busy (ETXTBSY), and with a clear word for a file that cannot run here."""

import os
import threading
import time

from unbounded_agent.upgrade_preflight import run_candidate


def script(tmp_path, body: str, name="cand"):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_exit_zero_passes_and_reads_the_version(tmp_path):
    r = run_candidate(script(tmp_path, 'echo "unbounded-agent 2.0.0"\n'), timeout=10)
    assert r.ok and r.version == "2.0.0"


def test_exit_42_fails_with_status_and_output(tmp_path):
    r = run_candidate(script(tmp_path, "echo nope >&2; exit 42\n"), timeout=10)
    assert not r.ok and r.detail == "exit status 42" and r.excerpt() == "nope"


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


def test_wrong_architecture_is_named(tmp_path):
    p = tmp_path / "arm64"
    # an ELF header for aarch64 (e_machine 0xb7): the kernel refuses it with ENOEXEC
    p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\xb7\x00\x01\x00\x00\x00" + bytes(44))
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
