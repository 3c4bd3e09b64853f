"""Logging: under systemd a message goes through the journal's native protocol with a stable identifier and
the fields of its operation; anywhere else, or when the journal cannot take it, it is the one stderr line it
always was. The fields come from a context that is per thread and ends with its block."""

import os
import sys
import threading

import pytest

from unbounded_agent import log


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """A program of its own: its name, no fields bound, a journal that records what it is sent."""
    monkeypatch.setattr(log, "_fields", log.contextvars.ContextVar("test_log", default=None))
    monkeypatch.setattr(log, "_prefix", "unbounded-agent")
    monkeypatch.setattr(log, "_identifier", "unbounded-agent")
    sent = []
    monkeypatch.setattr(log, "_send", lambda msg, **fields: sent.append({"MESSAGE": msg, **fields}))
    return sent


@pytest.fixture
def journal_stream(tmp_path, monkeypatch, fresh):
    """stderr is the stream systemd connected the service to (JOURNAL_STREAM names its device and inode).
    Call it in the test's body: pytest sets its own stderr again between a fixture and the test."""
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")

        def attach():
            monkeypatch.setattr(sys, "stderr", stream)
            return fresh
        yield attach


def test_outside_systemd_it_is_one_line_on_stderr(fresh, capsys, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log.set_prefix("unbounded-agent upgrade")
    log.info("queued", operation="upgrade-1")
    log.warn("slow")
    log.error("failed", reason="DaemonFailed")
    assert capsys.readouterr().err.splitlines() == [
        "unbounded-agent upgrade: queued", "unbounded-agent upgrade: warning: slow", "unbounded-agent upgrade: error: failed"]
    assert fresh == []


def test_a_stream_that_is_not_stderr_is_not_the_journal(fresh, capsys, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # inherited from a service: not where this stderr goes
    log.info("hello")
    assert capsys.readouterr().err == "unbounded-agent: hello\n" and fresh == []


def test_under_systemd_the_journal_gets_the_message_and_its_operations_fields(journal_stream):
    sent = journal_stream()
    log.set_prefix("unbounded-upgrade-switch")
    log.bind(request="upgrade-1", step="switch")
    with log.context(operation="worker-upgrade@1234abcd", uid="1234abcd-5678", kind="upgrade"):
        log.bind(from_version="1.0.0", to_version="2.0.0")
        log.info("daemon restarted", result="succeeded")
    log.error("gone")
    first, second = sent
    assert first == {
        "MESSAGE": "daemon restarted", "PRIORITY": 6, "SYSLOG_IDENTIFIER": "unbounded-upgrade-switch",
        "CODE_FILE": __file__, "CODE_LINE": first["CODE_LINE"],
        "CODE_FUNC": "test_under_systemd_the_journal_gets_the_message_and_its_operations_fields",
        "UNBOUNDED_REQUEST": "upgrade-1", "UNBOUNDED_STEP": "switch", "UNBOUNDED_OPERATION": "worker-upgrade@1234abcd",
        "UNBOUNDED_OPERATION_UID": "1234abcd-5678", "UNBOUNDED_KIND": "upgrade", "UNBOUNDED_FROM_VERSION": "1.0.0",
        "UNBOUNDED_TO_VERSION": "2.0.0", "UNBOUNDED_RESULT": "succeeded"}
    # the block's fields, and what was bound inside it, ended with it; what was bound before stays
    assert {k: v for k, v in second.items() if k.startswith("UNBOUNDED_")} == {
        "UNBOUNDED_REQUEST": "upgrade-1", "UNBOUNDED_STEP": "switch"}
    assert (second["MESSAGE"], second["PRIORITY"]) == ("gone", 3)


def test_the_identifier_is_the_programs_name_without_its_subcommand(journal_stream):
    sent = journal_stream()
    log.set_prefix("unbounded-agent rollback")
    log.warn("careful")
    assert sent[0]["SYSLOG_IDENTIFIER"] == "unbounded-agent" and sent[0]["PRIORITY"] == 4


def test_without_the_journal_socket_the_line_still_reaches_the_stream(journal_stream, monkeypatch, tmp_path):
    def unavailable(msg, **fields):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(log, "_send", unavailable)
    journal_stream()
    log.info("still here", operation="upgrade-1")
    sys.stderr.flush()
    assert (tmp_path / "stream").read_text() == "unbounded-agent: still here\n"


def test_without_python3_systemd_the_line_still_reaches_the_stream(journal_stream, monkeypatch, tmp_path):
    monkeypatch.setattr(log, "_send", False)
    journal_stream()
    log.error("no module")
    sys.stderr.flush()
    assert (tmp_path / "stream").read_text() == "unbounded-agent: error: no module\n"


def test_a_context_belongs_to_its_thread():
    seen = {}
    with log.context(operation="upgrade-1"):
        t = threading.Thread(target=lambda: seen.update(log.current()))
        t.start()
        t.join()
        assert log.current() == {"operation": "upgrade-1"}
    assert seen == {} and log.current() == {}


def test_empty_values_are_left_out_and_unknown_fields_refused():
    log.bind(operation="reset-1", uid="", from_version=None)
    assert log.current(reason="Succeeded") == {"operation": "reset-1", "reason": "Succeeded"}
    log.bind(operation=None)
    assert log.current() == {}
    with pytest.raises(TypeError, match="url"):
        log.info("x", url="https://user:secret@example")
