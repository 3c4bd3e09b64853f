"""The children of a parent operation: deterministic names, labels, owner reference, and what they carry."""

from unbounded_agent.fleet import children
from unbounded_agent.kube import mop

PARENT = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation",
          "metadata": {"name": "upgrade-pool-blue", "uid": "u-1"},
          "spec": {"machineSelector": {"matchLabels": {"pool": "blue"}}, "operationKind": "AgentUpgrade",
                   "parameters": {"downloadURL": "https://x/a.tar.gz", "maxInFlight": "5"}}}


def test_a_child_names_its_machine_and_belongs_to_its_parent():
    c = children.manifest(PARENT, "worker-07", 3, {"downloadURL": "https://x/a.tar.gz"})
    assert c["metadata"]["name"] == "upgrade-pool-blue-worker-07"
    assert c["metadata"]["labels"] == {children.PARENT_LABEL: "upgrade-pool-blue", children.WAVE_LABEL: "3"}
    assert c["metadata"]["ownerReferences"] == [{"apiVersion": "unbounded-cloud.io/v1alpha3",
                                                 "kind": "MachineOperation", "name": "upgrade-pool-blue", "uid": "u-1",
                                                 "controller": True, "blockOwnerDeletion": True}]
    assert c["spec"] == {"machineRef": "worker-07", "operationKind": "AgentUpgrade",
                         "parameters": {"downloadURL": "https://x/a.tar.gz"}}
    assert children.owner_uid(c) == "u-1" and children.wave_of(c) == 3 and mop.machine(c) == "worker-07"
    assert children.owner_uid(PARENT) == ""


def test_the_name_is_the_same_every_time_and_fits_even_for_long_names():
    assert children.child_name("a", "b") == children.child_name("a", "b")
    long_parent, long_machine = "p" * 200, "m-" + "x" * 100
    name = children.child_name(long_parent, long_machine)
    assert len(name) <= 253 and name == children.child_name(long_parent, long_machine)
    assert name != children.child_name(long_parent, long_machine + "y")
    label = children.label_value("q" * 100 + "-")
    assert len(label) <= 63 and label[-1].isalnum()


def test_a_reset_child_has_no_parameters():
    reset = dict(PARENT, spec={"machineSelector": {}, "operationKind": "AgentReset"})
    assert children.manifest(reset, "w", 1, {})["spec"] == {"machineRef": "w", "operationKind": "AgentReset"}


def test_started_means_past_pending():
    assert not children.started({"status": {"phase": "Pending", "message": "accepted by the agent on w"}})
    assert not children.started({})
    assert children.started({"status": {"phase": "InProgress"}})
    assert children.started({"status": {"phase": "Pending", "startedAt": "2024-01-01T00:00:00Z"}})
