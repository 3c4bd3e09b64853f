"""The child operations of a parent: their names, labels and owner reference, as the controller writes them.

A child's name is a function of the parent's name and the machine's, so a second attempt to create it (after a
restart, or by the next leader) is refused by the API server with 409 AlreadyExists instead of running the
machine twice: ``<parent>-<machine>``, or, when that would be longer than a name may be, a shortened form with a
digest of both. Labels name the parent (``kubectl get mop -l unbounded-cloud.io/fleet-parent=<parent>``) and the
wave; the owner reference makes the parent own it (``kubectl delete`` of the parent removes its children once
the controller has let the running ones finish).
"""

from __future__ import annotations

import hashlib

from ..kube import client as kubeclient
from ..kube import mop

PARENT_LABEL = "unbounded-cloud.io/fleet-parent"
WAVE_LABEL = "unbounded-cloud.io/fleet-wave"
# Held on a parent from its first child on: deleting it waits until the controller has withdrawn the children
# not yet started and the running ones have finished.
FINALIZER = "unbounded-cloud.io/fleet-controller"
MAX_NAME = 253
MAX_LABEL = 63


def _digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:10]


def _trim(text: str) -> str:
    """A name cut short must still end with a letter or digit."""
    return text.rstrip("-.")


def child_name(parent: str, machine: str) -> str:
    name = f"{parent}-{machine}"
    if len(name) <= MAX_NAME:
        return name
    return f"{_trim(parent[:160])}-{_trim(machine[:80])}-{_digest(parent, machine)}"


def label_value(parent: str) -> str:
    """The parent's name as a label value (at most 63 characters)."""
    if len(parent) <= MAX_LABEL:
        return parent
    return f"{_trim(parent[:MAX_LABEL - 11])}-{_digest(parent)}"


def owner_reference(parent: dict) -> dict:
    return {"apiVersion": f"{kubeclient.GROUP}/{kubeclient.API_VERSION}", "kind": "MachineOperation",
            "name": mop.name(parent), "uid": mop.uid(parent), "controller": True, "blockOwnerDeletion": True}


def owner_uid(op: dict) -> str:
    """The uid of the MachineOperation that controls op (its parent), "" for an operation of its own."""
    for ref in op.get("metadata", {}).get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("kind") == "MachineOperation" and ref.get("controller"):
            return str(ref.get("uid") or "")
    return ""


def wave_of(op: dict) -> int | None:
    value = (op.get("metadata", {}).get("labels") or {}).get(WAVE_LABEL, "")
    return int(value) if value.isdigit() else None


def manifest(parent: dict, machine: str, wave: int, parameters: dict) -> dict:
    """The child for machine: the parent's kind and parameters (without the rollout's own), machineRef set."""
    spec: dict = {"machineRef": machine, "operationKind": mop.kind(parent)}
    if parameters:
        spec["parameters"] = dict(parameters)
    return {"apiVersion": f"{kubeclient.GROUP}/{kubeclient.API_VERSION}", "kind": "MachineOperation",
            "metadata": {"name": child_name(mop.name(parent), machine),
                         "labels": {PARENT_LABEL: label_value(mop.name(parent)), WAVE_LABEL: str(wave)},
                         "ownerReferences": [owner_reference(parent)]},
            "spec": spec}


def started(op: dict) -> bool:
    """Whether the agent has begun the child: anything past Pending (Pending covers "accepted" too)."""
    return mop.phase(op) not in ("", mop.PENDING) or bool((op.get("status") or {}).get("startedAt"))


def deleting(op: dict) -> bool:
    return bool(op.get("metadata", {}).get("deletionTimestamp"))
