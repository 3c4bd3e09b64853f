"""The upgrade record and the files beside it, as typed dataclasses: what is on disk (keys, modes), what
an older or a corrupt file reads as, the quarantine, the rollback signal, the request's secret, and the
record's own mutex."""

import json
import os
import threading

import pytest
import upgrade_fakes

from unbounded_agent.reasons import Reason
from unbounded_agent.upgrade import api, record
from unbounded_agent.upgrade.record import (
    Binary,
    Failure,
    Probation,
    QuarantineEntry,
    RollbackSignal,
    Store,
    UpgradeRecord,
    UpgradeRequest,
)

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg


def new(id="upgrade-1", **kw) -> UpgradeRecord:
    return UpgradeRecord(id=id, operation="op-1", **kw)


def test_a_record_round_trips_with_its_nested_parts(cfg):
    store = Store(cfg)
    rec = new(from_=Binary(slot="unbounded-agent-blue", digest="a" * 64, version="1.0.0"),
              to=Binary(slot="unbounded-agent-green", digest="b" * 64, version="2.0.0", archive_sha256="c" * 64),
              probation=Probation(old_invocation="inv1", attempts=2),
              failure=Failure(detail="crashed", exit_code=3, journal=["line 1", "line 2"]))
    store.advance(rec, record.STAGING)
    back = store.read()
    assert back == rec
    assert back.from_.slot == "unbounded-agent-blue" and back.to.digest == "b" * 64
    assert back.probation.attempts == 2 and back.failure.journal == ["line 1", "line 2"]
    assert [h.phase for h in back.history] == [record.STAGING]


def test_the_file_says_from_not_from_(cfg):
    store = Store(cfg)
    store.write(new(from_=Binary(slot="unbounded-agent-blue")))
    doc = json.loads(store.record_path.read_text())
    assert doc["from"] == {"slot": "unbounded-agent-blue", "digest": None, "version": None, "archive_sha256": None}
    assert "from_" not in doc and doc["format"] == record.FORMAT
    assert oct(os.stat(store.record_path).st_mode & 0o777) == "0o644"


def test_advance_appends_each_phase_once_and_finish_removes_the_secret(cfg):
    store = Store(cfg)
    store.write_request(UpgradeRequest(id="upgrade-1", url="https://x.example/a?sig=s"))
    rec = store.advance(new(), record.REQUESTED)
    rec = store.advance(rec, record.REQUESTED, message="again")  # same phase: no new history entry
    rec = store.advance(rec, record.STAGING)
    rec = store.finish(rec, record.FAILED, Reason.DOWNLOAD_FAILED, "HTTP 404")
    assert [h.phase for h in rec.history] == ["requested", "staging", "failed"]
    assert rec.reason == "DownloadFailed" and rec.message == "HTTP 404" and rec.finished_at
    assert rec.phase_time(record.STAGING) <= rec.phase_time(record.FAILED)
    assert rec.phase_time(record.PROBATION) is None
    assert not store.request_path.exists()


def test_finish_only_takes_a_terminal_phase(cfg):
    with pytest.raises(AssertionError):
        Store(cfg).finish(new(), record.PROBATION, Reason.SUCCEEDED, "no")


@pytest.mark.parametrize("phase,terminal", [(p, p in (record.COMMITTED, record.FAILED, record.ROLLED_BACK))
                                            for p in record.PHASES])
def test_terminal_and_in_flight(phase, terminal):
    rec = new(phase=phase)
    assert rec.terminal is terminal and rec.in_flight is not terminal
    assert rec.committed is (phase == record.COMMITTED)


@pytest.mark.parametrize("phase,reason,expected", [
    (record.COMMITTED, "Succeeded", Reason.SUCCEEDED),
    (record.ROLLED_BACK, "DaemonFailed", Reason.DAEMON_FAILED),
    (record.FAILED, "PreflightFailed", Reason.PREFLIGHT_FAILED),
    (record.FAILED, "SomethingNew", Reason.EXECUTION_FAILED),
    (record.FAILED, None, Reason.EXECUTION_FAILED),
])
def test_reason_enum(phase, reason, expected):
    assert new(phase=phase, reason=reason).reason_enum() is expected


def test_describe_names_the_operation_versions_and_outcome():
    rec = new(from_=Binary(version="1.0.0"), to=Binary(version="2.0.0"), phase=record.PROBATION, updated_at="t1")
    assert rec.describe() == "upgrade op-1 in phase probation (1.0.0 → 2.0.0) since t1"
    rec = new(phase=record.FAILED, reason="PreflightFailed", message="exit status 42")
    assert rec.describe() == "upgrade op-1 failed (? → ?): PreflightFailed: exit status 42"


