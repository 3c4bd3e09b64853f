"""The rollout's decisions (lib/unbounded_agent/fleet/rollout.py), from parents and children as the server shows
them: parameters and their defaults, waves (canaries first, then maxInFlight at a time, each after the one
before has finished), the halt, the end, cancellation, and the status that says it."""

import pytest

from unbounded_agent.fleet import children, rollout
from unbounded_agent.kube import mop
from unbounded_agent.reasons import OpsError, Reason

MACHINES = [f"worker-{i:02}" for i in range(1, 8)]


def parent(params=None, status=None, kind="AgentUpgrade", selector=None, **meta):
    p = {"downloadURL": "https://releases.example/a.tar.gz", **(params or {})}
    op = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation",
          "metadata": {"name": "up", "uid": "parent-uid", "generation": 1, "resourceVersion": "5", **meta},
          "spec": {"machineSelector": selector if selector is not None else {"matchLabels": {"pool": "blue"}},
                   "operationKind": kind, "parameters": p}}
    if status:
        op["status"] = status
    return op


def child(machine, wave, phase="Pending", reason="", started=False):
    op = children.manifest(parent(), machine, wave, {"downloadURL": "https://releases.example/a.tar.gz"})
    op["metadata"].update(uid=f"uid-{machine}", resourceVersion="7")
    st = {"phase": phase}
    if phase in mop.TERMINAL:
        st = mop.apply_status(op, mop.desired(phase, reason or ("Succeeded" if phase == mop.COMPLETE else "Boom"),
                                              "done"))
    elif started or phase == mop.IN_PROGRESS:
        st["startedAt"] = "2024-01-01T00:00:00Z"
    op["status"] = st
    return op


def decide(p, kids, matched=MACHINES, gone=None):
    w, _ = rollout.check(p)
    v = rollout.view(p, matched, kids, gone or set())
    return rollout.decide(p, v, w), v


# -- parameters ------------------------------------------------------------------------------------------


def test_the_rollouts_parameters_have_defaults():
    assert rollout.waves({}) == rollout.Waves(canary=1, max_in_flight=1, budget=0)
    assert rollout.waves({"canaryCount": "0", "maxInFlight": "50", "failureBudget": "3"}) == rollout.Waves(0, 50, 3)


@pytest.mark.parametrize("params", [{"maxInFlight": "0"}, {"canaryCount": "-1"}, {"failureBudget": "two"},
                                    {"maxInFlight": " 5"}, {"canaryCount": "100000"}, {"maxInFlight": 3}])
def test_bad_rollout_parameters_are_invalid(params):
    with pytest.raises(OpsError) as e:
        rollout.waves(params)
    assert e.value.reason == Reason.INVALID_PARAMETERS


def test_the_children_get_the_parents_parameters_without_the_rollouts():
    p = parent({"sha256": "a" * 64, "canaryCount": "2", "maxInFlight": "3", "failureBudget": "1"})
    w, params = rollout.check(p)
    assert w == rollout.Waves(2, 3, 1)
    assert params == {"downloadURL": "https://releases.example/a.tar.gz", "sha256": "a" * 64}


@pytest.mark.parametrize("params,words", [({"sha265": "x"}, "unknown parameter(s) for AgentUpgrade: sha265"),
                                          ({"downloadURL": "ftp://x/a.tar.gz"}, "http")])
def test_what_the_agents_would_refuse_fails_the_parent_before_any_child(params, words):
    with pytest.raises(OpsError) as e:
        rollout.check(parent(params))
    assert e.value.reason == Reason.INVALID_PARAMETERS and words in e.value.message


def test_kinds_the_agents_do_not_handle_are_not_fanned_out():
    with pytest.raises(OpsError) as e:
        rollout.check(parent(kind="NodeReboot"))
    assert e.value.reason == Reason.UNSUPPORTED_OPERATION


def test_a_bad_selector_is_invalid():
    with pytest.raises(OpsError) as e:
        rollout.check(parent(selector={"matchExpressions": [{"key": "pool", "operator": "Has"}]}))
    assert e.value.reason == Reason.INVALID_PARAMETERS and "operator" in e.value.message


# -- waves -----------------------------------------------------------------------------------------------


def test_the_first_wave_is_the_canary_alone():
    d, _ = decide(parent({"maxInFlight": "3"}), {})
    assert (d.phase, d.create, d.wave) == ("InProgress", ["worker-01"], 1)
    assert d.event[0] == "WaveStarted" and "wave 1 of 3 (canary)" in d.event[1]


def test_nothing_starts_while_a_wave_is_in_flight():
    d, v = decide(parent({"maxInFlight": "3"}), {"worker-01": child("worker-01", 1, "InProgress")})
    assert d.create == [] and d.phase == "InProgress"
    assert d.message == ("wave 1 of 3 (canary): worker-01 in flight; 7 matched: 0 complete, 0 failed, 1 in flight, "
                         "6 not started")


