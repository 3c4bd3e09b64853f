"""Label selectors (metav1.LabelSelector) as a parent operation's ``spec.machineSelector`` gives them, matched
against the labels of Machines: matchLabels and matchExpressions, ANDed, as the API server matches them. An
empty selector matches every Machine, as in Kubernetes."""

from __future__ import annotations

from ..reasons import OpsError, Reason

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def check(selector) -> None:
    """OpsError(InvalidParameters) unless selector is a label selector the API server would take."""
    def bad(why: str):
        return OpsError(Reason.INVALID_PARAMETERS, f"machineSelector: {why}")

    if not isinstance(selector, dict):
        raise bad("must be an object with matchLabels and/or matchExpressions")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise bad("matchLabels must map label keys to string values")
    for i, e in enumerate(selector.get("matchExpressions") or []):
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not e.get("key"):
            raise bad(f"matchExpressions[{i}] needs a key")
        op, values = e.get("operator"), e.get("values") or []
        if op not in OPERATORS:
            raise bad(f"matchExpressions[{i}].operator {op!r} is not one of {', '.join(OPERATORS)}")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad(f"matchExpressions[{i}].values must be a list of strings")
        if op in ("In", "NotIn") and not values:
            raise bad(f"matchExpressions[{i}]: {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise bad(f"matchExpressions[{i}]: {op} takes no values")


def matches(selector: dict, labels: dict | None) -> bool:
    """Whether labels satisfy selector (checked before with check())."""
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def describe(selector: dict) -> str:
    """The selector as kubectl's -l would write it, for messages."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), ",".join(e.get("values") or [])
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": f"{key}",
                      "DoesNotExist": f"!{key}"}.get(op, f"{key} {op}"))
    return ",".join(parts) or "(every Machine)"
