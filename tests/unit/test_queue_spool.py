"""The spool: requests queued whole and in order, claimed by rename, answered by results, gates for resets."""

import json
import os

import pytest

from unbounded_agent.queue.spool import KEEP_RESULTS, Gate, Request, Result, Spool, new_id
from unbounded_agent.reasons import OpsError, Reason


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "ops").ensure()


def result(req: Request, ok: bool = True, reason: str = "Succeeded") -> Result:
    return Result(id=req.id, kind=req.kind, operation=req.name, source=req.source, succeeded=ok, reason=reason,
                  message="m", finished_at="t")


def test_a_request_is_queued_whole_private_and_in_order(spool):
    a = spool.submit(Request(id=new_id("upgrade"), kind="upgrade", url="https://h/a.tgz?sig=secret"))
    b = spool.submit(Request(id=new_id("reset"), kind="reset"))
    assert list(spool.incoming.iterdir()) == []  # written there first, then renamed in
    files = sorted(spool.requests.iterdir())
    assert [p.name.endswith(f"-{r.id}.request") for p, r in zip(files, (a, b), strict=True)] == [True, True]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)  # a request may carry a signed URL
    assert json.loads(files[0].read_text())["url"] == "https://h/a.tgz?sig=secret"
    assert [r.id for _, r in spool.pending()] == [a.id, b.id]
    assert a.submitted_at and spool.state(a.id) == "queued"


def test_the_oldest_request_is_claimed_by_rename_and_answered_by_its_result(spool):
    a = spool.submit(Request(id="upgrade-1", kind="upgrade"))
    b = spool.submit(Request(id="upgrade-2", kind="upgrade"))
    path, claimed = spool.claim_next()
    assert claimed.id == a.id and path.name.endswith(".claimed")
    assert spool.state(a.id) == "running" and spool.claimed()[1].id == a.id
    assert [r.id for _, r in spool.pending()] == [b.id]
    assert [r.id for _, r in spool.queue()] == [a.id, b.id]  # the running one first
    spool.finish(path, result(a))
    assert spool.state(a.id) == "finished" and not path.exists()
    assert spool.result(a.id).succeeded and spool.result(a.id).exit_code() == 0
    assert spool.claimed() is None


def test_a_failed_result_exits_with_its_reasons_code(spool):
    req = spool.submit(Request(id="upgrade-1", kind="upgrade"))
    spool.finish(None, result(req, ok=False, reason="ChecksumMismatch"))
    assert spool.result(req.id).exit_code() == Reason.CHECKSUM_MISMATCH.exit_code


@pytest.mark.parametrize("req, match", [
    (Request(id="upgrade-1", kind="bootstrap"), "unknown operation kind"),
    (Request(id="Upgrade 1", kind="upgrade"), "invalid request id"),
    (Request(id="../x", kind="upgrade"), "invalid request id"),
    (Request(id="-x", kind="upgrade"), "invalid request id"),
])
def test_a_malformed_request_is_refused_and_nothing_is_queued(spool, req, match):
    with pytest.raises(OpsError, match=match) as e:
        spool.submit(req)
    assert e.value.reason is Reason.INVALID_PARAMETERS
    assert list(spool.requests.iterdir()) == []


def test_an_id_is_used_once(spool):
    spool.submit(Request(id="upgrade-1", kind="upgrade"))
    with pytest.raises(OpsError, match="exists already"):
        spool.submit(Request(id="upgrade-1", kind="upgrade"))
    spool.finish(spool.claim_next()[0], result(Request(id="upgrade-1", kind="upgrade")))
    with pytest.raises(OpsError, match="exists already"):  # its result is still there
        spool.submit(Request(id="upgrade-1", kind="upgrade"))


@pytest.mark.parametrize("claim", [False, True])
def test_while_a_reset_is_queued_or_running_only_another_reset_is_accepted(spool, claim):
    spool.submit(Request(id="reset-1", kind="reset"))
    if claim:
        spool.claim_next()
    for kind in ("upgrade", "rollback"):
        with pytest.raises(OpsError, match="reset reset-1 is queued or running") as e:
            spool.submit(Request(id=f"{kind}-2", kind=kind))
        assert e.value.reason is Reason.SUPERSEDED
    spool.submit(Request(id="reset-2", kind="reset"))
    assert [r.id for _, r in spool.queue()] == ["reset-1", "reset-2"]


def test_an_unreadable_request_is_claimed_as_such(spool):
    (spool.requests / "00000000000000000001-upgrade-1.request").write_text("{garbage")
    path, req = spool.claim_next()
    assert req is None and path.name.endswith("-upgrade-1.claimed")


def test_results_are_pruned_to_the_newest(spool):
    for i in range(KEEP_RESULTS + 5):
        req = Request(id=f"upgrade-{i}", kind="upgrade")
        spool.finish(None, result(req))
        os.utime(spool.results / f"{req.id}.json", (i, i))  # an order the pruning can see
    kept = {p.stem for p in spool.results.glob("*.json")}
    assert len(kept) == KEEP_RESULTS and "upgrade-0" not in kept and f"upgrade-{KEEP_RESULTS + 4}" in kept


def test_a_gate_is_open_until_acknowledged_and_goes_with_the_result(spool):
    spool.open_gate(Gate(id="reset-1", message="about to remove the agent", steps=[{"step": "remove-links"}]))
    assert spool.gate("reset-1").message == "about to remove the agent"
    assert [g.id for g in spool.open_gates()] == ["reset-1"] and not spool.acked("reset-1")
    spool.ack("reset-1")
    assert spool.acked("reset-1") and spool.open_gates() == []
    spool.finish(None, result(Request(id="reset-1", kind="reset")))
    assert spool.gate("reset-1") is None and not spool.acked("reset-1")


def test_anything_but_a_request_is_swept_out_of_the_spool(spool):
    """The path unit starts the dispatcher while requests/ is not empty: a stray file must not stay there."""
    req = spool.submit(Request(id="upgrade-1", kind="upgrade"))
    (spool.requests / "notes.txt").write_text("x")
    (spool.requests / ".hidden").write_text("x")
    (spool.requests / "00000000000000000001-Bad Id.request").write_text("{}")
    assert sorted(spool.sweep()) == [".hidden", "00000000000000000001-Bad Id.request", "notes.txt"]
    assert [r.id for _, r in spool.pending()] == [req.id]
    assert len(list(spool.rejected.iterdir())) == 3