def test_after_the_canary_the_next_wave_takes_max_in_flight_in_name_order():
    kids = {"worker-01": child("worker-01", 1, "Complete")}
    d, _ = decide(parent({"maxInFlight": "3"}), kids)
    assert (d.create, d.wave) == (["worker-02", "worker-03", "worker-04"], 2)
    kids.update({m: child(m, 2, "Complete") for m in d.create})
    kids["worker-03"] = child("worker-03", 2, "InProgress")
    assert decide(parent({"maxInFlight": "3"}), kids)[0].create == []  # one of the wave still runs
    kids["worker-03"] = child("worker-03", 2, "Complete")
    d, _ = decide(parent({"maxInFlight": "3"}), kids)
    assert (d.create, d.wave) == (["worker-05", "worker-06", "worker-07"], 3)


def test_canaries_never_exceed_max_in_flight():
    p = parent({"canaryCount": "3", "maxInFlight": "2"})
    d, _ = decide(p, {})
    assert d.create == ["worker-01", "worker-02"] and "(canary)" in d.event[1]
    d, _ = decide(p, {m: child(m, 1, "Complete") for m in d.create})
    assert d.create == ["worker-03"] and "(canary)" in d.event[1]
    d, _ = decide(p, {m: child(m, 1 if m < "worker-03" else 2, "Complete") for m in MACHINES[:3]})
    assert d.create == ["worker-04", "worker-05"] and "(canary)" not in d.event[1]


def test_no_canary_starts_with_a_full_wave():
    d, _ = decide(parent({"canaryCount": "0", "maxInFlight": "4"}), {})
    assert d.create == MACHINES[:4]


def test_everything_done_is_complete():
    kids = {m: child(m, 1, "Complete") for m in MACHINES}
    d, v = decide(parent(), kids)
    assert (d.phase, d.reason) == ("Complete", "Succeeded") and d.create == []
    assert v.counts() == "7 matched: 7 complete, 0 failed, 0 in flight, 0 not started"


def test_a_selector_that_matches_nothing_fails():
    d, _ = decide(parent(), {}, matched=[])
    assert (d.phase, d.reason) == ("Failed", "NoMachinesMatched") and "pool=blue" in d.message


# -- halting ---------------------------------------------------------------------------------------------


def test_a_failed_canary_halts_whatever_the_budget():
    kids = {"worker-01": child("worker-01", 1, "Failed", "DaemonFailed")}
    d, _ = decide(parent({"failureBudget": "5"}), kids)
    assert (d.phase, d.reason, d.create) == ("Failed", "Halted", [])
    assert d.message.startswith("halted: worker-01 (DaemonFailed) failed in the canary wave; no further")
    assert d.event[2] is True  # a Warning


def test_failures_within_the_budget_go_on_and_one_more_halts():
    p = parent({"maxInFlight": "3", "failureBudget": "1"})
    kids = {"worker-01": child("worker-01", 1, "Complete"), "worker-02": child("worker-02", 2, "Failed"),
            "worker-03": child("worker-03", 2, "Complete"), "worker-04": child("worker-04", 2, "Complete")}
    d, _ = decide(p, kids)
    assert d.create == ["worker-05", "worker-06", "worker-07"]
    kids.update({"worker-05": child("worker-05", 3, "Failed", "DownloadFailed"),
                 "worker-06": child("worker-06", 3, "InProgress"), "worker-07": child("worker-07", 3)})
    d, _ = decide(p, kids)
    assert (d.phase, d.reason) == ("Failed", "Halted")
    assert "worker-02 (Boom), worker-05 (DownloadFailed) failed;" in d.message and "(failure budget 1)" in d.message
    assert d.withdraw == ["worker-07"]  # not started: withdrawn; worker-06 runs on


def test_failures_within_the_budget_end_failed_naming_them():
    kids = {m: child(m, 1, "Complete") for m in MACHINES}
    kids["worker-04"] = child("worker-04", 1, "Failed", "PreflightFailed")
    d, _ = decide(parent({"failureBudget": "2"}), kids)
    assert (d.phase, d.reason) == ("Failed", "ChildrenFailed")
    assert d.message.startswith("1 of 7 machines failed (within the failure budget of 2): worker-04 (PreflightFailed)")


def test_a_halted_parent_stays_halted_and_keeps_its_counts_up_to_date():
    halted_status = {"phase": "Failed", "reason": "Halted",
                     "message": "halted: worker-01 (X) failed; no further MachineOperations are created (failure "
                                "budget 0); 7 matched: 0 complete, 1 failed, 1 in flight, 5 not started"}
    p = parent(status=halted_status)
    kids = {"worker-01": child("worker-01", 1, "Failed"), "worker-02": child("worker-02", 1, "Complete")}
    d, _ = decide(p, kids)
    assert (d.phase, d.reason, d.create) == ("Failed", "Halted", [])
    assert d.message.endswith("; 7 matched: 1 complete, 1 failed, 0 in flight, 5 not started")


