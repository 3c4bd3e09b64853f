"""The reset's own files: the request, the checkpoint and the step reports round-trip; a corrupt checkpoint
is never taken for "no reset in progress"; a foreign report file reads as missing."""

import pytest

from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import reports
from unbounded_agent.reset.reports import (
    Checkpoint,
    FailedItem,
    Recorded,
    ResetRequest,
    StepReport,
)


def test_the_reset_dir_is_in_the_ops_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path))
    assert reports.reset_dir() == tmp_path / "reset"
    reports.write_request(ResetRequest(run_id="r1", all_wg=True, requested_by="cli"))
    req = reports.read_request()
    assert (req.run_id, req.all_wg, req.requested_by) == ("r1", True, "cli") and req.requested_at
    assert (tmp_path / "reset/request.json").exists()


def test_checkpoint_and_report_round_trip(tmp_path):
    cp = Checkpoint(created_at="t0", run_id="r1", recorded=Recorded(bin_dir="/opt/bin", config_error="bad"))
    reports.write_checkpoint(cp, tmp_path)
    assert reports.read_checkpoint(tmp_path) == cp
    rep = StepReport(step="remove-links", number=2, phase=1, run_id="r1", result="failed", reason="ExecutionFailed",
                     removed=["link cbr0"], failed=[FailedItem("link wg51820", "ExecutionFailed", "busy")])
    reports.write_report(rep, tmp_path)
    assert reports.report_path(2, "remove-links", tmp_path) == tmp_path / "reports/02-remove-links.json"
    assert reports.read_report(2, "remove-links", tmp_path) == rep
    assert reports.report_mtime(2, "remove-links", tmp_path) is not None
    assert not rep.succeeded and rep.first_failure() == FailedItem("link wg51820", "ExecutionFailed", "busy")


def test_nothing_written_reads_as_nothing(tmp_path):
    assert reports.read_checkpoint(tmp_path) is None and reports.read_request(tmp_path) is None
    assert reports.read_report(3, "remove-wireguard-keys", tmp_path) is None
    assert reports.report_mtime(3, "remove-wireguard-keys", tmp_path) is None


def test_a_corrupt_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoint.json").write_text("[1, 2]")
    with pytest.raises(OpsError) as e:
        reports.read_checkpoint(tmp_path)
    assert e.value.reason is Reason.EXECUTION_FAILED and "remove it only if no reset is in progress" in e.value.message


def test_a_foreign_report_or_request_reads_as_missing(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/02-remove-links.json").write_text("not json")
    (tmp_path / "request.json").write_text("{}")  # no run id
    assert reports.read_report(2, "remove-links", tmp_path) is None
    assert reports.read_request(tmp_path) is None


def test_a_failure_without_items_still_names_its_reason():
    rep = StepReport(step="verify", number=9, phase=2, run_id=None, result="failed", reason="HostLocked")
    assert rep.first_failure() == FailedItem(None, "HostLocked", "failed")