@pytest.mark.parametrize("failure,text", [
    (Failure(detail="crashed", exit_code=3), "crashed (exit code 3)"),
    (Failure(detail="crashed", exit_code=0), "crashed (exit code 0)"),
    (Failure(detail="crashed", signal="SIGKILL"), "crashed (signal SIGKILL)"),
    (Failure(signal="SIGSEGV"), "signal SIGSEGV"),
    (Failure(detail="no ready in time"), "no ready in time"),
    (Failure(), "failed"),
])
def test_failure_text(failure, text):
    assert failure.text() == text


def test_a_record_from_before_request_ids_takes_its_operation_as_id(cfg):
    store = Store(cfg)
    store.dir.mkdir(parents=True)
    store.record_path.write_text(json.dumps({"operation": "local-1", "kind": "upgrade", "phase": "probation",
                                             "from": {"slot": "unbounded-agent-blue"}, "instance": "old-unit-name",
                                             "probation": {"attempts": 1}}))
    rec = store.read()
    assert rec.id == "local-1" and rec.phase == record.PROBATION and rec.in_flight
    assert rec.from_.slot == "unbounded-agent-blue" and rec.probation.attempts == 1
    assert api.orphan(cfg).id == "local-1"  # the dispatcher converges it before anything else


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"id": "x"}', b'{"id": "x", "operation": "o", "from": 3}'])
def test_a_corrupt_record_reads_as_none(cfg, content, capsys):
    store = Store(cfg)
    store.dir.mkdir(parents=True)
    store.record_path.write_bytes(content)
    assert store.read() is None
    assert "ignoring" in capsys.readouterr().err


def test_the_request_is_0600_and_only_for_its_own_operation(cfg):
    store = Store(cfg)
    store.write_request(UpgradeRequest(id="upgrade-1", url="https://x.example/a?sig=s", sha256="a" * 64, force=True))
    assert oct(os.stat(store.request_path).st_mode & 0o777) == "0o600"
    assert store.read_request("upgrade-1") == UpgradeRequest("upgrade-1", "https://x.example/a?sig=s", "a" * 64, True)
    assert store.read_request("upgrade-2") is None
    store.remove_request()
    store.remove_request()  # twice is fine
    assert store.read_request("upgrade-1") is None


def test_quarantine_by_binary_or_archive_digest(cfg):
    store = Store(cfg)
    assert store.quarantine() == [] and store.quarantined("a" * 64) is None
    store.quarantine_add(QuarantineEntry(digest="a" * 64, archive_sha256="b" * 64, version="2.0.0", operation="op-1",
                                         at="t", failure="exit code 3"))
    assert store.quarantined("a" * 64).version == "2.0.0"
    assert store.quarantined(None, "b" * 64).version == "2.0.0"
    assert store.quarantined(None, None) is None and store.quarantined("c" * 64) is None
    store.quarantine_add(QuarantineEntry(digest="a" * 64, version="2.0.0", operation="op-2"))  # replaces
    assert [e.operation for e in store.quarantine()] == ["op-2"]
    assert store.quarantine_remove("c" * 64) is False
    assert store.quarantine_remove("a" * 64) is True and store.quarantine() == []


def test_quarantine_message_tells_how_to_override():
    msg = QuarantineEntry(digest="a" * 64, version="2.0.0", operation="op-1", at="t", failure="exit code 3").message()
    assert msg == ("version 2.0.0 (sha256 aaaaaaaaaaaa) was rolled back by operation op-1 at t: exit code 3; "
                   "it is quarantined — request it with --force to try it again")


def test_the_rollback_signal_keeps_upstreams_key(cfg):
    store = Store(cfg)
    store.write_signal(RollbackSignal(operation="op-1", failed=Binary(version="2.0.0"), failure=Failure(exit_code=3),
                                      failure_message="rolled back"))
    doc = json.loads(store.signal_path.read_text())
    assert doc["failureMessage"] == "rolled back" and "failure_message" not in doc
    assert store.read_signal().failed.version == "2.0.0" and store.read_signal().failure.exit_code == 3


def test_transaction_serialises_two_deciders(cfg):
    """probation's verdict and recovery each read-decide-write inside the transaction: the second waits
    for the first and sees its decision."""
    store = Store(cfg)
    store.advance(new(), record.PROBATION)
    entered = threading.Event()
    pause = threading.Event()  # never set: a bounded pause
    seen = []

    def second():
        entered.wait()
        with store.transaction() as rec:
            seen.append(rec.phase)

    t = threading.Thread(target=second)
    t.start()
    with store.transaction() as rec:
        entered.set()
        pause.wait(0.3)  # give the second a chance to (wrongly) get in
        store.advance(rec, record.RECOVERING)
    t.join(10)
    assert seen == [record.RECOVERING]


def test_short():
    assert record.short("0123456789abcdef") == "0123456789ab" and record.short(None) == "?"
