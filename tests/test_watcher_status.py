"""MachineOperation status, conditions, parameters and TTL as pure functions (lib/unbounded_agent/mop.py)."""

import pytest

from watcher_fakes import LIB  # noqa: F401  (puts lib/ on the path)
from unbounded_agent import mop
from unbounded_agent.reasons import OpsError, Reason


def op(kind="AgentUpgrade", status=None, generation=3, **params):
    return {"metadata": {"name": "x", "uid": "u-1", "generation": generation, "resourceVersion": "7"},
            "spec": {"machineRef": "m", "operationKind": kind, "parameters": params}, "status": status or {}}


def test_in_progress_sets_started_and_a_false_completed_condition():
    st = mop.apply_status(op(), mop.desired(mop.IN_PROGRESS, "InProgress", "staging"), at="2026-01-01T00:00:00Z")
    assert st["phase"] == "InProgress" and st["startedAt"] == "2026-01-01T00:00:00Z" and "completedAt" not in st
    (cond,) = st["conditions"]
    assert cond == {"type": "Completed", "status": "False", "reason": "InProgress", "message": "staging",
                    "observedGeneration": 3, "lastTransitionTime": "2026-01-01T00:00:00Z"}
    assert st["reason"] == "InProgress"  # the mirror for kubectl get -o wide


def test_success_flips_the_condition_and_keeps_started_at():
    first = mop.apply_status(op(), mop.desired(mop.IN_PROGRESS, "InProgress", "staging"), at="2026-01-01T00:00:00Z")
    done = mop.apply_status(op(status=first), mop.desired(mop.COMPLETE, "Succeeded", "done"), at="2026-01-01T00:01:00Z")
    cond = done["conditions"][0]
    assert (done["phase"], done["startedAt"], done["completedAt"]) == ("Complete", "2026-01-01T00:00:00Z",
                                                                       "2026-01-01T00:01:00Z")
    assert (cond["status"], cond["reason"], cond["lastTransitionTime"]) == ("True", "Succeeded", "2026-01-01T00:01:00Z")


def test_failure_keeps_the_transition_time_of_a_condition_that_stays_false():
    first = mop.apply_status(op(), mop.desired(mop.IN_PROGRESS, "InProgress", "x"), at="2026-01-01T00:00:00Z")
    failed = mop.apply_status(op(status=first), mop.desired(mop.FAILED, "DaemonFailed", "rolled back"),
                              at="2026-01-01T00:05:00Z")
    cond = failed["conditions"][0]
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "DaemonFailed", "rolled back")
    assert cond["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # status did not change: API conventions
    assert failed["completedAt"] == "2026-01-01T00:05:00Z" and failed["reason"] == "DaemonFailed"


def test_other_conditions_are_kept():
    other = {"type": "BootImageWritten", "status": "True", "reason": "Done", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}
    st = mop.apply_status(op(status={"conditions": [other]}), mop.desired(mop.PENDING, "Pending", "waiting"))
    assert other in st["conditions"] and len(st["conditions"]) == 2


def test_status_matches_sees_what_is_already_written():
    want = mop.desired(mop.FAILED, "InvalidParameters", "bad")
    o = op()
    assert not mop.status_matches(o, want)
    o["status"] = mop.apply_status(o, want)
    assert mop.status_matches(o, want)


@pytest.mark.parametrize("params, words", [
    ({}, 'missing required parameter "downloadURL"'),
    ({"downloadURL": "ftp://h/x.tar.gz"}, "scheme"),
    ({"downloadURL": "http://h/x.tar.gz"}, "plain http is refused"),
    ({"downloadURL": "https://u:secret@h/x.tar.gz"}, "user info"),
    ({"downloadURL": "https://h/x.tar.gz", "sha256": "abc"}, "64 hexadecimal"),
    ({"downloadURL": "https://h/x.tar.gz", "sha-256": "a" * 64}, "unknown parameter(s) for AgentUpgrade: sha-256"),
    ({"downloadURL": "https://h/x.tar.gz", "force": "maybe"}, "force must be"),
])
def test_invalid_upgrade_parameters(params, words):
    with pytest.raises(OpsError) as e:
        mop.check_parameters(op(**params), allow_http=False)
    assert e.value.reason == Reason.INVALID_PARAMETERS and words in e.value.message
    assert "secret" not in e.value.message


def test_valid_upgrade_parameters_are_normalised():
    got = mop.check_parameters(op(downloadURL=" HTTPS://h/x.tar.gz?sig=1 ", sha256="sha256:" + "AB" * 32,
                                  force="True"), allow_http=False)
    assert got == {"downloadURL": "https://h/x.tar.gz?sig=1", "sha256": "ab" * 32, "force": True}


def test_reset_takes_no_parameters():
    assert mop.check_parameters(op("AgentReset"), allow_http=False) == {}
    with pytest.raises(OpsError, match="unknown parameter"):
        mop.check_parameters(op("AgentReset", allWG="true"), allow_http=False)


def test_ttl_deadline_only_for_finished_operations():
    o = op(status={"phase": "Complete", "completedAt": "2026-01-01T00:00:00Z"})
    o["spec"]["ttlSecondsAfterFinished"] = 60
    assert mop.ttl_deadline(o) == mop.parse_time("2026-01-01T00:01:00Z")
    o["status"]["phase"] = "InProgress"
    assert mop.ttl_deadline(o) is None
    del o["spec"]["ttlSecondsAfterFinished"]
    o["status"]["phase"] = "Failed"
    assert mop.ttl_deadline(o) is None


def test_events_name_the_operation_by_uid_in_the_default_namespace():
    ev = mop.event(op(), "Accepted", "accepted", warning=False, host="m", suffix="1")
    assert ev["metadata"] == {"name": "x.1", "namespace": "default"}
    assert ev["involvedObject"]["uid"] == "u-1" and ev["involvedObject"]["kind"] == "MachineOperation"
    assert ev["type"] == "Normal" and ev["source"] == {"component": "unbounded-agent", "host": "m"}