# -- at most once per machine ------------------------------------------------------------------------------


def test_a_recorded_machine_never_gets_a_second_child_even_if_its_child_was_deleted():
    recorded = {"targets": [{"machineRef": "worker-01", "wave": 1, "phase": "Complete"},
                            {"machineRef": "worker-02", "wave": 2, "phase": "InProgress"}]}
    p = parent({"maxInFlight": "2"}, status={"phase": "InProgress", **recorded})
    d, v = decide(p, {}, gone={"worker-02"})
    assert "worker-01" not in v.not_started and "worker-02" not in v.not_started
    assert v.targets["worker-02"].phase == "Failed" and v.targets["worker-02"].message == rollout.DELETED
    assert (d.phase, d.reason) == ("Failed", "Halted")  # the deleted one counts as failed: budget 0


def test_a_machine_that_leaves_the_selector_after_its_child_was_created_stays_in_the_rollout():
    kids = {"worker-01": child("worker-01", 1, "InProgress")}
    _, v = decide(parent(), kids, matched=MACHINES[1:])
    assert "worker-01" in v.targets and v.matched == 7


def test_a_name_that_belongs_to_another_operation_counts_as_a_failure():
    v = rollout.view(parent(), MACHINES, {}, set(), {"worker-01": (1, "the name up-worker-01 belongs to another")})
    assert v.targets["worker-01"].phase == "Failed" and "worker-01" not in v.not_started


# -- cancellation ----------------------------------------------------------------------------------------


def test_a_deleted_parent_withdraws_what_has_not_started_and_waits_for_what_runs():
    p = parent(deletionTimestamp="2024-01-01T00:00:00Z", status={"phase": "InProgress"})
    kids = {"worker-01": child("worker-01", 1, "Complete"), "worker-02": child("worker-02", 2, "InProgress"),
            "worker-03": child("worker-03", 2, "Pending")}
    v = rollout.view(p, MACHINES, kids)
    d = rollout.decide_deleted(p, v)
    assert (d.phase, d.reason, d.withdraw, d.create) == ("Failed", "Cancelled", ["worker-03"], [])
    assert "waiting for worker-02 to finish" in d.message and d.event[0] == "Cancelled"


def test_withdrawn_children_count_as_not_started_once_the_rollout_is_over():
    recorded = {"phase": "Failed", "reason": "Halted",
                "targets": [{"machineRef": "worker-01", "wave": 1, "phase": "Failed"},
                            {"machineRef": "worker-02", "wave": 2, "phase": "Pending"}]}
    v = rollout.view(parent(status=recorded), MACHINES, {"worker-01": child("worker-01", 1, "Failed")}, {"worker-02"})
    assert "worker-02" in v.not_started and v.counts().endswith("1 failed, 0 in flight, 6 not started")


# -- status ----------------------------------------------------------------------------------------------


def test_the_status_carries_the_counts_in_message_condition_and_targets():
    p = parent({"maxInFlight": "2"}, status={"phase": "InProgress"})
    kids = {"worker-01": child("worker-01", 1, "Complete"), "worker-02": child("worker-02", 2, "InProgress"),
            "worker-03": child("worker-03", 2, "Failed", "DaemonFailed")}
    v = rollout.view(p, MACHINES[:4], kids)
    d = rollout.Decision("InProgress", "InProgress", f"wave 2 of 3: worker-02 in flight; {v.counts()}")
    st = rollout.status(p, d, v, at="2024-01-01T00:00:00Z")
    progressing = next(c for c in st["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "True" and progressing["reason"] == "RollingOut"
    assert progressing["message"] == "4 matched: 1 complete, 1 failed, 1 in flight, 1 not started"
    assert st["message"].endswith(progressing["message"])
    assert next(c for c in st["conditions"] if c["type"] == "Completed")["status"] == "False"
    assert st["targets"] == [{"machineRef": "worker-01", "wave": 1, "phase": "Complete"},
                             {"machineRef": "worker-02", "wave": 2, "phase": "InProgress"},
                             {"machineRef": "worker-03", "wave": 2, "phase": "Failed", "message": "DaemonFailed: done"}]
    assert rollout.same_status(st, rollout.status(dict(p, status=st), d, v))


def test_waves_and_totals():
    v = rollout.View({}, MACHINES)
    assert rollout.total_waves(v, rollout.Waves(1, 2, 0)) == 4  # 1 + 2 + 2 + 2
    assert rollout.total_waves(v, rollout.Waves(3, 2, 0)) == 4  # 2 + 1 (canaries), 2 + 2
    assert rollout.total_waves(v, rollout.Waves(0, 50, 0)) == 1
    assert rollout.names(MACHINES, 3) == "worker-01, worker-02, worker-03 and 4 more"
