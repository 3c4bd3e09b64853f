"""MachineOperation status, conditions, parameters, TTL and Events as pure functions (kube/mop.py)."""

import pytest

from unbounded_agent.kube import mop
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


def test_the_reason_mirror_and_the_condition_follow_each_write():
    first = mop.apply_status(op(), mop.desired(mop.PENDING, "Pending", "waiting"), at="2026-01-01T00:00:00Z")
    assert first["phase"] == "Pending" and "startedAt" not in first and "completedAt" not in first
    running = mop.apply_status(op(status=first), mop.desired(mop.IN_PROGRESS, "InProgress", "x"),
                               at="2026-01-01T00:00:05Z")
    # Pending and InProgress are both "not completed": the condition's transition time stays
    assert running["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert running["startedAt"] == "2026-01-01T00:00:05Z"


def test_desired_carries_times_and_the_machine_generation_and_caps_the_message():
    d = mop.desired(mop.FAILED, "ExecutionFailed", "x" * 5000, started_at="s", completed_at="c", machine_generation=4)
    assert len(d["message"]) == 4096
    assert (d["startedAt"], d["completedAt"], d["observedMachineGeneration"]) == ("s", "c", 4)
    st = mop.apply_status(op(), d, at="2026-01-01T00:00:00Z")
    assert (st["startedAt"], st["completedAt"], st["observedMachineGeneration"]) == ("s", "c", 4)


def test_status_matches_also_compares_the_times_it_wants():
    want = mop.desired(mop.COMPLETE, "Succeeded", "done", completed_at="2026-01-01T00:01:00Z")
    o = op()
    o["status"] = mop.apply_status(o, mop.desired(mop.COMPLETE, "Succeeded", "done"), at="2026-01-01T00:02:00Z")
    assert not mop.status_matches(o, want)
    o["status"] = mop.apply_status(op(), want)
    assert mop.status_matches(o, want)


def test_parameters_must_be_strings():
    with pytest.raises(OpsError) as e:
        mop.check_parameters(op(downloadURL="https://h/x.tar.gz", force=True), allow_http=False)
    assert e.value.reason == Reason.INVALID_PARAMETERS and "parameters must be strings: force" in e.value.message


def test_plain_http_only_when_the_config_allows_it():
    assert mop.check_parameters(op(downloadURL="http://h/x.tar.gz"), allow_http=True)["downloadURL"] == "http://h/x.tar.gz"


@pytest.mark.parametrize("ttl", [-1, True, "60", None])
def test_a_ttl_that_is_not_a_count_of_seconds_never_deletes(ttl):
    o = op(status={"phase": "Complete", "completedAt": "2026-01-01T00:00:00Z"})
    o["spec"]["ttlSecondsAfterFinished"] = ttl
    assert mop.ttl_deadline(o) is None


def test_ttl_needs_a_readable_completion_time():
    o = op(status={"phase": "Failed", "completedAt": "yesterday"})
    o["spec"]["ttlSecondsAfterFinished"] = 0
    assert mop.ttl_deadline(o) is None
    assert mop.parse_time(None) is None and mop.parse_time("") is None


def test_first_come_first_served():
    def at(name, t):
        return {"metadata": {"name": name, "creationTimestamp": t}}

    ops = [at("b", "2026-01-01T00:00:01Z"), at("c", "2026-01-01T00:00:00Z"), at("a", "2026-01-01T00:00:01Z")]
    assert [mop.name(o) for o in sorted(ops, key=mop.sort_key)] == ["c", "a", "b"]


def test_reading_an_operation_tolerates_missing_parts():
    empty = {"metadata": {}, "spec": None, "status": None}
    assert (mop.name(empty), mop.uid(empty), mop.kind(empty), mop.machine(empty), mop.phase(empty)) == ("",) * 5
    assert mop.parameters({"spec": {"parameters": ["not", "a", "map"]}}) == {}
    assert not mop.is_terminal(empty)


def test_the_kinds_the_agent_never_touches_are_not_its_own():
    assert not mop.HOST_KINDS & (mop.HANDLED | mop.UNSUPPORTED)
    assert mop.HANDLED == {"AgentUpgrade", "AgentReset"} and mop.UNSUPPORTED == {"NodeReboot"}


def test_event_messages_are_capped_and_warnings_typed():
    ev = mop.event(op(), "DaemonFailed", "y" * 2000, warning=True, host="m", suffix="2")
    assert len(ev["message"]) == 1024 and ev["type"] == "Warning" and ev["count"] == 1
    assert ev["firstTimestamp"] == ev["lastTimestamp"] and ev["reportingInstance"] == "m"


def test_a_condition_beside_completed_is_written_and_kept_in_place():
    want = mop.desired(mop.COMPLETE, "Succeeded", "upgraded", completed_at="2026-01-01T00:00:00Z")
    op = {"metadata": {"name": "up", "generation": 2},
          "status": mop.apply_status({"metadata": {"generation": 2}}, want, at="2026-01-01T00:00:00Z")}
    assert mop.status_matches(op, want)
    late = dict(want, conditions=[{"type": "RolledBack", "status": "True", "reason": "DaemonFailedAfterCommit",
                                   "message": "rolled back to 1.0.0"}])
    assert not mop.status_matches(op, late)  # the condition is still to be written
    st = mop.apply_status(op, late, at="2026-01-01T00:10:00Z")
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Completed"]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and conds["Completed"]["status"] == "True"
    assert (conds["RolledBack"]["reason"], conds["RolledBack"]["lastTransitionTime"]) == ("DaemonFailedAfterCommit",
                                                                                        "2026-01-01T00:10:00Z")
    assert st["phase"] == "Complete" and mop.status_matches(dict(op, status=st), late)
    again = mop.apply_status(dict(op, status=st), late, at="2026-01-01T00:20:00Z")
    assert {c["type"]: c for c in again["conditions"]}["RolledBack"]["lastTransitionTime"] == "2026-01-01T00:10:00Z"
