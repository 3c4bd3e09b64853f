"""CEL in the test API server (kube_apiserver.py), evaluated with cel-python as kube-apiserver evaluates it with
cel-go: the x-kubernetes-validations rules of CRD schemas, and ValidatingAdmissionPolicies with their bindings.

What is modelled, as the real server does it:
- CRD rules: on every create and update of a custom resource (status writes too), each rule of each schema
  node present in the object, with ``self`` the node's value and ``oldSelf`` the stored one; a rule that uses
  ``oldSelf`` (a transition rule) only on update, where the old value exists. A false rule is a field error
  at the node (or at its ``fieldPath``) with the rule's ``message``/``messageExpression`` and ``reason``:
  ``spec: Invalid value: "object": <message>`` in the 422 Invalid answer.
- Policies: ``matchConstraints`` (resourceRules with group, version, operation and resource, ``x/status``
  for a subresource, ``*``; excludeResourceRules; objectSelector on the object or the old one),
  ``matchConditions``, ``variables`` (in order, as ``variables.<name>``), ``validations`` with ``message``,
  ``messageExpression`` and ``reason`` (403 for Forbidden; 422 Invalid by default), ``failurePolicy``; a
  binding's ``validationActions`` (Deny; Warn as a Warning header; Audit ignored) and ``matchResources``.
  The denial: ``<resource>.<group> "<name>" is forbidden: ValidatingAdmissionPolicy '<policy>' with binding
  '<binding>' denied request: <message>``.
- The CEL variables ``object``, ``oldObject`` (null on create and delete respectively), ``request`` (the
  AdmissionRequest: operation, userInfo, resource, subResource, name, namespace, kind, dryRun), ``params`` and
  ``namespaceObject`` (null: no paramKind, cluster-scoped resources).

Not modelled: paramKind/paramRef, ``authorizer``, auditAnnotations, the cost budget, type checking before
evaluation (a wrong field is an evaluation error here, a compile error there), the Kubernetes CEL libraries
beyond standard CEL (lists, strings, regex, url, quantity): the manifests of this project use standard CEL only.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import celpy
from celpy.evaluation import CELEvalError

_ENV = celpy.Environment()


class CelError(Exception):
    """An expression that did not compile or did not evaluate."""


@functools.lru_cache(maxsize=512)
def _program(expression: str):
    try:
        return _ENV.program(_ENV.compile(expression))
    except Exception as e:  # celpy raises its own parse errors
        raise CelError(f"compilation failed: {e}") from None


def _cel(value: Any):
    if isinstance(value, CELEvalError):
        return value
    if isinstance(value, dict) and any(isinstance(v, CELEvalError) for v in value.values()):
        # variables: one that failed is an error only where it is used
        return celpy.celtypes.MapType({celpy.celtypes.StringType(k): _cel(v) for k, v in value.items()})
    return celpy.json_to_cel(value)


def evaluate(expression: str, activation: dict) -> Any:
    """The value of expression with these variables (plain JSON values)."""
    program = _program(expression)
    try:
        return program.evaluate({k: _cel(v) for k, v in activation.items()})
    except CELEvalError as e:
        raise CelError(str(e.args[0] if e.args else e)) from None
    except Exception as e:  # a type error deep inside celpy
        raise CelError(f"{type(e).__name__}: {e}") from None


def _truthy(value) -> bool:
    if not _is_bool(value):
        raise CelError(f"expression did not evaluate to a bool but {type(value).__name__}")
    return bool(value)


def _uses_old_self(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


# -- CRD validation rules ------------------------------------------------------------------------------------


@dataclass
class RuleFailure:
    """A rule that did not hold: a field error for kube_apiserver.FieldError(type, path, detail, value)."""
    type: str  # Invalid, Forbidden, Required, Duplicate
    path: str
    detail: str
    value: Any


REASON_TYPES = {"FieldValueInvalid": "Invalid", "FieldValueForbidden": "Forbidden",
                "FieldValueRequired": "Required", "FieldValueDuplicate": "Duplicate"}


def crd_rule_failures(schema: dict | None, value: Any, old: Any, path: str = "") -> list[RuleFailure]:
    """Every x-kubernetes-validations rule under schema that does not hold for value (old: the stored value, or
    None on create)."""
    if schema is None or value is None:
        return []
    out: list[RuleFailure] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        text = rule.get("rule", "")
        if _uses_old_self(text) and old is None:
            continue  # a transition rule: only where there is an old value
        activation = {"self": value, **({"oldSelf": old} if old is not None else {})}
        where = path
        if rule.get("fieldPath"):
            where = f"{path}{rule['fieldPath']}" if path else rule["fieldPath"].lstrip(".")
        kind = REASON_TYPES.get(rule.get("reason") or "FieldValueInvalid", "Invalid")
        try:
            ok = _truthy(evaluate(text, activation))
        except CelError as e:
            out.append(RuleFailure("Invalid", where or "<nil>", f"rule evaluation error: {e}", schema.get("type")))
            continue
        if ok:
            continue
        message = rule.get("message") or f"failed rule: {text}"
        if rule.get("messageExpression"):
            try:
                message = str(evaluate(rule["messageExpression"], activation))
            except CelError:
                pass  # the real server falls back to message (and logs)
        out.append(RuleFailure(kind, where or "<nil>", message, schema.get("type", "object")))
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                sub_old = old.get(key) if isinstance(old, dict) else None
                out += crd_rule_failures(sub, value[key], sub_old, f"{path}.{key}" if path else key)
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict):
            for key, item in value.items():
                if key not in (schema.get("properties") or {}):
                    sub_old = old.get(key) if isinstance(old, dict) else None
                    out += crd_rule_failures(addl, item, sub_old, f"{path}[{key}]")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += crd_rule_failures(schema["items"], item, None, f"{path}[{i}]")
    return out


# -- ValidatingAdmissionPolicy ----------------------------------------------------------------------------------


@dataclass
class Attributes:
    """One request as admission sees it."""
    operation: str  # CREATE, UPDATE, DELETE
    group: str
    version: str
    resource: str
    subresource: str
    kind: str
    name: str
    namespace: str
    obj: dict | None
    old: dict | None
    user: str
    groups: list
    dry_run: bool = False

    def request(self) -> dict:
        gvk = {"group": self.group, "version": self.version, "kind": self.kind}
        gvr = {"group": self.group, "version": self.version, "resource": self.resource}
        return {"uid": "", "kind": gvk, "resource": gvr, "subResource": self.subresource, "requestKind": gvk,
                "requestResource": gvr, "requestSubResource": self.subresource, "name": self.name,
                "namespace": self.namespace, "operation": self.operation,
                "userInfo": {"username": self.user, "uid": "", "groups": list(self.groups), "extra": {}},
                "dryRun": self.dry_run, "options": {}}


@dataclass
class Denial(Exception):
    policy: str
    binding: str
    message: str
    reason: str  # Forbidden, Invalid, ...


def _rule_matches(rule: dict, a: Attributes) -> bool:
    def has(values, value):
        return "*" in (values or []) or value in (values or [])

    if not has(rule.get("apiGroups"), a.group) or not has(rule.get("apiVersions"), a.version):
        return False
    if not has(rule.get("operations"), a.operation):
        return False
    if rule.get("resourceNames") and a.name not in rule["resourceNames"]:
        return False
    wanted = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    for r in rule.get("resources") or []:
        if r == wanted or r == "*/*" or (r == "*" and not a.subresource):
            return True
        if "/" in r and a.subresource:
            res, sub = r.split("/", 1)
            if (res in ("*", a.resource)) and (sub in ("*", a.subresource)):
                return True
        if r.endswith("/*") and not a.subresource and r[:-2] == a.resource:
            return True
    return False


def _selected(constraints: dict | None, a: Attributes, labels_match) -> bool:
    if constraints is None:
        return True
    rules = constraints.get("resourceRules")
    if rules is not None and not any(_rule_matches(r, a) for r in rules):
        return False
    if any(_rule_matches(r, a) for r in constraints.get("excludeResourceRules") or []):
        return False
    selector = constraints.get("objectSelector")
    if selector:
        labels = [((o or {}).get("metadata") or {}).get("labels") or {} for o in (a.obj, a.old) if o is not None]
        if not any(labels_match(selector, lbl) for lbl in labels):
            return False
    return True


def admit(policies: list[dict], bindings: list[dict], a: Attributes, labels_match) -> list[str]:
    """Evaluate every bound policy that matches a: raises Denial for the first that denies; returns warnings."""
    warnings = []
    by_name = {p["metadata"]["name"]: p for p in policies}
    for binding in sorted(bindings, key=lambda b: b["metadata"]["name"]):
        bspec = binding.get("spec") or {}
        policy = by_name.get(bspec.get("policyName", ""))
        if policy is None:
            continue
        pspec = policy.get("spec") or {}
        if not _selected(pspec.get("matchConstraints"), a, labels_match):
            continue
        if bspec.get("matchResources") and not _selected(bspec["matchResources"], a, labels_match):
            continue
        actions = bspec.get("validationActions") or []
        try:
            failure = _evaluate_policy(pspec, a)
        except CelError as e:
            if pspec.get("failurePolicy", "Fail") == "Ignore":
                continue
            failure = (f"expression evaluation failed: {e}", "Invalid")
        if failure is None:
            continue
        message, reason = failure
        if "Deny" in actions:
            raise Denial(policy["metadata"]["name"], binding["metadata"]["name"], message, reason)
        if "Warn" in actions:
            warnings.append(f"Validation failed for ValidatingAdmissionPolicy '{policy['metadata']['name']}' with "
                            f"binding '{binding['metadata']['name']}': {message}")
    return warnings


def _evaluate_policy(spec: dict, a: Attributes) -> tuple[str, str] | None:
    """(message, reason) of the first validation that fails, None when the request passes (or is not matched by
    the matchConditions). CelError for an expression that cannot be evaluated."""
    activation: dict = {"object": a.obj, "oldObject": a.old, "request": a.request(), "params": None,
                        "namespaceObject": None}
    for cond in spec.get("matchConditions") or []:
        activation["variables"] = {}
        if not _truthy(evaluate(cond["expression"], activation)):
            return None
    variables: dict = {}
    for var in spec.get("variables") or []:
        activation["variables"] = variables
        try:
            variables[var["name"]] = _plain(evaluate(var["expression"], activation))
        except CelError as e:  # an error only where it is used (the real server evaluates lazily)
            variables[var["name"]] = CELEvalError(str(e))
    activation["variables"] = variables
    for v in spec.get("validations") or []:
        if _truthy(evaluate(v["expression"], activation)):
            continue
        message = v.get("message") or f"failed expression: {v['expression']}"
        if v.get("messageExpression"):
            try:
                message = str(evaluate(v["messageExpression"], activation))
            except CelError:
                pass
        return message, v.get("reason") or "Invalid"
    return None


def _plain(value):
    """A CEL value as the JSON value it came from (for variables used by later expressions)."""
    if _is_bool(value):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return value


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "BoolType"
