#!/usr/bin/python3
"""A small, faithful Kubernetes API server for tests.

No real kube-apiserver can be installed on the build machines, so this one stands in for it. It loads the
project's own CRD YAML and serves what kubectl and the `kubernetes` Python client really use, with the
behaviour of a real server (Kubernetes 1.32 by default), not of a mock:

- discovery (legacy and aggregated v2), /version, /openapi/v3 documents generated from the schemas (so kubectl
  sends fieldValidation=Strict and client-side `kubectl apply` works);
- CustomResourceDefinitions: preloaded at start and/or applied with kubectl; served types follow them;
- create/get/list/update/patch/delete/deletecollection with uid, resourceVersion, generation,
  creationTimestamp; 409 Conflict on a stale resourceVersion; finalizers; dryRun; delete preconditions (uid,
  resourceVersion);
- the garbage collector, at once: deleting an owner deletes its dependents (ownerReferences) that have no other
  owner left (propagationPolicy Background, the default), or only drops their reference (Orphan); Foreground is
  refused;
- the status subresource (only status is kept on /status; status is ignored on the main resource;
  metadata.generation bumps only on spec changes);
- structural schema: pruning of unknown fields (400 with fieldValidation=Strict, a Warning header with Warn),
  defaults, validation (types, required, enum, minimum/maximum, lengths, pattern, date-time, list maps) with
  the real server's 422 Invalid messages;
- merge patch and JSON patch by Content-Type (strategic merge only for built-in types; 415 for custom
  resources, like the real server; server-side apply is not supported: 415);
- field selectors (metadata.name, metadata.namespace, CRD selectableFields, Event fields), label selectors,
  limit/continue;
- watch as JSON lines: ADDED events for existing objects when resourceVersion is 0/absent, resume from a
  resourceVersion, timeoutSeconds, bookmarks, 410 Gone (an ERROR event, reason Expired) once the
  resourceVersion has left the retained window, selector transitions as ADDED/DELETED;
- server-side Tables (Accept: application/json;as=Table;g=meta.k8s.io;v=v1) from additionalPrinterColumns
  on get, list and watch;
- Events in both APIs (core v1 and events.k8s.io/v1, one store) with the real validation;
- authentication by bearer token (rotate_token, revoke_token) and, over TLS, by client certificate (CN is the
  user, each O a group, as kube-apiserver's x509 authenticator; issue_client_cert, revoke_client_cert: a
  revoked one is 401 Unauthorized), RBAC from the ClusterRoles/ClusterRoleBindings and the namespaced
  Roles/RoleBindings stored in the server (kubectl apply -f rbac.yaml), impersonation, SelfSubjectAccessReview
  (kubectl auth can-i);
- Leases (coordination.k8s.io/v1), as leader election uses them;
- CEL (kube_admission.py, with cel-python): the x-kubernetes-validations rules of CRD schemas, and
  ValidatingAdmissionPolicies with their bindings (admissionregistration.k8s.io/v1), applied with kubectl;
- test hooks: pause()/resume() (refuse connections or answer 503), partition(match) (the connections of the
  clients match() picks are dropped unanswered, watches included, while the others are served), compact()
  (expire old resourceVersions), a request log (server.requests, server.count(...)); start_apiserver(netns=)
  listens inside another network namespace (testnet.py).

Without TLS, a request without credentials is "system:unsecured", a cluster admin, as on the old insecure
port: kubectl sends credentials only over TLS (start_apiserver(tls=True) to meet RBAC with kubectl).

Not served: protobuf (but for the access reviews of kubectl auth can-i), server-side apply, managedFields,
Pods and the other built-in types (only events, namespaces, leases, RBAC and CRDs), aggregated API
servers, /openapi/v2 (so kubectl 1.27 and 1.28, which validate on the client with it, need --validate=false).

    server = start_apiserver()               # http://127.0.0.1:<free port>, CRDs from packaging/kubernetes
    server.kubeconfig("/tmp/kubeconfig")     # cluster-admin; kubeconfig(path, user=..., groups=[...]) for others
    ...
    server.stop()

CLI for manual use: python3 tests/kube_apiserver.py --port 6443 --kubeconfig /tmp/kc
"""

from __future__ import annotations

import argparse
import base64
import bisect
import copy
import datetime
import hashlib
import http.server
import json
import os
import random
import re
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kube_admission
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "packaging" / "kubernetes"
DEFAULT_CRDS = (MANIFESTS / "crd-machineoperations.yaml",)
DEFAULT_VERSION = "1.32.4"

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PROTOBUF = "application/vnd.kubernetes.protobuf"

# A stand-in for the Unbounded Machine CRD (deploy/machina/crd/unbounded-cloud.io_machines.yaml), served when
# asked for (machines=True): the agent annotates its host's Machine with the running version. Only the names
# and columns are upstream's; the schema keeps whatever is sent.
TEST_MACHINE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "machines.unbounded-cloud.io"},
    "spec": {
        "group": "unbounded-cloud.io",
        "names": {"kind": "Machine", "listKind": "MachineList", "plural": "machines",
                  "singular": "machine", "shortNames": ["mach"]},
        "scope": "Cluster",
        "versions": [{
            "name": "v1alpha3", "served": True, "storage": True, "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
        }],
    },
}


# ---------------------------------------------------------------------------------------------------------
# Time and small helpers

def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(t: datetime.datetime | None = None) -> str:
    return (t or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime.datetime | None:
    """An RFC 3339 date-time, as the real server accepts it; None if it is not one."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", value)
    if not m:
        return None
    frac = (m.group(3) or "")[:7].ljust(7, "0")[1:] if m.group(3) else "000000"
    tz = "+00:00" if m.group(4) in "Zz" else m.group(4)
    try:
        return datetime.datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}.{frac}{tz}")
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration, as the server renders date columns."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def age(timestamp: str | None) -> str:
    t = parse_time(timestamp) if timestamp else None
    return human_duration((now() - t).total_seconds()) if t else "<unknown>"


class GoLiteral(str):
    """A value printed as is in a field error (e.g. 0x0)."""


def go_value(v: Any) -> str:
    """A value as Go's field errors print it (%#v-like for the common cases)."""
    if isinstance(v, GoLiteral):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(v, sort_keys=True)


def json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def subdomain_errors(value: str) -> list[str]:
    errors = []
    if len(value) > 253:
        errors.append("must be no more than 253 characters")
    if not DNS1123_SUBDOMAIN.fullmatch(value):
        errors.append("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                      "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
                      "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
    return errors


def qualified_name_errors(value: str) -> list[str]:
    """validation.IsQualifiedName: an optional DNS subdomain prefix and '/', then a name of at most 63 chars."""
    prefix, _, name = value.rpartition("/")
    errors = []
    if "/" in value and (not prefix or subdomain_errors(prefix)):
        errors.append("prefix part must be a valid DNS subdomain")
    if not name or len(name) > 63 or not QUALIFIED_NAME.fullmatch(name):
        errors.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                      "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                      "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
    return errors


# ---------------------------------------------------------------------------------------------------------
# Errors as the real server reports them: a Status body with a reason and a code.

@dataclass
class FieldError:
    """k8s.io/apimachinery/pkg/util/validation/field.Error."""
    type: str  # Required, NotSupported, Invalid, Duplicate, TooLong, Forbidden, TypeInvalid
    field: str
    detail: str = ""
    value: Any = None

    REASONS = {"Required": "FieldValueRequired", "NotSupported": "FieldValueNotSupported",
               "Invalid": "FieldValueInvalid", "Duplicate": "FieldValueDuplicate", "TooLong": "FieldValueTooLong",
               "Forbidden": "FieldValueForbidden", "TypeInvalid": "FieldValueTypeInvalid"}
    LABELS = {"Required": "Required value", "NotSupported": "Unsupported value", "Invalid": "Invalid value",
              "Duplicate": "Duplicate value", "TooLong": "Too long", "Forbidden": "Forbidden",
              "TypeInvalid": "Invalid value"}

    def body(self) -> str:
        label = self.LABELS[self.type]
        if self.type in ("Required", "Forbidden", "TooLong"):
            return f"{label}: {self.detail}" if self.detail else label
        text = f"{label}: {go_value(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"

    def cause(self) -> dict:
        return {"reason": self.REASONS[self.type], "message": self.body(), "field": self.field}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _gr_details(rt: RType, name: str | None = None, uid: str | None = None) -> dict:
    details = {"group": rt.group, "kind": rt.plural}
    if name:
        details = {"name": name, **details}
    if uid:
        details["uid"] = uid
    return details


def not_found(rt: RType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.gr} "{name}" not found', _gr_details(rt, name))


def already_exists(rt: RType, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{rt.gr} "{name}" already exists', _gr_details(rt, name))


def conflict(rt: RType, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.gr} "{name}": {why}',
                    _gr_details(rt, name))


STALE = "the object has been modified; please apply your changes to the latest version and try again"


def invalid(rt: RType, name: str, errors: list[FieldError]) -> ApiError:
    qualified = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    if len(errors) == 1:
        text = f'{qualified} "{name}" is invalid: {errors[0]}'
    else:
        text = f'{qualified} "{name}" is invalid: [{", ".join(str(e) for e in errors)}]'
    return ApiError(422, "Invalid", text, {"name": name, "group": rt.group, "kind": rt.kind,
                                           "causes": [e.cause() for e in errors]})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")


def resource_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def unsupported_media_type(content_type: str, accepted: list[str]) -> ApiError:
    return ApiError(415, "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types include: "
                    f"{', '.join(accepted)}")


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


# ---------------------------------------------------------------------------------------------------------
# Structural schemas: pruning, defaulting and validation of custom resources

OBJECT_META_FIELDS = {
    "name": "string", "generateName": "string", "namespace": "string", "selfLink": "string", "uid": "string",
    "resourceVersion": "string", "generation": "integer", "creationTimestamp": "string",
    "deletionTimestamp": "string", "deletionGracePeriodSeconds": "integer", "labels": "map",
    "annotations": "map", "ownerReferences": "array", "finalizers": "array", "managedFields": "array",
}


def prune(schema: dict | None, value: Any, path: str, unknown: list[str]) -> Any:
    """Drop what the schema does not know (recording its path), drop nulls of non-nullable fields,
    apply defaults. Returns the pruned value."""
    if schema is None or not isinstance(value, (dict, list)):
        return value
    if isinstance(value, list):
        items = schema.get("items")
        return [prune(items, v, f"{path}[{i}]", unknown) for i, v in enumerate(value)] if items else value
    props = schema.get("properties")
    addl = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    out = {}
    for key, v in value.items():
        sub_path = f"{path}.{key}" if path else key
        if props is not None and key in props:
            sub = props[key]
        elif isinstance(addl, dict):
            sub = addl
        elif addl is True or preserve:
            out[key] = v
            continue
        elif props is None and addl is None and schema.get("type") != "object":
            out[key] = v  # untyped (e.g. x-kubernetes-int-or-string): nothing to prune
            continue
        else:
            unknown.append(sub_path)
            continue
        if v is None and not sub.get("nullable") and "default" not in sub:
            continue
        out[key] = prune(sub, v, sub_path, unknown)
    for key, sub in (props or {}).items():
        if key not in out and "default" in sub:  # and the defaults inside the default, as the real server
            out[key] = prune(sub, copy.deepcopy(sub["default"]), f"{path}.{key}" if path else key, [])
    return out


def apply_defaults(schema: dict | None, value: Any) -> Any:
    """Structural defaults of what is missing (nothing pruned): what the real server does on every read from
    storage, so that objects stored before a default was added show it too."""
    if schema is None:
        return value
    if isinstance(value, list):
        items = schema.get("items")
        return [apply_defaults(items, v) for v in value] if items else value
    if not isinstance(value, dict):
        return value
    props = schema.get("properties") or {}
    out = {k: apply_defaults(props.get(k), v) for k, v in value.items()}
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = apply_defaults(sub, copy.deepcopy(sub["default"]))
    return out


def _type_ok(t: str, v: Any) -> bool:
    return {"object": isinstance(v, dict), "array": isinstance(v, list), "string": isinstance(v, str),
            "boolean": isinstance(v, bool),
            "integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool)}.get(t, True)


def validate(schema: dict | None, v: Any, path: str, errors: list[FieldError]) -> None:
    """Validate v against a structural schema, with the real server's messages."""
    if schema is None:
        return
    if v is None:
        if not schema.get("nullable") and schema.get("type"):
            errors.append(FieldError("TypeInvalid", path, f'{path} in body must be of type {schema["type"]}: "null"',
                                     "null"))
        return
    t = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if not (_type_ok("integer", v) or isinstance(v, str)):
            errors.append(FieldError("TypeInvalid", path, f'{path} in body must be of type integer,string: '
                                     f'"{json_type(v)}"', json_type(v)))
            return
    elif t and not _type_ok(t, v):
        errors.append(FieldError("TypeInvalid", path, f'{path} in body must be of type {t}: "{json_type(v)}"',
                                 json_type(v)))
        return
    if "enum" in schema and v not in schema["enum"]:
        supported = ", ".join(go_value(e) for e in schema["enum"])
        errors.append(FieldError("NotSupported", path, f"supported values: {supported}", v))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (v <= low if schema.get("exclusiveMinimum") else v < low):
            word = "greater than" if schema.get("exclusiveMinimum") else "greater than or equal to"
            errors.append(FieldError("Invalid", path, f"{path} in body should be {word} {low}", v))
        if high is not None and (v >= high if schema.get("exclusiveMaximum") else v > high):
            word = "less than" if schema.get("exclusiveMaximum") else "less than or equal to"
            errors.append(FieldError("Invalid", path, f"{path} in body should be {word} {high}", v))
    if isinstance(v, str):
        if "maxLength" in schema and len(v) > schema["maxLength"]:
            errors.append(FieldError("TooLong", path, f"may not be more than {schema['maxLength']} bytes", v))
        if "minLength" in schema and len(v) < schema["minLength"]:
            errors.append(FieldError("Invalid", path, f"{path} in body should be at least {schema['minLength']} "
                                     f"chars long", v))
        if "pattern" in schema and not re.search(schema["pattern"], v):
            errors.append(FieldError("Invalid", path, f"{path} in body should match '{schema['pattern']}'", v))
        if schema.get("format") == "date-time" and parse_time(v) is None:
            errors.append(FieldError("Invalid", path, f'{path} in body must be of type date-time: "{v}"', v))
    if isinstance(v, list):
        if "maxItems" in schema and len(v) > schema["maxItems"]:
            errors.append(FieldError("TooLong", path, f"must have at most {schema['maxItems']} items", v))
        if "minItems" in schema and len(v) < schema["minItems"]:
            errors.append(FieldError("Invalid", path, f"{path} in body should have at least {schema['minItems']} "
                                     f"items", v))
        for i, item in enumerate(v):
            validate(schema.get("items"), item, f"{path}[{i}]", errors)
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = set()
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    k = tuple(json.dumps(item.get(key)) for key in keys)
                    if k in seen:
                        errors.append(FieldError("Duplicate", f"{path}[{i}]", "",
                                                 {key: item.get(key) for key in keys}))
                    seen.add(k)
        elif list_type == "set":
            seen_items = []
            for i, item in enumerate(v):
                if item in seen_items:
                    errors.append(FieldError("Duplicate", f"{path}[{i}]", "", item))
                seen_items.append(item)
    if isinstance(v, dict):
        for req in schema.get("required", []):
            if req not in v:
                errors.append(FieldError("Required", f"{path}.{req}" if path else req))
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        for key, item in v.items():
            sub_path = f"{path}.{key}" if path else key
            if key in props:
                validate(props[key], item, sub_path, errors)
            elif isinstance(addl, dict):
                validate(addl, item, sub_path, errors)
        if "maxProperties" in schema and len(v) > schema["maxProperties"]:
            errors.append(FieldError("TooLong", path, f"must have at most {schema['maxProperties']} items", v))


def validate_object_meta(meta: dict, namespaced: bool, name_errors=subdomain_errors) -> list[FieldError]:
    errors = []
    for key, kind in OBJECT_META_FIELDS.items():
        if key in meta and meta[key] is not None:
            ok = {"string": isinstance(meta[key], str), "integer": _type_ok("integer", meta[key]),
                  "map": isinstance(meta[key], dict), "array": isinstance(meta[key], list)}[kind]
            if not ok:
                want = "object" if kind == "map" else kind
                errors.append(FieldError("TypeInvalid", f"metadata.{key}",
                                         f'metadata.{key} in body must be of type {want}: "{json_type(meta[key])}"',
                                         json_type(meta[key])))
    if errors:
        return errors
    name = meta.get("name", "")
    if not name:
        errors.append(FieldError("Required", "metadata.name", "name or generateName is required"))
    else:
        for msg in name_errors(name):
            errors.append(FieldError("Invalid", "metadata.name", msg, name))
    for key, value in (meta.get("labels") or {}).items():
        for msg in qualified_name_errors(key):
            errors.append(FieldError("Invalid", "metadata.labels", msg, key))
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            errors.append(FieldError("Invalid", "metadata.labels", "a valid label must be an empty string or "
                                     "consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                                     "with an alphanumeric character", value))
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        for msg in qualified_name_errors(key):
            errors.append(FieldError("Invalid", "metadata.annotations", msg, key))
        if not isinstance(value, str):
            errors.append(FieldError("TypeInvalid", f"metadata.annotations.{key}", "must be of type string",
                                     json_type(value)))
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > 256 * 1024:
        errors.append(FieldError("TooLong", "metadata.annotations", "may not be more than 262144 bytes"))
    for i, f in enumerate(meta.get("finalizers") or []):
        if not isinstance(f, str) or qualified_name_errors(f):
            errors.append(FieldError("Invalid", f"metadata.finalizers[{i}]", "name is neither a standard "
                                     "finalizer name nor is it fully qualified", f))
    return errors


# ---------------------------------------------------------------------------------------------------------
# JSONPath for printer columns: .a.b, ['a'], [0], [*], [?(@.a.b=="v")], as the CRD columns use them.

_JP_TOKEN = re.compile(
    r"""\.(?P<name>[A-Za-z0-9_\-$]+)|\.\*|\[\*\]|\[(?P<index>-?\d+)\]|\[['"](?P<quoted>[^'"]+)['"]\]"""
    r"""|\[\?\(@(?P<fpath>(?:\.[A-Za-z0-9_\-]+)+)\s*(?P<op>==|!=)\s*"""
    r"""(?P<lit>"[^"]*"|'[^']*'|-?\d+(?:\.\d+)?|true|false)\)\]""")


def jsonpath(obj: Any, path: str) -> list[Any]:
    """All results of a CRD column JSONPath (the first one is the cell)."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    nodes, pos = [obj], 0
    while pos < len(path):
        m = _JP_TOKEN.match(path, pos)
        if not m:
            raise ValueError(f"unsupported JSONPath {path!r} at {pos}")
        pos = m.end()
        text, out = m.group(0), []
        for node in nodes:
            if m.group("name") is not None or m.group("quoted") is not None:
                key = m.group("name") if m.group("name") is not None else m.group("quoted")
                if isinstance(node, dict) and key in node:
                    out.append(node[key])
            elif m.group("index") is not None:
                if isinstance(node, list):
                    i = int(m.group("index"))
                    if -len(node) <= i < len(node):
                        out.append(node[i])
            elif m.group("fpath") is not None:
                lit = m.group("lit")
                want = json.loads(lit.replace("'", '"')) if lit[0] in "'\"" else json.loads(lit)
                for item in (node if isinstance(node, list) else []):
                    got = item
                    for key in m.group("fpath")[1:].split("."):
                        got = got.get(key) if isinstance(got, dict) else None
                    if (got == want) == (m.group("op") == "=="):
                        out.append(item)
            elif text in (".*", "[*]"):
                if isinstance(node, list):
                    out.extend(node)
                elif isinstance(node, dict):
                    out.extend(node.values())
        nodes = out
    return nodes


# ---------------------------------------------------------------------------------------------------------
# Selectors

def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur += text[i:i + 2]
            i += 2
            continue
        if text[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    """fields.ParseSelector: comma-separated key=value, key==value, key!=value."""
    terms = []
    for part in _split_unescaped(text, ","):
        if not part.strip():
            continue
        m = re.fullmatch(r"\s*([^=!\s]+)\s*(!=|==|=)(.*)", part, re.S)
        if not m:
            raise bad_request(f'invalid selector: \'{text}\'; can\'t understand \'{part}\'')
        value = re.sub(r"\\(.)", r"\1", m.group(3))
        terms.append((m.group(1), "!=" if m.group(2) == "!=" else "=", value))
    return terms


def parse_label_selector(text: str) -> list[tuple[str, str, list[str]]]:
    """labels.Parse: key, !key, key=v, key==v, key!=v, key in (a,b), key notin (a,b)."""
    reqs, depth, cur = [], 0, ""
    parts = []
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s*\(([^)]*)\)", part):
            reqs.append((m.group(1), m.group(2), [v.strip() for v in m.group(3).split(",") if v.strip()]))
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", part):
            reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", [m.group(3)]))
        elif m := re.fullmatch(r"!\s*([\w./-]+)", part):
            reqs.append((m.group(1), "!", []))
        elif re.fullmatch(r"[\w./-]+", part):
            reqs.append((part, "exists", []))
        else:
            raise bad_request(f"unable to parse requirement: {part!r}")
    return reqs


def labels_match(reqs: list[tuple[str, str, list[str]]], labels: dict) -> bool:
    return labels_match_(reqs, labels)


def labels_match_(reqs: list[tuple[str, str, list[str]]], labels: dict) -> bool:
    for key, op, values in reqs:
        present, value = key in labels, labels.get(key)
        ok = {"=": present and value == values[0], "!=": not present or value != values[0],
              "in": present and value in values, "notin": not present or value not in values,
              "exists": present, "!": not present}[op]
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Patches

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"JSON pointer must be empty or start with a \"/\": {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch. Malformed patches are 400; operations that do not apply are 422, as in the
    real server (which uses evanphx/json-patch)."""
    if not isinstance(ops, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(doc)

    def fail(message):
        return ApiError(422, "Invalid", message)

    def parent(path):
        parts = _pointer(path)
        if not parts:
            raise fail(f"unable to operate on the document root: {path}")
        node = doc
        for p in parts[:-1]:
            if isinstance(node, dict) and p in node:
                node = node[p]
            elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
            else:
                raise fail(f"doc is missing path: \"{path}\": missing value")
        return node, parts[-1]

    def get(path):
        node = doc
        for p in _pointer(path):
            if isinstance(node, dict) and p in node:
                node = node[p]
            elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
            else:
                raise fail(f"doc is missing key: {path}: missing value")
        return node

    def add(path, value):
        nonlocal doc
        if path == "":
            doc = value
            return
        node, key = parent(path)
        if isinstance(node, dict):
            node[key] = value
        elif isinstance(node, list):
            if key == "-":
                node.append(value)
            elif key.isdigit() and int(key) <= len(node):
                node.insert(int(key), value)
            else:
                raise fail(f"add operation does not apply: doc is missing path: \"{path}\": missing value")
        else:
            raise fail(f"add operation does not apply: doc is missing path: \"{path}\": missing value")

    def remove(path, op="remove"):
        node, key = parent(path)
        if isinstance(node, dict) and key in node:
            return node.pop(key)
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            return node.pop(int(key))
        raise fail(f"{op} operation does not apply: doc is missing key: {path}: missing value")

    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid JSON patch operation: {json.dumps(op)}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            remove(path, "replace")
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            add(path, remove(op["from"], "move"))
        elif kind == "copy":
            add(path, copy.deepcopy(get(op["from"])))
        elif kind == "test":
            try:
                current = get(path)
            except ApiError:
                current = None
            if current != op.get("value"):
                raise fail(f"testing value {path} failed: test failed")
        else:
            raise bad_request(f"Unexpected kind: {kind}")
    return doc


def _protobuf_fields(data: bytes) -> dict[int, list]:
    """The fields of one protobuf message: {number: [value, ...]} (varints as int, the rest as bytes)."""
    def varint(i):
        value = shift = 0
        while True:
            b = data[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not b & 0x80:
                return value, i
    fields, i = {}, 0
    while i < len(data):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            size, i = varint(i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise bad_request(f"unsupported protobuf wire type {wire}")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def decode_access_review(body: bytes) -> dict:
    """A SelfSubjectAccessReview in Kubernetes' protobuf envelope ("k8s\\0" + runtime.Unknown), as kubectl auth
    can-i sends it. Only the spec matters."""
    if not body.startswith(b"k8s\x00"):
        raise bad_request("the body of the request is not a Kubernetes protobuf message")
    raw = _protobuf_fields(body[4:])[2][0]
    spec = _protobuf_fields(_protobuf_fields(raw).get(2, [b""])[0])
    out: dict = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {}}
    if 1 in spec:
        names = {1: "namespace", 2: "verb", 3: "group", 4: "version", 5: "resource", 6: "subresource", 7: "name"}
        attrs = _protobuf_fields(spec[1][0])
        out["spec"]["resourceAttributes"] = {names[k]: v[0].decode() for k, v in attrs.items() if k in names}
    if 2 in spec:
        attrs = _protobuf_fields(spec[2][0])
        out["spec"]["nonResourceAttributes"] = {{1: "path", 2: "verb"}[k]: v[0].decode()
                                                for k, v in attrs.items() if k in (1, 2)}
    return out


# ---------------------------------------------------------------------------------------------------------
# Served resource types

@dataclass
class Column:
    name: str
    type: str
    cell: Callable[[dict], Any]
    priority: int = 0
    format: str = ""
    description: str = ""

    def definition(self) -> dict:
        return {"name": self.name, "type": self.type, "format": self.format, "description": self.description,
                "priority": self.priority}


NAME_COLUMN_DESCRIPTION = (
    "Name must be unique within a namespace. Is required when creating resources, although some resources may "
    "allow a client to request the generation of an appropriate name automatically. Name is primarily intended "
    "for creation idempotence and configuration definition. Cannot be updated. More info: "
    "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names")


def name_column() -> Column:
    return Column("Name", "string", lambda o: o["metadata"].get("name"), format="name",
                  description=NAME_COLUMN_DESCRIPTION)


def age_column(name="Age") -> Column:
    return Column(name, "string", lambda o: age(o["metadata"].get("creationTimestamp")),
                  description="CreationTimestamp is a timestamp representing the server time when this object "
                              "was created.")


@dataclass(eq=False)
class RType:
    """One served group/version/resource."""
    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    store: str  # storage key: versions (and the two Event APIs) of one resource share a store
    schema: dict | None = None
    list_kind: str = ""
    short_names: list = field(default_factory=list)
    categories: list = field(default_factory=list)
    verbs: list = field(default_factory=lambda: ["create", "delete", "deletecollection", "get", "list", "patch",
                                                 "update", "watch"])
    status: bool = False  # has the status subresource
    custom: bool = False  # a custom resource: status dropped on create, no unconditional update, no strategic merge
    generation: bool = False  # metadata.generation counts changes of the spec (everything but metadata/status)
    columns: list = field(default_factory=list)
    fields: Callable[[dict], dict] | None = None  # selectable fields beyond metadata.name/namespace
    field_aliases: dict = field(default_factory=dict)  # field selector names of this API -> stored names
    to_storage: Callable[[dict], dict] | None = None
    from_storage: Callable[[dict], dict] | None = None
    check: Callable[[dict, dict | None], list] | None = None  # extra validation: (new, old) -> [FieldError]
    name_errors: Callable[[str], list] = subdomain_errors
    normalize: Callable[[dict], None] | None = None  # typed fields the server re-encodes (e.g. timestamps)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def gr(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def patch_types(self) -> list[str]:
        types = [JSON_PATCH, MERGE_PATCH]
        return types if self.custom else types + [STRATEGIC_PATCH]

    def selectable(self, obj: dict) -> dict:
        meta = obj.get("metadata", {})
        values = {"metadata.name": meta.get("name", "")}
        if self.namespaced:
            values["metadata.namespace"] = meta.get("namespace", "")
        if self.fields:
            values.update(self.fields(obj))
        return values


def crd_types(crd: dict, selectable_fields_supported: bool) -> list[RType]:
    spec = crd["spec"]
    names = spec["names"]
    result = []
    for ver in spec.get("versions", []):
        if not ver.get("served", True):
            continue
        schema = (ver.get("schema") or {}).get("openAPIV3Schema")
        columns = [name_column()]
        for col in ver.get("additionalPrinterColumns") or []:
            columns.append(_crd_column(col))
        if not ver.get("additionalPrinterColumns"):
            columns.append(Column("Age", "date", lambda o: age(o["metadata"].get("creationTimestamp")),
                                  description="Custom resource definition column (in JSONPath format): "
                                              ".metadata.creationTimestamp"))
        selectable = [f["jsonPath"] for f in ver.get("selectableFields") or []] if selectable_fields_supported else []

        def fields(obj, paths=tuple(selectable)):
            """Selectable fields are strings, integers or booleans; an absent one is the empty string."""
            values = {}
            for p in paths:
                found = jsonpath(obj, p)
                value = found[0] if found else ""
                values[p.lstrip(".")] = go_value(value) if isinstance(value, bool) else str(value)
            return values

        result.append(RType(
            group=spec["group"], version=ver["name"], plural=names["plural"],
            singular=names.get("singular") or names["kind"].lower(), kind=names["kind"],
            list_kind=names.get("listKind") or names["kind"] + "List",
            namespaced=spec.get("scope", "Namespaced") == "Namespaced", store=f"{spec['group']}/{names['plural']}",
            schema=schema, short_names=list(names.get("shortNames") or []),
            categories=list(names.get("categories") or []),
            status="status" in (ver.get("subresources") or {}), custom=True, generation=True, columns=columns,
            fields=fields))
    return result


def _crd_column(col: dict) -> Column:
    path, kind = col["jsonPath"], col.get("type", "string")

    def cell(obj):
        found = jsonpath(obj, path)
        if not found:
            return None
        value = found[0]
        if kind == "date":
            return age(value) if isinstance(value, str) and parse_time(value) else (
                "<invalid>" if isinstance(value, str) else None)
        if kind == "string":
            return value if isinstance(value, str) else go_value(value)
        if kind == "integer":
            return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if kind == "number":
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if kind == "boolean":
            return value if isinstance(value, bool) else None
        return value

    return Column(col["name"], kind, cell, priority=col.get("priority", 0), format=col.get("format", ""),
                  description=col.get("description")
                  or f"Custom resource definition column (in JSONPath format): {path}")


# Built-in types: the schemas are the parts of the real OpenAPI that clients send.

def _obj(props: dict, **extra) -> dict:
    return {"type": "object", "properties": props, **extra}


STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}
STR_MAP = {"type": "object", "additionalProperties": STR}
STR_LIST = {"type": "array", "items": STR}
META = {"type": "object"}
OBJECT_REFERENCE = _obj({k: STR for k in ("apiVersion", "fieldPath", "kind", "name", "namespace",
                                          "resourceVersion", "uid")})
TYPE_META = {"apiVersion": STR, "kind": STR, "metadata": META}

CORE_EVENT_SCHEMA = _obj({
    **TYPE_META, "involvedObject": OBJECT_REFERENCE, "reason": STR, "message": STR,
    "source": _obj({"component": STR, "host": STR}), "firstTimestamp": TIME, "lastTimestamp": TIME,
    "count": INT, "type": STR, "eventTime": STR, "series": _obj({"count": INT, "lastObservedTime": STR}),
    "action": STR, "related": OBJECT_REFERENCE, "reportingComponent": STR, "reportingInstance": STR})
EVENTS_V1_SCHEMA = _obj({
    **TYPE_META, "regarding": OBJECT_REFERENCE, "related": OBJECT_REFERENCE, "note": STR, "reason": STR,
    "type": STR, "action": STR, "eventTime": STR, "series": _obj({"count": INT, "lastObservedTime": STR}),
    "reportingController": STR, "reportingInstance": STR, "deprecatedSource": _obj({"component": STR, "host": STR}),
    "deprecatedFirstTimestamp": TIME, "deprecatedLastTimestamp": TIME, "deprecatedCount": INT})
NAMESPACE_SCHEMA = _obj({**TYPE_META, "spec": _obj({"finalizers": STR_LIST}), "status": _obj({"phase": STR})})
POLICY_RULE = _obj({"apiGroups": STR_LIST, "resources": STR_LIST, "verbs": STR_LIST, "resourceNames": STR_LIST,
                    "nonResourceURLs": STR_LIST}, required=["verbs"])
CLUSTER_ROLE_SCHEMA = _obj({**TYPE_META, "rules": {"type": "array", "items": POLICY_RULE},
                            "aggregationRule": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})
CLUSTER_ROLE_BINDING_SCHEMA = _obj({
    **TYPE_META, "roleRef": _obj({"apiGroup": STR, "kind": STR, "name": STR}, required=["apiGroup", "kind", "name"]),
    "subjects": {"type": "array", "items": _obj({"kind": STR, "apiGroup": STR, "name": STR, "namespace": STR},
                                               required=["kind", "name"])}}, required=["roleRef"])
ROLE_SCHEMA = _obj({**TYPE_META, "rules": {"type": "array", "items": POLICY_RULE}})
ROLE_BINDING_SCHEMA = CLUSTER_ROLE_BINDING_SCHEMA
LEASE_SCHEMA = _obj({**TYPE_META, "spec": _obj({
    "holderIdentity": STR, "leaseDurationSeconds": {"type": "integer", "format": "int32"}, "acquireTime": TIME,
    "renewTime": TIME, "leaseTransitions": {"type": "integer", "format": "int32"}, "strategy": STR,
    "preferredHolder": STR})})
CRD_SCHEMA = _obj({**TYPE_META, "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                   "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}, required=["spec"])
SSAR_SCHEMA = _obj({**TYPE_META, "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})
POLICY_SCHEMA = SSAR_SCHEMA

# events.k8s.io/v1 <-> core/v1 field names (the registry stores the core form)
EVENT_FIELD_MAP = {"regarding": "involvedObject", "note": "message", "reportingController": "reportingComponent",
                   "deprecatedSource": "source", "deprecatedFirstTimestamp": "firstTimestamp",
                   "deprecatedLastTimestamp": "lastTimestamp", "deprecatedCount": "count"}


def events_v1_to_core(obj: dict) -> dict:
    return {EVENT_FIELD_MAP.get(k, k): v for k, v in obj.items()}


def core_to_events_v1(obj: dict) -> dict:
    back = {v: k for k, v in EVENT_FIELD_MAP.items()}
    return {back.get(k, k): v for k, v in obj.items()}


def normalize_event(obj: dict) -> None:
    """Built-in types are decoded and re-encoded: metav1.Time has seconds, metav1.MicroTime microseconds."""
    for key in ("firstTimestamp", "lastTimestamp"):
        if t := parse_time(obj.get(key)):
            obj[key] = rfc3339(t.astimezone(datetime.UTC))
    for holder, key in ((obj, "eventTime"), (obj.get("series") or {}, "lastObservedTime")):
        if t := parse_time(holder.get(key)):
            holder[key] = t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_fields(obj: dict) -> dict:
    ref = obj.get("involvedObject") or {}
    source = (obj.get("source") or {}).get("component") or obj.get("reportingComponent", "")
    values = {f"involvedObject.{k}": str(ref.get(k, "")) for k in
              ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")}
    values.update({"reason": obj.get("reason", ""), "reportingComponent": obj.get("reportingComponent", ""),
                   "source": source, "type": obj.get("type", "")})
    return values


def check_event(obj: dict, old: dict | None, api_version: str) -> list[FieldError]:
    """ValidateEventCreate/Update of pkg/apis/core/validation/events.go (stored form, named as the request's API)."""
    errors = []
    core = api_version == "v1"
    ns = obj["metadata"].get("namespace", "")
    ref_ns = (obj.get("involvedObject") or {}).get("namespace", "")

    def name(core_name: str) -> str:  # a field as the request's API calls it
        return core_name if core else {v: k for k, v in EVENT_FIELD_MAP.items()}.get(core_name, core_name)

    if not obj.get("eventTime"):
        if ref_ns and ns != ref_ns or not ref_ns and ns not in ("", "default"):
            errors.append(FieldError("Invalid", f"{name('involvedObject')}.namespace", "does not match event.namespace",
                                     ref_ns))
    else:
        if not ref_ns and ns not in ("default", "kube-system"):
            errors.append(FieldError("Invalid", f"{name('involvedObject')}.namespace", "does not match event.namespace",
                                     ref_ns))
        controller = obj.get("reportingComponent", "")
        if not controller:
            errors.append(FieldError("Required", name("reportingComponent")))
        else:
            errors += [FieldError("Invalid", name("reportingComponent"), m, controller)
                       for m in qualified_name_errors(controller)]
        for key, limit in (("reportingInstance", 128), ("action", 128), ("reason", 128)):
            if not obj.get(key):
                errors.append(FieldError("Required", key))
            elif len(obj[key]) > limit:
                errors.append(FieldError("Invalid", key, f"can have at most {limit} characters", ""))
        if len(obj.get("message", "")) > 1024:
            errors.append(FieldError("Invalid", name("message"), "can have at most 1024 characters", ""))
    if old is None and not core:  # strict validation of events created through events.k8s.io/v1
        if not obj.get("eventTime"):
            errors.append(FieldError("Required", "eventTime"))
        if obj.get("type") not in ("Normal", "Warning"):
            errors.append(FieldError("Invalid", "type", f"has invalid value: {obj.get('type', '')}", ""))
        for key in ("firstTimestamp", "lastTimestamp", "count", "source"):
            if obj.get(key):
                errors.append(FieldError("Invalid", name(key), "needs to be unset", ""))
    if old is not None and not core:
        for key in ("involvedObject", "reason", "reportingComponent", "reportingInstance", "action"):
            if obj.get(key) != old.get(key):
                errors.append(FieldError("Invalid", name(key), "field is immutable", obj.get(key)))
    return errors


def _event_columns() -> list[Column]:
    def last_seen(o):
        ts = o.get("lastTimestamp") or (o.get("series") or {}).get("lastObservedTime") or o.get("eventTime") \
             or o.get("firstTimestamp")
        return age(ts) if ts else "<unknown>"

    def obj_ref(o):
        ref = o.get("involvedObject") or {}
        return f"{ref.get('kind', '').lower()}/{ref.get('name', '')}"

    return [Column("Last Seen", "string", last_seen), Column("Type", "string", lambda o: o.get("type", "")),
            Column("Reason", "string", lambda o: o.get("reason", "")), Column("Object", "string", obj_ref),
            Column("Subobject", "string", lambda o: (o.get("involvedObject") or {}).get("fieldPath", ""), 1),
            Column("Source", "string", lambda o: (o.get("source") or {}).get("component")
                   or o.get("reportingComponent", ""), 1),
            Column("Message", "string", lambda o: o.get("message", "")),
            Column("First Seen", "string", lambda o: age(o.get("firstTimestamp") or o.get("eventTime")), 1),
            Column("Count", "string", lambda o: str(o.get("count") or (o.get("series") or {}).get("count") or 1), 1),
            Column("Name", "string", lambda o: o["metadata"]["name"], 1)]


def path_segment_errors(value: str) -> list[str]:
    """path.IsValidPathSegmentName, which RBAC object names follow."""
    if value in (".", ".."):
        return [f"may not be '{value}'"]
    return [f"may not contain '{c}'" for c in "/%" if c in value]


def label_errors(value: str) -> list[str]:
    if len(value) <= 63 and DNS1123_LABEL.fullmatch(value):
        return []
    return ["a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
            "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
            "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"]


def builtin_types() -> list[RType]:
    core_event = RType("", "v1", "events", "event", "Event", True, "events", CORE_EVENT_SCHEMA, "EventList",
                       short_names=["ev"], columns=_event_columns(), fields=event_fields,
                       check=lambda o, old: check_event(o, old, "v1"), normalize=normalize_event)
    v1_event = RType("events.k8s.io", "v1", "events", "event", "Event", True, "events", EVENTS_V1_SCHEMA,
                     "EventList", short_names=["ev"], columns=_event_columns(), fields=event_fields,
                     field_aliases={**{f"regarding.{k}": f"involvedObject.{k}" for k in
                                       ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion",
                                        "fieldPath")}, "reportingController": "reportingComponent"},
                     to_storage=events_v1_to_core, from_storage=core_to_events_v1,
                     check=lambda o, old: check_event(o, old, "events.k8s.io/v1"), normalize=normalize_event)
    namespace = RType("", "v1", "namespaces", "namespace", "Namespace", False, "namespaces", NAMESPACE_SCHEMA,
                      "NamespaceList", short_names=["ns"], verbs=["create", "delete", "get", "list", "patch",
                                                                   "update", "watch"], status=True,
                      columns=[name_column(), Column("Status", "string", lambda o: (o.get("status") or {})
                                                     .get("phase", "")), age_column()],
                      fields=lambda o: {"status.phase": (o.get("status") or {}).get("phase", "")},
                      name_errors=label_errors)
    created_at = Column("Created At", "date", lambda o: o["metadata"].get("creationTimestamp"))
    crd = RType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "customresourcedefinition",
                "CustomResourceDefinition", False, "customresourcedefinitions", CRD_SCHEMA,
                "CustomResourceDefinitionList", short_names=["crd", "crds"], categories=["api-extensions"],
                status=True, generation=True, columns=[name_column(), created_at])
    role = RType("rbac.authorization.k8s.io", "v1", "clusterroles", "clusterrole", "ClusterRole", False,
                 "clusterroles", CLUSTER_ROLE_SCHEMA, "ClusterRoleList", columns=[name_column(), created_at],
                 name_errors=path_segment_errors)
    binding = RType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "clusterrolebinding",
                    "ClusterRoleBinding", False, "clusterrolebindings", CLUSTER_ROLE_BINDING_SCHEMA,
                    "ClusterRoleBindingList",
                    columns=[name_column(), Column("Role", "string", lambda o: f"{o['roleRef']['kind']}/"
                                                                               f"{o['roleRef']['name']}"),
                             age_column()], name_errors=path_segment_errors)
    ssar = RType("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "selfsubjectaccessreview",
                 "SelfSubjectAccessReview", False, "selfsubjectaccessreviews", SSAR_SCHEMA, verbs=["create"])
    ssr = RType("authentication.k8s.io", "v1", "selfsubjectreviews", "selfsubjectreview", "SelfSubjectReview",
                False, "selfsubjectreviews", SSAR_SCHEMA, verbs=["create"])
    policy = RType("admissionregistration.k8s.io", "v1", "validatingadmissionpolicies", "validatingadmissionpolicy",
                   "ValidatingAdmissionPolicy", False, "validatingadmissionpolicies", POLICY_SCHEMA,
                   "ValidatingAdmissionPolicyList", status=True, generation=True,
                   columns=[name_column(), Column("Validations", "integer", lambda o: len(
                       (o.get("spec") or {}).get("validations") or [])), age_column()],
                   check=lambda o, old: check_policy(o))
    policy_binding = RType("admissionregistration.k8s.io", "v1", "validatingadmissionpolicybindings",
                           "validatingadmissionpolicybinding", "ValidatingAdmissionPolicyBinding", False,
                           "validatingadmissionpolicybindings", POLICY_SCHEMA, "ValidatingAdmissionPolicyBindingList",
                           generation=True,
                           columns=[name_column(), Column("PolicyName", "string", lambda o: (o.get("spec") or {})
                                                          .get("policyName", "")),
                                    Column("ParamRef", "string", lambda o: "<unset>"), age_column()],
                           check=lambda o, old: check_policy_binding(o))
    ns_role = RType("rbac.authorization.k8s.io", "v1", "roles", "role", "Role", True, "roles", ROLE_SCHEMA,
                    "RoleList", columns=[name_column(), created_at], name_errors=path_segment_errors)
    ns_binding = RType("rbac.authorization.k8s.io", "v1", "rolebindings", "rolebinding", "RoleBinding", True,
                       "rolebindings", ROLE_BINDING_SCHEMA, "RoleBindingList",
                       columns=[name_column(), Column("Role", "string", lambda o: f"{o['roleRef']['kind']}/"
                                                                                  f"{o['roleRef']['name']}"),
                                age_column()], name_errors=path_segment_errors,
                       check=lambda o, old: check_role_binding(o))
    lease = RType("coordination.k8s.io", "v1", "leases", "lease", "Lease", True, "leases", LEASE_SCHEMA, "LeaseList",
                  columns=[name_column(), Column("Holder", "string", lambda o: (o.get("spec") or {})
                                                 .get("holderIdentity", "")), age_column()],
                  check=lambda o, old: check_lease(o), normalize=normalize_lease)
    return [core_event, v1_event, namespace, crd, role, binding, ns_role, ns_binding, lease, ssar, ssr, policy,
            policy_binding]


def check_role_binding(obj: dict) -> list[FieldError]:
    """A RoleBinding refers to a Role (of its namespace) or a ClusterRole."""
    kind = (obj.get("roleRef") or {}).get("kind")
    if kind not in ("Role", "ClusterRole"):
        return [FieldError("NotSupported", "roleRef.kind", 'supported values: "ClusterRole", "Role"', kind)]
    return []


def check_lease(obj: dict) -> list[FieldError]:
    """ValidateLeaseSpec of pkg/apis/coordination/validation."""
    spec = obj.get("spec") or {}
    errors = []
    if "leaseDurationSeconds" in spec and spec["leaseDurationSeconds"] <= 0:
        errors.append(FieldError("Invalid", "spec.leaseDurationSeconds", "must be greater than 0",
                                 spec["leaseDurationSeconds"]))
    if "leaseTransitions" in spec and spec["leaseTransitions"] < 0:
        errors.append(FieldError("Invalid", "spec.leaseTransitions", "must be greater than or equal to 0",
                                 spec["leaseTransitions"]))
    return errors


def normalize_lease(obj: dict) -> None:
    """acquireTime and renewTime are metav1.MicroTime: re-encoded with microseconds."""
    spec = obj.get("spec") or {}
    for key in ("acquireTime", "renewTime"):
        if t := parse_time(spec.get(key)):
            spec[key] = t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_policy(obj: dict) -> list[FieldError]:
    """What the real server checks of a policy that matters here: its expressions compile."""
    spec = obj.get("spec") or {}
    errors = []
    if not (spec.get("matchConstraints") or {}).get("resourceRules"):
        errors.append(FieldError("Required", "spec.matchConstraints.resourceRules"))
    if spec.get("paramKind"):
        errors.append(FieldError("Forbidden", "spec.paramKind", "not supported by this test server"))
    for section in ("matchConditions", "variables", "validations"):
        for i, item in enumerate(spec.get(section) or []):
            for key in ("expression", "messageExpression"):
                if key in item:
                    try:
                        kube_admission._program(item[key])
                    except kube_admission.CelError as e:
                        errors.append(FieldError("Invalid", f"spec.{section}[{i}].{key}", str(e), item[key]))
    return errors


def check_policy_binding(obj: dict) -> list[FieldError]:
    spec = obj.get("spec") or {}
    errors = []
    if not spec.get("policyName"):
        errors.append(FieldError("Required", "spec.policyName"))
    actions = spec.get("validationActions") or []
    if not actions:
        errors.append(FieldError("Required", "spec.validationActions"))
    for i, a in enumerate(actions):
        if a not in ("Deny", "Warn", "Audit"):
            errors.append(FieldError("NotSupported", f"spec.validationActions[{i}]",
                                     'supported values: "Audit", "Deny", "Warn"', a))
    return errors


DEFAULT_RBAC = [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "cluster-admin"},
     "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, {"nonResourceURLs": ["*"], "verbs": ["*"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "cluster-admin"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:masters"}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:discovery"},
     "rules": [{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi",
                                    "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "system:discovery"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:discovery"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:basic-user"},
     "rules": [{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews",
                                                                     "selfsubjectrulesreviews"], "verbs": ["create"]},
               {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "system:basic-user"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:basic-user"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "system:public-info-viewer"},
     "rules": [{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "system:public-info-viewer"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:public-info-viewer"},
     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"},
                  {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}]},
]


# ---------------------------------------------------------------------------------------------------------
# The server

@dataclass
class WatchEvent:
    rv: int
    store: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict  # stored form; never mutated once recorded
    old: dict | None


@dataclass
class Request:
    """One request, as the log keeps it (server.requests)."""
    time: float
    method: str
    path: str
    query: dict
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection (or the HTTP method)
    resource: str  # e.g. machineoperations, machineoperations/status, events ("" for non-resource paths)
    name: str
    namespace: str
    code: int
    user: str
    user_agent: str

    def __str__(self):
        return f"{self.verb} {self.resource or self.path} {self.name} -> {self.code}".replace("  ", " ")


@dataclass
class User:
    name: str
    groups: list

    def __post_init__(self):
        self.groups = list(self.groups) + [g for g in ("system:authenticated",)
                                           if self.name != "system:anonymous" and g not in self.groups]


ANONYMOUS = User("system:anonymous", ["system:unauthenticated"])
UNSECURED = User("system:unsecured", ["system:masters"])
SHORT_CODES = {200: "OK", 201: "Created", 202: "Accepted"}


def version_priority(version: str):
    """Kubernetes version ordering: GA > beta > alpha > others, higher numbers first."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (0, 0, 0, version)
    rank = {None: 3, "beta": 2, "alpha": 1}[m.group(2)]
    return (rank, int(m.group(1)), int(m.group(3) or 0), "")


class TestApiServer:
    """The state and behaviour of the API server; HTTP is a thin front end over handle()."""

    __test__ = False  # not a pytest test class

    def __init__(self, crds=DEFAULT_CRDS, machines: bool = True, preload=(), version: str = DEFAULT_VERSION,
                 history_limit: int = 1000, bookmark_interval: float = 60.0, min_request_timeout: float = 1800.0):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.version = version
        major, minor = (int(x) for x in version.split(".")[:2])
        # selectableFields: beta (on by default) in 1.31, GA in 1.32; a 1.30 server ignores them.
        self.selectable_fields_supported = (major, minor) >= (1, 31)
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.min_request_timeout = min_request_timeout
        self.rv = 0
        self.floor = 0  # watching from a resourceVersion below this one gives 410 Gone
        self.objects: dict[str, dict[tuple[str, str], dict]] = {}
        self.history: list[WatchEvent] = []
        self.tokens: dict[str, User] = {}
        self.requests: list[Request] = []
        self.paused: str | None = None  # None, "refuse" or "503"
        self.cut_off: Callable[[Any], bool] | None = None  # partition(): whose connections are dropped
        self.revoked_serials: set[str] = set()  # client certificates no longer taken
        self.netns: str | None = None  # the network namespace the listener is made in (None: this one)
        self._ctx = threading.local()  # the request being handled: its user (for admission)
        self.epoch = 0  # bumped by pause(): streams of an earlier epoch end
        self.stopping = False
        self.builtins = builtin_types()
        self.types: dict[tuple[str, str, str], RType] = {}
        self._refresh_types()
        with self.lock:
            for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
                namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                             "status": {"phase": "Active"}}
                self._create(self._internal_rt("namespaces"), None, namespace, {})
            for obj in DEFAULT_RBAC:
                self._create(self._internal_rt(obj["kind"].lower() + "s"), None, copy.deepcopy(obj), {})
            for crd in [*load_yaml_documents(*crds), *([TEST_MACHINE_CRD] if machines else [])]:
                self._create(self._internal_rt("customresourcedefinitions"), None, copy.deepcopy(crd), {})
            for obj in load_yaml_documents(*preload):
                api_version = obj.get("apiVersion", "")
                group, version = api_version.rpartition("/")[::2]
                rt = next((t for (g, v, _), t in self.types.items()
                           if (g, v, t.kind) == (group, version, obj.get("kind"))), None)
                if rt is None:
                    raise ValueError(f"cannot preload a {obj.get('kind')} of {api_version}: not served")
                self._create(rt, (obj.get("metadata") or {}).get("namespace", "default"), obj, {})
            self.floor = self.rv
            self.history.clear()
        self.http = None
        self.tls = None
        self.host = "127.0.0.1"
        self.port = 0
        self._connections: set = set()

    # ----- types

    def _internal_rt(self, plural: str) -> RType:
        return next(rt for rt in self.builtins if rt.plural == plural and rt.group != "events.k8s.io")

    def _refresh_types(self) -> None:
        types = {(rt.group, rt.version, rt.plural): rt for rt in self.builtins}
        for crd in self.objects.get("customresourcedefinitions", {}).values():
            for rt in crd_types(crd, self.selectable_fields_supported):
                types[(rt.group, rt.version, rt.plural)] = rt
        self.types = types

    def _storage_version(self, store: str) -> str | None:
        for crd in self.objects.get("customresourcedefinitions", {}).values():
            if f"{crd['spec']['group']}/{crd['spec']['names']['plural']}" == store:
                return next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
        return None

    # ----- conversion between what is stored and what a client sees

    def _out(self, rt: RType, stored: dict) -> dict:
        obj = copy.deepcopy(stored)
        if rt.custom and rt.schema:
            body = apply_defaults(rt.schema, {k: v for k, v in obj.items() if k != "metadata"})
            obj = {**{k: obj["metadata"] if k == "metadata" else body[k] for k in obj}, **body}
        if rt.from_storage:
            obj = rt.from_storage(obj)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        return obj

    def _in(self, rt: RType, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        if rt.to_storage:
            obj = rt.to_storage(obj)
            obj["apiVersion"] = "v1"
        elif rt.custom:
            obj["apiVersion"] = f"{rt.group}/{self._storage_version(rt.store) or rt.version}"
        if rt.normalize:
            rt.normalize(obj)
        return obj

    # ----- history and watch bookkeeping

    def _record(self, kind: str, store: str, obj: dict, old: dict | None) -> None:
        self.history.append(WatchEvent(self.rv, store, kind, obj, old))
        if len(self.history) > self.history_limit:
            drop = len(self.history) - self.history_limit
            self.floor = self.history[drop - 1].rv
            del self.history[:drop]
        self.changed.notify_all()

    def compact(self) -> int:
        """Forget the watch history, as etcd compaction and the watch cache window do: watching from any
        resourceVersion older than the current one now gives 410 Gone. Returns the current resourceVersion."""
        with self.lock:
            self.floor = self.rv
            self.history.clear()
            return self.rv

    def _events_after(self, pos: int) -> list[WatchEvent]:
        i = bisect.bisect_right(self.history, pos, key=lambda e: e.rv)  # history is in rv order
        return self.history[i:]

    # ----- admission: pruning, defaulting, validation

    def _admit(self, rt: RType, obj: dict, old: dict | None, params: dict, name: str) -> list[str]:
        """Prune (in place), default and validate an object as the client's API version shows it, after any merge
        with the stored one. Returns warnings about unknown fields; raises 400 (Strict) or 422 (Invalid)."""
        mode = params.get("fieldValidation", "Warn") or "Warn"
        if mode not in ("Ignore", "Warn", "Strict"):
            raise bad_request(f"fieldValidation must be one of Ignore, Warn, Strict, got: {mode}")
        unknown: list[str] = []
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise bad_request("json: cannot unmarshal into Go struct field of type v1.ObjectMeta")
        meta = dict(meta or {})
        for key in list(meta):
            if key not in OBJECT_META_FIELDS:
                unknown.append(f"metadata.{key}")
                del meta[key]
            elif meta[key] is None:
                del meta[key]
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        schema = dict(rt.schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
        schema["properties"] = {k: v for k, v in (schema.get("properties") or {}).items()
                                if k not in ("apiVersion", "kind", "metadata")}
        body = prune(schema, body, "", unknown)
        if unknown and mode == "Strict":
            raise bad_request("strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown))
        obj.clear()
        obj.update({"apiVersion": rt.api_version, "kind": rt.kind, "metadata": meta, **body})
        errors = validate_object_meta(meta, rt.namespaced, rt.name_errors)
        if old is not None and old["metadata"].get("deletionTimestamp"):
            new_finalizers = [f for f in meta.get("finalizers") or [] if f not in old["metadata"].get("finalizers", [])]
            if new_finalizers:
                errors.append(FieldError("Forbidden", "metadata.finalizers",
                                         f"no new finalizers can be added if the object is being deleted, found new "
                                         f"finalizers []string{{{', '.join(json.dumps(f) for f in new_finalizers)}}}"))
        validate(schema, body, "", errors)
        if rt.custom and not errors:  # CEL rules run on a valid object only, as in the real server
            old_body = {k: v for k, v in (old or {}).items() if k not in ("apiVersion", "kind", "metadata")}
            for f in kube_admission.crd_rule_failures(schema, body, old_body if old is not None else None):
                errors.append(FieldError(f.type, f.path, f.detail, f.value if f.type != "Forbidden" else None))
        if rt.check:
            stored_new = rt.to_storage(obj) if rt.to_storage else obj
            errors += rt.check(stored_new, old)
        if rt.plural == "customresourcedefinitions":
            errors += self._check_crd(obj)
        if errors:
            raise invalid(rt, name, errors)
        return [f'unknown field "{u}"' for u in unknown] if mode == "Warn" else []

    def _check_crd(self, crd: dict) -> list[FieldError]:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        errors = []
        for key in ("group", "scope"):
            if not spec.get(key):
                errors.append(FieldError("Required", f"spec.{key}"))
        for key in ("plural", "kind"):
            if not names.get(key):
                errors.append(FieldError("Required", f"spec.names.{key}"))
        if spec.get("scope") not in (None, "Cluster", "Namespaced"):
            errors.append(FieldError("NotSupported", "spec.scope", 'supported values: "Cluster", "Namespaced"',
                                     spec.get("scope")))
        if names.get("plural") and spec.get("group") and \
                crd["metadata"].get("name") != f"{names['plural']}.{spec['group']}":
            errors.append(FieldError("Invalid", "metadata.name", 'must be spec.names.plural+"."+spec.group',
                                     crd["metadata"].get("name")))
        versions = spec.get("versions") or []
        if not versions:
            errors.append(FieldError("Invalid", "spec.versions", "must have exactly one version marked as storage "
                                     "version", []))
        elif sum(1 for v in versions if v.get("storage")) != 1:
            errors.append(FieldError("Invalid", "spec.versions", "must have exactly one version marked as storage "
                                     "version", [v.get("name") for v in versions]))
        for i, v in enumerate(versions):
            for j, col in enumerate(v.get("additionalPrinterColumns") or []):
                try:
                    jsonpath({}, col.get("jsonPath", ""))
                except ValueError as e:
                    errors.append(FieldError("Invalid", f"spec.versions[{i}].additionalPrinterColumns[{j}].jsonPath",
                                             str(e), col.get("jsonPath")))
        return errors

    def _crd_defaults(self, crd: dict, old: dict | None) -> None:
        spec = crd["spec"]
        names = spec.setdefault("names", {})
        names.setdefault("singular", names.get("kind", "").lower())
        names.setdefault("listKind", names.get("kind", "") + "List")
        spec.setdefault("conversion", {"strategy": "None"})
        stored = sorted({*((old or {}).get("status", {}).get("storedVersions", [])),
                         *(v["name"] for v in spec.get("versions", []) if v.get("storage"))})
        when = rfc3339()
        old_conditions = (old or {}).get("status", {}).get("conditions")
        crd["status"] = {
            "acceptedNames": {k: names[k] for k in ("kind", "listKind", "plural", "singular", "shortNames",
                                                     "categories") if k in names},
            "conditions": [{"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": when}
                           for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                           ("Established", "InitialNamesAccepted", "the initial names have been "
                                                                                   "accepted"))],
            "storedVersions": stored}
        if old_conditions:
            crd["status"]["conditions"] = old_conditions

    # ----- the operations (all under the lock)

    def _store(self, rt: RType) -> dict:
        return self.objects.setdefault(rt.store, {})

    def _key(self, rt: RType, ns: str | None, name: str) -> tuple[str, str]:
        return (ns or "" if rt.namespaced else "", name)

    def _get(self, rt: RType, ns: str | None, name: str) -> dict:
        stored = self._store(rt).get(self._key(rt, ns, name))
        if stored is None:
            raise not_found(rt, name)
        return stored

    def _check_type_meta(self, rt: RType, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise bad_request("the body of the request was not a JSON object")
        if not rt.custom:  # built-in types take the kind and version from the endpoint when they are missing
            obj["apiVersion"] = obj.get("apiVersion") or rt.api_version
            obj["kind"] = obj.get("kind") or rt.kind
        if not obj.get("kind"):
            raise bad_request(f"Object 'Kind' is missing in '{json.dumps(obj, separators=(',', ':'))}'")
        if obj.get("apiVersion") != rt.api_version:
            raise bad_request(f"the API version in the data ({obj.get('apiVersion', '')}) does not match the "
                              f"expected API version ({rt.api_version})")
        if obj.get("kind") != rt.kind:
            raise bad_request(f"the kind in the data ({obj['kind']}) does not match the expected kind ({rt.kind})")

    def _create(self, rt: RType, ns: str | None, body: Any, params: dict) -> tuple[dict, list[str]]:
        self._check_type_meta(rt, body)
        obj = copy.deepcopy(body)
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            if rt.namespaced:
                if meta.get("namespace") and meta["namespace"] != ns:
                    raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                      "the request")
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
        name = (meta or {}).get("name", "") if isinstance(meta, dict) else ""
        if rt.namespaced and ns not in {k[1] for k in self._store(self._internal_rt("namespaces"))}:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                           {"name": ns, "kind": "namespaces"})
        if rt.custom and rt.status:
            obj.pop("status", None)  # create cannot set the status of a resource with a status subresource
        warnings = self._admit(rt, obj, None, params, name)
        warnings += self._policies(rt, "CREATE", obj, None, obj["metadata"].get("name", ""), ns, "", params)
        meta = obj["metadata"]
        if self._key(rt, ns, meta["name"]) in self._store(rt):
            raise already_exists(rt, meta["name"])
        for key in ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "selfLink", "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = rfc3339()
        if rt.generation:
            meta["generation"] = 1
        if rt.plural == "customresourcedefinitions":
            self._crd_defaults(obj, None)
        stored = self._in(rt, obj)
        if params.get("dryRun"):
            return self._out(rt, stored), warnings
        self.rv += 1
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self._store(rt)[self._key(rt, ns, meta["name"])] = stored
        self._record("ADDED", rt.store, stored, None)
        if rt.plural == "customresourcedefinitions":
            self._refresh_types()
        return self._out(rt, stored), warnings

    def _update(self, rt: RType, ns: str | None, name: str, body: Any, params: dict, subresource: str,
                conditional_only_if_set: bool = False) -> tuple[int, dict, list[str]]:
        """PUT (and the second half of PATCH). Returns (code, object, warnings)."""
        self._check_type_meta(rt, body)
        new = copy.deepcopy(body)
        meta = new.get("metadata") if isinstance(new.get("metadata"), dict) else {}
        if meta.get("name") and meta["name"] != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        if rt.namespaced and meta.get("namespace") and meta["namespace"] != ns:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        stored_old = self._store(rt).get(self._key(rt, ns, name))
        if stored_old is None:
            if rt.custom or subresource:
                raise not_found(rt, name)
            meta.pop("resourceVersion", None)
            new["metadata"] = {**meta, "name": name}
            obj, warnings = self._create(rt, ns, new, params)
            return 201, obj, warnings
        old = self._out(rt, stored_old)
        sent_rv = meta.get("resourceVersion") or ""
        if not sent_rv and rt.custom and not conditional_only_if_set:
            raise invalid(rt, name, [FieldError("Invalid", "metadata.resourceVersion", "must be specified for an "
                                                "update", GoLiteral("0x0"))])
        if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name, STALE)
        if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
            raise conflict(rt, name, f"Precondition failed: UID in precondition: {meta['uid']}, UID in object "
                                     f"meta: {old['metadata']['uid']}")
        if subresource == "status":
            merged = copy.deepcopy(old)  # only the status of what was sent counts
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
        else:
            merged = new
            merged["metadata"] = dict(meta)
            if rt.status:  # the main resource cannot change the status
                if "status" in old:
                    merged["status"] = copy.deepcopy(old["status"])
                else:
                    merged.pop("status", None)
        # What the server owns in metadata stays as it was.
        for key in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds",
                    "resourceVersion", "name", "namespace"):
            if key in old["metadata"]:
                merged["metadata"][key] = old["metadata"][key]
            else:
                merged["metadata"].pop(key, None)
        merged["metadata"].pop("selfLink", None)
        merged["metadata"].pop("managedFields", None)
        warnings = self._admit(rt, merged, stored_old, params, name)
        warnings += self._policies(rt, "UPDATE", merged, old, name, ns, subresource, params)
        if rt.plural == "customresourcedefinitions":
            self._crd_defaults(merged, stored_old)
        if rt.generation and self._spec_of(rt, merged) != self._spec_of(rt, old):
            merged["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        stored = self._in(rt, merged)
        if stored == stored_old:  # a no-op: no new resourceVersion, no event
            return 200, old, warnings
        if params.get("dryRun"):
            return 200, self._out(rt, stored), warnings
        if stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get("finalizers"):
            self._remove(rt, ns, name, stored)
            return 200, self._out(rt, stored), warnings
        self.rv += 1
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self._store(rt)[self._key(rt, ns, name)] = stored
        self._record("MODIFIED", rt.store, stored, stored_old)
        if rt.plural == "customresourcedefinitions":
            self._refresh_types()
        return 200, self._out(rt, stored), warnings

    @staticmethod
    def _spec_of(rt: RType, obj: dict) -> dict:
        return {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")
                and not (rt.status and k == "status")}

    def _patch(self, rt: RType, ns: str | None, name: str, raw: bytes, content_type: str, params: dict,
               subresource: str) -> tuple[int, dict, list[str]]:
        if content_type not in rt.patch_types:
            raise unsupported_media_type(content_type, rt.patch_types)
        current = self._out(rt, self._get(rt, ns, name))
        try:
            patch = json.loads(raw or b"null")
        except ValueError as e:
            raise bad_request(f"error decoding patch: {e}") from None
        if content_type == JSON_PATCH:
            patched = json_patch(current, patch)
        else:
            if not isinstance(patch, dict):
                raise bad_request("json: cannot unmarshal into Go value of type map[string]interface {}")
            patched = merge_patch(current, patch)
        if not isinstance(patched, dict):
            raise bad_request("the patched object is not a JSON object")
        # A patch is conditional only on the resourceVersion it sets itself.
        return self._update(rt, ns, name, patched, params, subresource, conditional_only_if_set=True)

    def _remove(self, rt: RType, ns: str | None, name: str, last: dict, orphan: bool = False) -> None:
        stored_old = self._store(rt).pop(self._key(rt, ns, name))
        self.rv += 1
        gone = copy.deepcopy(last)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record("DELETED", rt.store, gone, stored_old)
        self._collect_garbage(last["metadata"].get("uid", ""), orphan)
        if rt.plural == "customresourcedefinitions":
            store = f"{last['spec']['group']}/{last['spec']['names']['plural']}"
            for key, obj in list(self.objects.get(store, {}).items()):
                self.objects[store].pop(key)
                self.rv += 1
                gone = copy.deepcopy(obj)
                gone["metadata"]["resourceVersion"] = str(self.rv)
                self._record("DELETED", store, gone, obj)
            self._refresh_types()

    def _rt_of_store(self, store: str) -> RType | None:
        return next((rt for rt in self.types.values() if rt.store == store), None)

    def _collect_garbage(self, owner_uid: str, orphan: bool) -> None:
        """The garbage collector of kube-controller-manager, at once: the dependents of a removed owner (their
        ownerReferences name its uid) are deleted (background propagation) when no other owner of theirs exists,
        or, with propagationPolicy Orphan, lose their reference to it. It acts as itself, not as the user whose
        request removed the owner: admission policies do not see it."""
        if not owner_uid:
            return
        live: set[str] | None = None
        saved, self._ctx.user = getattr(self._ctx, "user", None), None
        try:
            for store, objs in list(self.objects.items()):
                for key, obj in list(objs.items()):
                    refs = obj["metadata"].get("ownerReferences") or []
                    rt = self._rt_of_store(store) if any(r.get("uid") == owner_uid for r in refs) else None
                    if rt is None or key not in objs:
                        continue
                    if orphan:
                        kept = copy.deepcopy(obj)
                        others = [r for r in refs if r.get("uid") != owner_uid]
                        if others:
                            kept["metadata"]["ownerReferences"] = others
                        else:
                            kept["metadata"].pop("ownerReferences", None)
                        self.rv += 1
                        kept["metadata"]["resourceVersion"] = str(self.rv)
                        objs[key] = kept
                        self._record("MODIFIED", store, kept, obj)
                        continue
                    if live is None:
                        live = {o["metadata"].get("uid") for s in self.objects.values() for o in s.values()}
                    if any(r.get("uid") in live for r in refs if r.get("uid") != owner_uid):
                        continue
                    self._delete(rt, key[0] or None, key[1], {}, {})
        finally:
            self._ctx.user = saved

    def _delete(self, rt: RType, ns: str | None, name: str, options: dict, params: dict) -> tuple[int, dict]:
        stored = self._get(rt, ns, name)
        policy = (options or {}).get("propagationPolicy") or params.get("propagationPolicy") or "Background"
        if policy not in ("Background", "Orphan", "Foreground"):
            raise invalid(rt, name, [FieldError("NotSupported", "propagationPolicy", 'supported values: '
                                                '"Background", "Foreground", "Orphan"', policy)])
        if policy == "Foreground":
            raise bad_request("propagationPolicy Foreground is not supported by this test server")
        pre = (options or {}).get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != stored["metadata"]["uid"]:
            raise conflict(rt, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                                     f"meta: {stored['metadata']['uid']}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != stored["metadata"]["resourceVersion"]:
            raise conflict(rt, name, f"Precondition failed: ResourceVersion in precondition: "
                                     f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                     f"{stored['metadata']['resourceVersion']}")
        dry = bool(params.get("dryRun") or (options or {}).get("dryRun"))
        self._policies(rt, "DELETE", None, self._out(rt, stored), name, ns, "", params)
        if stored["metadata"].get("finalizers"):
            if stored["metadata"].get("deletionTimestamp") or dry:
                return 200, self._out(rt, stored)
            marked = copy.deepcopy(stored)
            marked["metadata"]["deletionTimestamp"] = rfc3339()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            if rt.generation:
                marked["metadata"]["generation"] = marked["metadata"].get("generation", 1) + 1
            self.rv += 1
            marked["metadata"]["resourceVersion"] = str(self.rv)
            self._store(rt)[self._key(rt, ns, name)] = marked
            self._record("MODIFIED", rt.store, marked, stored)
            return 200, self._out(rt, marked)
        if not dry:
            self._remove(rt, ns, name, stored, orphan=policy == "Orphan")
        if rt.plural == "namespaces":
            return 200, self._out(rt, stored)
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {**_gr_details(rt, name), "uid": stored["metadata"]["uid"]}}

    def _policies(self, rt: RType, operation: str, obj: dict | None, old: dict | None, name: str, ns: str | None,
                  subresource: str, params: dict) -> list[str]:
        """ValidatingAdmissionPolicy admission (kube_admission.py) of a client's request: a denial is raised as
        the real server words it; returns the warnings of Warn bindings. Not for the server's own setup."""
        user = getattr(self._ctx, "user", None)
        if user is None:
            return []
        policies = list(self.objects.get("validatingadmissionpolicies", {}).values())
        bindings = list(self.objects.get("validatingadmissionpolicybindings", {}).values())
        if not policies or not bindings:
            return []
        attrs = kube_admission.Attributes(
            operation, rt.group, rt.version, rt.plural, subresource, rt.kind, name, ns or "",
            copy.deepcopy(obj) if obj is not None else None, copy.deepcopy(old) if old is not None else None,
            user.name, user.groups, bool(params.get("dryRun")))

        def labels_match(selector: dict, labels: dict) -> bool:
            reqs = [(k, "=", [v]) for k, v in (selector.get("matchLabels") or {}).items()]
            ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
            reqs += [(e["key"], ops[e["operator"]], e.get("values") or []) for e in selector.get("matchExpressions") or []]
            return labels_match_(reqs, labels)

        try:
            return kube_admission.admit(policies, bindings, attrs, labels_match)
        except kube_admission.Denial as d:
            message = f"ValidatingAdmissionPolicy '{d.policy}' with binding '{d.binding}' denied request: {d.message}"
            code = {"Forbidden": 403, "Unauthorized": 401, "RequestEntityTooLarge": 413}.get(d.reason, 422)
            raise ApiError(code, d.reason, f'{rt.gr} "{name}" is forbidden: {message}',
                           {"name": name, "group": rt.group, "kind": rt.plural, "causes": [{"message": message}]}) \
                from None

    # ----- selection

    def _selector(self, rt: RType, params: dict) -> Callable[[dict], bool]:
        """The namespace/field/label filter of a list or watch, on stored objects."""
        fields = parse_field_selector(params.get("fieldSelector", ""))
        labels = parse_label_selector(params.get("labelSelector", ""))
        known = set(rt.selectable({"metadata": {}}).keys())
        terms = []
        for key, op, value in fields:
            stored_key = rt.field_aliases.get(key, key)
            if stored_key not in known:
                raise bad_request(f'field label not supported: {key}')
            terms.append((stored_key, op, value))

        def match(stored: dict) -> bool:
            values = rt.selectable(stored)
            for key, op, value in terms:
                if (values.get(key, "") == value) != (op == "="):
                    return False
            return labels_match(labels, stored["metadata"].get("labels") or {})
        return match

    def _list(self, rt: RType, ns: str | None, params: dict) -> dict:
        match = self._selector(rt, params)
        rv_param, rv_match = params.get("resourceVersion", ""), params.get("resourceVersionMatch", "")
        if rv_match and not rv_param:
            raise invalid(rt, "", [FieldError("Forbidden", "resourceVersionMatch", "resourceVersionMatch is "
                                              "forbidden unless resourceVersion is provided")])
        if rv_param and rv_param != "0":
            if not rv_param.isdigit():
                raise bad_request(f'resourceVersion: Invalid value: "{rv_param}": must be a valid integer')
            if rv_match == "Exact" and int(rv_param) < self.floor:
                raise expired("The resourceVersion for the provided list is too old.")
            if int(rv_param) > self.rv:
                raise ApiError(504, "Timeout", f"Too large resource version: {rv_param}, current: {self.rv}",
                               {"causes": [{"reason": "ResourceVersionTooLarge",
                                            "message": "Too large resource version"}], "retryAfterSeconds": 1})
        start = ""
        if params.get("continue"):
            try:
                token = json.loads(base64.b64decode(params["continue"]))
                token_rv, start = int(token["rv"]), token["start"]
            except (ValueError, KeyError, TypeError):
                raise bad_request("continue key is not valid: incorrect encoded start resourceVersion "
                                  "(version meta.k8s.io/v1)") from None
            if token_rv < self.floor:
                raise expired("The provided continue parameter is too old to display a consistent list result. "
                              "You can start a new list without the continue parameter.")
        items = sorted((key, obj) for key, obj in self._store(rt).items()
                       if (not ns or key[0] == ns) and match(obj))
        items = [(key, obj) for key, obj in items if "/".join(key) > start] if start else items
        limit = int(params.get("limit") or 0)
        meta: dict = {"resourceVersion": str(self.rv)}
        if limit and len(items) > limit:
            last = items[limit - 1][0]
            meta["continue"] = base64.b64encode(json.dumps({"v": "meta.k8s.io/v1", "rv": self.rv,
                                                            "start": "/".join(last)}).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta,
                "items": [self._out(rt, obj) for _, obj in items]}

    # ----- RBAC

    def authorize(self, user: User, verb: str, group: str = "", resource: str = "", subresource: str = "",
                  name: str = "", namespace: str = "", path: str = "") -> tuple[bool, str]:
        """RBAC over the stored ClusterRoles/ClusterRoleBindings and, for a request in a namespace, the
        RoleBindings of that namespace (to a Role there or a ClusterRole). Returns (allowed, reason)."""
        if "system:masters" in user.groups:
            return True, ""
        cluster_roles, roles = self.objects.get("clusterroles", {}), self.objects.get("roles", {})
        bindings = [("ClusterRoleBinding", b) for b in self.objects.get("clusterrolebindings", {}).values()]
        if namespace and not path:
            bindings += [("RoleBinding", b) for (ns, _), b in sorted(self.objects.get("rolebindings", {}).items())
                         if ns == namespace]
        for binding_kind, binding in bindings:
            subject = next((s for s in binding.get("subjects") or [] if
                            (s["kind"] == "User" and s["name"] == user.name) or
                            (s["kind"] == "Group" and s["name"] in user.groups) or
                            (s["kind"] == "ServiceAccount" and
                             user.name == f"system:serviceaccount:{s.get('namespace') or namespace}:{s['name']}")),
                           None)
            ref = binding["roleRef"]
            role = roles.get((namespace, ref["name"])) if ref.get("kind") == "Role" else \
                cluster_roles.get(("", ref["name"]))
            if subject is None or role is None:
                continue
            for rule in role.get("rules") or []:
                verbs = rule.get("verbs") or []
                if verb not in verbs and "*" not in verbs:
                    continue
                if path:
                    urls = rule.get("nonResourceURLs") or []
                    if any(u == path or u == "*" or (u.endswith("*") and path.startswith(u[:-1])) for u in urls):
                        break
                    continue
                groups, resources = rule.get("apiGroups") or [], rule.get("resources") or []
                wanted = f"{resource}/{subresource}" if subresource else resource
                if (group in groups or "*" in groups) and \
                        (wanted in resources or "*" in resources or
                         (subresource and f"*/{subresource}" in resources)) and \
                        (not rule.get("resourceNames") or name in rule["resourceNames"]):
                    break
            else:
                continue
            # as rbac's authorizer words it: a namespaced binding is "name/namespace"
            where = f"/{namespace}" if binding_kind == "RoleBinding" else ""
            who = f"{subject['name']}/{subject.get('namespace') or namespace}" \
                if subject["kind"] == "ServiceAccount" else subject["name"]
            return True, (f'RBAC: allowed by {binding_kind} "{binding["metadata"]["name"]}{where}" of '
                          f'{ref.get("kind", "ClusterRole")} "{role["metadata"]["name"]}" to {subject["kind"]} '
                          f'"{who}"')
        return False, ""

    def _forbidden(self, user: User, verb: str, group: str, resource: str, subresource: str, name: str,
                   namespace: str) -> ApiError:
        gr = f"{resource}.{group}" if group else resource
        what = f'{gr} "{name}"' if name else gr
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        res = f"{resource}/{subresource}" if subresource else resource
        return ApiError(403, "Forbidden", f'{what} is forbidden: User "{user.name}" cannot {verb} resource '
                                          f'"{res}" in API group "{group}" {scope}',
                        {**({"name": name} if name else {}), "group": group, "kind": resource})

    # ----- users

    def add_user(self, name: str, groups=(), token: str | None = None) -> str:
        """Register a bearer token for a user in these groups; returns the token."""
        token = token or f"{name.replace(':', '-')}-{uuid.uuid4().hex[:12]}"
        self.tokens[token] = User(name, list(groups))
        return token

    def revoke_token(self, token: str) -> None:
        """The token is no longer accepted: 401 Unauthorized."""
        self.tokens.pop(token, None)

    def rotate_token(self, token: str) -> str:
        """A new token for the same user and groups; the old one is revoked. Returns the new one."""
        user = self.tokens[token]
        new = self.add_user(user.name, [g for g in user.groups if g != "system:authenticated"])
        self.revoke_token(token)
        return new

    def issue_client_cert(self, directory: str | os.PathLike, user: str, groups=(), name: str | None = None
                          ) -> tuple[str, str, str]:
        """A client certificate of the server's client CA (TLS only): CN=user, one O per group. Returns the paths
        of the certificate and its key, and its serial number (for revoke_client_cert)."""
        if not self._tls_dir:
            raise RuntimeError("client certificates need a TLS server (start_apiserver(tls=True))")
        base = Path(directory) / (name or user.replace(":", "-"))
        serial = uuid.uuid4().hex[:16].upper()
        subj = "".join(f"/O={g}" for g in groups) + f"/CN={user}"
        ca = Path(self._tls_dir)
        subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-subj", subj, "-keyout", f"{base}.key", "-out", f"{base}.csr"],
                       check=True, capture_output=True)
        ext = Path(f"{base}.ext")
        ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=clientAuth\n")
        subprocess.run(["openssl", "x509", "-req", "-in", f"{base}.csr", "-CA", str(ca / "client-ca.crt"),
                        "-CAkey", str(ca / "client-ca.key"), "-set_serial", f"0x{serial}", "-days", "7",
                        "-extfile", str(ext), "-out", f"{base}.crt"], check=True, capture_output=True)
        os.chmod(f"{base}.key", 0o600)
        return f"{base}.crt", f"{base}.key", serial

    def revoke_client_cert(self, serial: str) -> None:
        """The certificate is no longer accepted (kube-apiserver has no revocation list: this stands for
        rotating what it trusts): its requests get 401 Unauthorized."""
        self.revoked_serials.add(serial.upper().lstrip("0"))

    def _peer_user(self, h) -> User | None:
        """The user of a verified client certificate (CN, and O as groups), None without one; 401 when revoked."""
        conn = getattr(h, "connection", None)
        if not isinstance(conn, ssl.SSLSocket):
            return None
        cert = conn.getpeercert()
        if not cert:
            return None
        if cert.get("serialNumber", "").upper().lstrip("0") in self.revoked_serials:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        fields = [pair for rdn in cert.get("subject", ()) for pair in rdn]
        cn = next((v for k, v in fields if k == "commonName"), "")
        if not cn:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return User(cn, [v for k, v in fields if k == "organizationName"])

    def _authenticate(self, h) -> User:
        headers = h.headers
        auth = headers.get("Authorization", "")
        x509 = self._peer_user(h)
        if x509 is not None:  # kube-apiserver tries the client certificate first
            user = x509
        elif not auth:
            # kubectl sends credentials only over TLS. Without TLS this server acts as the old insecure port did:
            # a request without credentials is "system:unsecured", a cluster admin.
            user = ANONYMOUS if self.tls else UNSECURED
        else:
            scheme, _, token = auth.partition(" ")
            user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if user is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
        as_user = headers.get("Impersonate-User")
        if as_user:
            allowed, _ = self.authorize(user, "impersonate", "", "users", name=as_user)
            if not allowed:
                raise ApiError(403, "Forbidden", f'users "{as_user}" is forbidden: User "{user.name}" cannot '
                                                 f'impersonate resource "users" in API group "" at the cluster scope')
            user = User(as_user, headers.get_all("Impersonate-Group") or [])
        return user

    # ----- requests

    def handle(self, h: _Handler) -> None:
        if self.cut_off is not None and self.cut_off(h.headers):
            self._drop(h)
            return
        url = urllib.parse.urlsplit(h.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        entry = Request(time.time(), h.command, url.path, query, h.command.lower(), "", "", "", 0, "",
                        h.headers.get("User-Agent", ""))
        with self.lock:
            self.requests.append(entry)
        try:
            body = h.read_body()
            if self.paused == "503":
                raise ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            user = self._authenticate(h)
            entry.user = user.name
            self._ctx.user = user
            try:
                self._route(h, entry, user, url.path, query, body)
            finally:
                self._ctx.user = None
        except ApiError as e:
            entry.code = e.code
            h.send_json(e.code, e.status())
        except (TimeoutError, BrokenPipeError, ConnectionResetError, ssl.SSLError):
            entry.code = entry.code or 499
            h.close_connection = True
        except Exception as e:  # a bug here: answer like the real server does, and say so on stderr
            import traceback
            traceback.print_exc()
            entry.code = 500
            h.send_json(500, ApiError(500, "InternalError", f"Internal error occurred: {e}").status())

    def _route(self, h, entry: Request, user: User, path: str, query: dict, body: bytes) -> None:
        parts = [p for p in path.split("/") if p]
        method = h.command
        is_resource = (len(parts) >= 3 and parts[0] == "api") or (len(parts) >= 4 and parts[0] == "apis")
        if not is_resource:
            entry.verb = method.lower()
            allowed, _ = self.authorize(user, method.lower(), path=path)
            if not allowed:
                raise ApiError(403, "Forbidden", f'forbidden: User "{user.name}" cannot {method.lower()} path '
                                                 f'"{path}"')
            if method not in ("GET", "HEAD"):
                raise method_not_allowed()
            return self._non_resource(h, entry, parts, query)

        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        ns = ""
        if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            ns, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise resource_not_found()
        plural, name, sub = rest[0], rest[1] if len(rest) > 1 else "", rest[2] if len(rest) > 2 else ""
        with self.lock:
            rt = self.types.get((group, version, plural))
        if rt is None or (ns and not rt.namespaced) or (sub and not (sub == "status" and rt.status)):
            raise resource_not_found()
        watch = query.get("watch", "") in ("true", "1", "True")
        verb = {"GET": ("watch" if watch else "get") if name else ("watch" if watch else "list"),
                "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}.get(method)
        if verb is None or verb not in rt.verbs or (verb == "create" and name) or \
                (verb in ("update", "patch") and not name) or (sub and verb not in ("get", "update", "patch")) or \
                (rt.namespaced and not ns and verb not in ("list", "watch")):
            raise method_not_allowed()
        entry.verb, entry.resource, entry.name, entry.namespace = verb, f"{plural}/{sub}" if sub else plural, name, ns
        authz_name = name
        if not name and verb in ("list", "watch"):
            authz_name = next((v for k, op, v in parse_field_selector(query.get("fieldSelector", ""))
                               if k == "metadata.name" and op == "="), "")
        allowed, _ = self.authorize(user, verb, group, plural, sub, authz_name, ns)
        if not allowed:
            raise self._forbidden(user, verb, group, plural, sub, name, ns)
        form = self._negotiate(h.headers.get("Accept", ""))

        if verb == "watch":
            return self._watch(h, entry, rt, ns, query, form)
        warnings: list[str] = []
        with self.lock:
            if verb == "get":
                stored = self._get(rt, ns, name)
                code, out = 200, self._render(rt, [stored], stored["metadata"]["resourceVersion"], query, form,
                                              single=True)
            elif verb == "list":
                listed = self._list(rt, ns, query)
                stored = [self._in(rt, o) if rt.to_storage else o for o in listed["items"]]
                code, out = 200, self._render(rt, stored, listed["metadata"]["resourceVersion"], query, form,
                                              listed=listed)
            elif verb == "create":
                if rt.plural == "selfsubjectreviews":  # kubectl auth whoami; the body says nothing
                    code, out = 201, {"kind": rt.kind, "apiVersion": rt.api_version,
                                      "metadata": {"creationTimestamp": None},
                                      "status": {"userInfo": {"username": user.name, "groups": user.groups}}}
                elif rt.plural == "selfsubjectaccessreviews":
                    code, out = 201, self._access_review(user, self._decode(h, body, rt))
                else:
                    obj = self._decode(h, body)
                    out, warnings = self._create(rt, ns, obj, query)
                    code = 201
            elif verb == "update":
                code, out, warnings = self._update(rt, ns, name, self._decode(h, body), query, sub)
            elif verb == "patch":
                content_type = (h.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                code, out, warnings = self._patch(rt, ns, name, body, content_type, query, sub)
            elif verb == "delete":
                options = self._decode(h, body) if body.strip() else {}
                code, out = self._delete(rt, ns, name, options, query)
            else:  # deletecollection
                listed = self._list(rt, ns, {k: v for k, v in query.items() if k in ("fieldSelector",
                                                                                      "labelSelector")})
                for item in listed["items"]:
                    self._delete(rt, item["metadata"].get("namespace"), item["metadata"]["name"], {}, query)
                code, out = 200, listed
        entry.code = code
        headers = [("Warning", f'299 - {json.dumps(w)}') for w in warnings]
        h.send_json(code, out, self._content_type(form), headers)

    def _decode(self, h, body: bytes, rt: RType | None = None) -> Any:
        content_type = (h.headers.get("Content-Type") or JSON).split(";")[0].strip().lower()
        if content_type == PROTOBUF and rt is not None and rt.plural == "selfsubjectaccessreviews":
            return decode_access_review(body)  # kubectl auth can-i sends protobuf
        try:
            if content_type in (JSON, "*/*", ""):
                return json.loads(body or b"null")
            if content_type in ("application/yaml", "application/x-yaml"):
                return yaml.safe_load(body)
        except (ValueError, yaml.YAMLError) as e:
            raise bad_request(f"the body of the request could not be decoded: {e}") from None
        raise unsupported_media_type(content_type, [JSON, "application/yaml"])

    def _access_review(self, user: User, review: dict) -> dict:
        spec = (review or {}).get("spec") or {}
        if ra := spec.get("resourceAttributes"):
            allowed, reason = self.authorize(user, ra.get("verb", ""), ra.get("group", ""), ra.get("resource", ""),
                                             ra.get("subresource", ""), ra.get("name", ""), ra.get("namespace", ""))
        elif nra := spec.get("nonResourceAttributes"):
            allowed, reason = self.authorize(user, nra.get("verb", ""), path=nra.get("path", ""))
        else:
            raise invalid(self._internal_rt("selfsubjectaccessreviews"), "", [FieldError(
                "Invalid", "spec.resourceAttributes", "exactly one of nonResourceAttributes or resourceAttributes "
                "must be specified", "null")])
        status = {"allowed": allowed, **({"reason": reason} if reason else {})}
        return {**review, "metadata": {"creationTimestamp": None}, "status": status}

    # ----- output forms: plain JSON, Table, PartialObjectMetadata

    @staticmethod
    def _negotiate(accept: str) -> tuple[str, str]:
        """The response form the Accept header asks for: (json|table|partial|discovery, version)."""
        if not accept.strip():
            return ("json", "")
        for item in accept.split(","):
            kind, *raw = [p.strip() for p in item.split(";")]
            params = dict(p.split("=", 1) for p in raw if "=" in p)
            params.pop("q", None)
            if kind not in (JSON, "*/*", "application/*"):
                continue
            g, v, a = params.get("g"), params.get("v"), params.get("as")
            if not a:
                return ("json", "")
            if g == "meta.k8s.io" and v in ("v1", "v1beta1") and a == "Table":
                return ("table", v)
            if g == "meta.k8s.io" and v in ("v1", "v1beta1") and a in ("PartialObjectMetadata",
                                                                      "PartialObjectMetadataList"):
                return ("partial", v)
            if g == "apidiscovery.k8s.io" and v in ("v2", "v2beta1") and a == "APIGroupDiscoveryList":
                return ("discovery", v)
        raise ApiError(406, "NotAcceptable", "only the following media types are accepted: application/json, "
                                             "application/yaml")

    @staticmethod
    def _content_type(form: tuple[str, str]) -> str:
        kind, version = form
        return {"table": f"{JSON};as=Table;v={version};g=meta.k8s.io",
                "partial": f"{JSON};as=PartialObjectMetadata;v={version};g=meta.k8s.io"}.get(kind, JSON)

    def _render(self, rt: RType, stored: list[dict], rv: str, query: dict, form: tuple[str, str],
                single: bool = False, listed: dict | None = None) -> dict:
        kind, version = form
        if kind == "table":
            return self._table(rt, stored, rv, query, version, (listed or {}).get("metadata", {}).get("continue"))
        if kind == "partial":
            items = [{"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
                      "metadata": copy.deepcopy(s["metadata"])} for s in stored]
            if single:
                return items[0]
            return {"kind": "PartialObjectMetadataList", "apiVersion": f"meta.k8s.io/{version}",
                    "metadata": listed["metadata"], "items": items}
        return self._out(rt, stored[0]) if single else listed

    def _table(self, rt: RType, stored: list[dict], rv: str, query: dict, version: str = "v1",
               continue_token: str | None = None) -> dict:
        columns = rt.columns or [name_column(), Column("Created At", "date",
                                                       lambda o: o["metadata"].get("creationTimestamp"))]
        include = query.get("includeObject", "Metadata")
        rows = []
        for obj in stored:
            cells = []
            for col in columns:
                try:
                    cells.append(col.cell(obj))
                except (KeyError, TypeError, ValueError, AttributeError):
                    cells.append(None)
            row = {"cells": cells}
            if include == "Metadata":
                row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
                                 "metadata": copy.deepcopy(obj["metadata"])}
            elif include == "Object":
                row["object"] = self._out(rt, obj)
            rows.append(row)
        meta = {"resourceVersion": rv, **({"continue": continue_token} if continue_token else {})}
        return {"kind": "Table", "apiVersion": f"meta.k8s.io/{version}", "metadata": meta,
                "columnDefinitions": [c.definition() for c in columns], "rows": rows}

    # ----- watch

    def _watch(self, h, entry: Request, rt: RType, ns: str, query: dict, form: tuple[str, str]) -> None:
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else \
            self.min_request_timeout * (1 + random.random())
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1", "True")
        send_initial = query.get("sendInitialEvents") in ("true", "1", "True")
        rv_param = query.get("resourceVersion", "")
        error = None
        with self.lock:
            match = self._selector(rt, query)
            scoped = (lambda o: match(o) and o["metadata"].get("namespace") == ns) if ns else match
            if send_initial and (not bookmarks or query.get("resourceVersionMatch") != "NotOlderThan"):
                raise invalid(rt, "", [FieldError("Forbidden", "sendInitialEvents", "sendInitialEvents requires "
                                                  "allowWatchBookmarks and resourceVersionMatch=NotOlderThan")])
            epoch = self.epoch
            initial = []
            if rv_param in ("", "0") or send_initial:
                # "Get State and Start at Most Recent": the existing objects come first, as ADDED events.
                initial = [obj for _, obj in sorted(self._store(rt).items()) if scoped(obj)]
                pos = self.rv
            elif not rv_param.isdigit():
                raise bad_request(f'resourceVersion: Invalid value: "{rv_param}": must be a valid integer')
            else:
                pos = int(rv_param)
                if pos < self.floor:
                    error = expired(f"too old resource version: {pos} ({self.floor + 1})")
                elif pos > self.rv:
                    error = ApiError(504, "Timeout", f"Too large resource version: {pos}, current: {self.rv}",
                                     {"causes": [{"reason": "ResourceVersionTooLarge",
                                                  "message": "Too large resource version"}], "retryAfterSeconds": 1})
        entry.code = 200
        h.start_stream(self._content_type(form))

        def send(kind: str, obj: dict | None, status: dict | None = None) -> None:
            if status is not None:
                payload = status
            elif form[0] == "table":
                payload = self._table(rt, [obj], obj["metadata"]["resourceVersion"], query, form[1])
            elif form[0] == "partial":
                payload = {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{form[1]}",
                           "metadata": copy.deepcopy(obj["metadata"])}
            else:
                payload = self._out(rt, obj)
            h.write_chunk((json.dumps({"type": kind, "object": payload}, separators=(",", ":")) + "\n").encode())

        def bookmark(rv: int, initial_end: bool = False) -> None:
            meta = {"resourceVersion": str(rv), "creationTimestamp": None}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            if form[0] == "table":
                obj = {"kind": "Table", "apiVersion": f"meta.k8s.io/{form[1]}", "metadata": meta,
                       "columnDefinitions": [], "rows": []}
            else:
                obj = {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}
            h.write_chunk((json.dumps({"type": "BOOKMARK", "object": obj}, separators=(",", ":")) + "\n").encode())

        try:
            for obj in initial:
                send("ADDED", obj)
            if send_initial:
                bookmark(pos, initial_end=True)
            if error:
                send("ERROR", None, error.status())
                h.end_stream()
                return
            last_sent = time.monotonic()
            while True:
                if self.cut_off is not None and self.cut_off(h.headers):
                    self._drop(h)
                    return
                with self.lock:
                    if self.stopping or self.epoch != epoch:
                        h.close_connection = True
                        return
                    if pos < self.floor:  # fell out of the window: the client re-watches and gets 410
                        break
                    events = self._events_after(pos)
                    if not events:
                        wake = min(deadline, last_sent + self.bookmark_interval if bookmarks else deadline)
                        self.changed.wait(max(0.0, min(0.5, wake - time.monotonic())))
                        events = self._events_after(pos)
                    latest = self.rv
                if self.cut_off is not None and self.cut_off(h.headers):  # cut off while it waited
                    self._drop(h)
                    return
                for e in events:
                    pos = e.rv
                    if e.store != rt.store:
                        continue
                    now_in = e.type != "DELETED" and scoped(e.obj)
                    was_in = e.old is not None and scoped(e.old)
                    if e.type == "DELETED":
                        if scoped(e.obj):
                            send("DELETED", e.obj)
                    elif now_in:
                        send("MODIFIED" if was_in else "ADDED", e.obj)
                    elif was_in:  # no longer selected: a DELETED event with the old content at the new version
                        gone = copy.deepcopy(e.old)
                        gone["metadata"]["resourceVersion"] = str(e.rv)
                        send("DELETED", gone)
                    last_sent = time.monotonic()
                if time.monotonic() >= deadline:
                    break
                if bookmarks and time.monotonic() - last_sent >= self.bookmark_interval:
                    pos = max(pos, latest)
                    bookmark(pos)
                    last_sent = time.monotonic()
                if h.client_gone():
                    h.close_connection = True
                    return
            h.end_stream()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            h.close_connection = True

    # ----- discovery, version, OpenAPI

    def _non_resource(self, h, entry: Request, parts: list[str], query: dict) -> None:
        path = "/" + "/".join(parts)
        entry.code = 200
        if path in ("/healthz", "/livez", "/readyz"):
            return h.send_bytes(200, b"ok", "text/plain; charset=utf-8")
        if path == "/version":
            major, minor, *_ = self.version.split(".")
            return h.send_json(200, {"major": major, "minor": minor, "gitVersion": f"v{self.version}",
                                     "gitCommit": "0" * 40, "gitTreeState": "clean",
                                     "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.8",
                                     "compiler": "gc", "platform": "linux/amd64"})
        if parts and parts[0] == "openapi":
            return self._openapi(h, entry, parts, query)
        with self.lock:
            groups = self._groups()
            if parts == ["api"] or parts == ["apis"]:
                form = self._negotiate(h.headers.get("Accept", ""))
                if form[0] == "discovery":
                    items = [self._discovery_group("", ["v1"])] if parts == ["api"] else \
                        [self._discovery_group(g, vs) for g, vs in groups.items()]
                    return h.send_json(200, {"kind": "APIGroupDiscoveryList",
                                             "apiVersion": f"apidiscovery.k8s.io/{form[1]}", "metadata": {},
                                             "items": items},
                                       f"{JSON};g=apidiscovery.k8s.io;v={form[1]};as=APIGroupDiscoveryList")
                if parts == ["api"]:
                    return h.send_json(200, {"kind": "APIVersions", "versions": ["v1"],
                                             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                                             "serverAddress": f"{self.host}:"
                                                                                              f"{self.port}"}]})
                return h.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                         "groups": [self._api_group(g, vs) for g, vs in groups.items()]})
            if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
                return h.send_json(200, {"kind": "APIGroup", "apiVersion": "v1",
                                         **self._api_group(parts[1], groups[parts[1]])})
            gv = ("", parts[1]) if len(parts) == 2 and parts[0] == "api" else \
                (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "apis" else None
            if gv and any((g, v) == gv for g, v, _ in self.types):
                return h.send_json(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                         "groupVersion": f"{gv[0]}/{gv[1]}" if gv[0] else gv[1],
                                         "resources": [r for rt in self._gv_types(*gv)
                                                       for r in self._api_resources(rt)]})
        entry.code = 404
        if parts and parts[0] in ("api", "apis"):
            raise resource_not_found()
        h.send_bytes(404, b"404 page not found\n", "text/plain; charset=utf-8")

    def _groups(self) -> dict[str, list[str]]:
        """Named groups, built-ins first, versions preferred first."""
        order = ["admissionregistration.k8s.io", "apiextensions.k8s.io", "authentication.k8s.io",
                 "authorization.k8s.io", "rbac.authorization.k8s.io",
                 "events.k8s.io"]
        groups: dict[str, set] = {}
        for g, v, _ in self.types:
            if g:
                groups.setdefault(g, set()).add(v)
        names = [g for g in order if g in groups] + sorted(g for g in groups if g not in order)
        return {g: sorted(groups[g], key=version_priority, reverse=True) for g in names}

    def _gv_types(self, group: str, version: str) -> list[RType]:
        return [rt for (g, v, _), rt in sorted(self.types.items()) if (g, v) == (group, version)]

    @staticmethod
    def _api_group(group: str, versions: list[str]) -> dict:
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}

    @staticmethod
    def _api_resources(rt: RType) -> list[dict]:
        main = {"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced, "kind": rt.kind,
                "verbs": rt.verbs}
        if rt.short_names:
            main["shortNames"] = rt.short_names
        if rt.categories:
            main["categories"] = rt.categories
        digest = hashlib.sha256(f"{rt.group}/{rt.version}/{rt.kind}".encode()).digest()[:8]
        main["storageVersionHash"] = base64.b64encode(digest).decode()
        out = [main]
        if rt.status:
            out.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                        "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        return out

    def _discovery_group(self, group: str, versions: list[str]) -> dict:
        out_versions = []
        for v in versions:
            resources = []
            for rt in self._gv_types(group, v):
                kind = {"group": group, "version": v, "kind": rt.kind}
                r = {"resource": rt.plural, "responseKind": kind,
                     "scope": "Namespaced" if rt.namespaced else "Cluster", "singularResource": rt.singular,
                     "verbs": rt.verbs}
                if rt.short_names:
                    r["shortNames"] = rt.short_names
                if rt.categories:
                    r["categories"] = rt.categories
                if rt.status:
                    r["subresources"] = [{"subresource": "status", "responseKind": kind,
                                          "verbs": ["get", "patch", "update"]}]
                resources.append(r)
            out_versions.append({"version": v, "resources": resources, "freshness": "Current"})
        meta = {"creationTimestamp": None, **({"name": group} if group else {})}
        return {"metadata": meta, "versions": out_versions}

    def _openapi(self, h, entry: Request, parts: list[str], query: dict) -> None:
        with self.lock:
            gvs = sorted({(g, v) for g, v, _ in self.types})
            docs = {(f"apis/{g}/{v}" if g else f"api/{v}"): (g, v) for g, v in gvs}
            if parts == ["openapi", "v3"]:
                paths = {}
                for key, gv in docs.items():
                    paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={self._openapi_hash(*gv)}"}
                return h.send_json(200, {"paths": paths})
            key = "/".join(parts[2:])
            if parts[:2] != ["openapi", "v3"] or key not in docs:
                entry.code = 404
                return h.send_bytes(404, b"404 page not found\n", "text/plain; charset=utf-8")
            doc = self._openapi_doc(*docs[key])
            digest = self._openapi_hash(*docs[key])
        if query.get("hash") and query["hash"] != digest:
            entry.code = 301
            return h.send_bytes(301, b"", "text/plain", [("Location", f"/openapi/v3/{key}?hash={digest}")])
        cache = "public, immutable" if query.get("hash") else "no-cache, private"
        h.send_json(200, doc, JSON, [("Cache-Control", cache), ("Etag", f'"{digest}"')])

    def _openapi_hash(self, group: str, version: str) -> str:
        text = json.dumps(self._openapi_doc(group, version), sort_keys=True)
        return hashlib.sha512(text.encode()).hexdigest().upper()

    def _openapi_doc(self, group: str, version: str) -> dict:
        """The group-version OpenAPI v3 document: schemas with x-kubernetes-group-version-kind, and paths whose
        write operations list fieldValidation (which is how kubectl decides to send fieldValidation=Strict)."""
        meta_ref = {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
        schemas = {"io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": OPENAPI_OBJECT_META,
                   "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta": OPENAPI_LIST_META,
                   "io.k8s.apimachinery.pkg.apis.meta.v1.Status": {"type": "object",
                                                                    "x-kubernetes-preserve-unknown-fields": True},
                   "io.k8s.apimachinery.pkg.apis.meta.v1.Patch": {"type": "object"},
                   "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions": {
                       "type": "object", "x-kubernetes-preserve-unknown-fields": True}}
        paths = {}
        for rt in self._gv_types(group, version):
            name = openapi_name(rt)
            gvk = {"group": group, "version": version, "kind": rt.kind}
            schema = copy.deepcopy(rt.schema or {"type": "object"})
            schema.setdefault("properties", {})["metadata"] = {"allOf": [meta_ref], "default": {},
                                                               "description": "Standard object's metadata."}
            schema["x-kubernetes-group-version-kind"] = [gvk]
            schemas[name] = schema
            schemas[name + "List"] = {
                "type": "object", "required": ["items"],
                "properties": {"apiVersion": STR, "kind": STR,
                               "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}},
                               "metadata": {"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis."
                                                               "meta.v1.ListMeta"}], "default": {}}},
                "x-kubernetes-group-version-kind": [{**gvk, "kind": rt.list_kind}]}
            base = f"/apis/{group}/{version}" if group else f"/api/{version}"
            coll = f"{base}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{base}/{rt.plural}"
            ref = {"$ref": f"#/components/schemas/{name}"}
            list_ref = {"$ref": f"#/components/schemas/{name}List"}
            ns_param = [_path_param("namespace")] if rt.namespaced else []
            if rt.verbs == ["create"]:
                paths[coll] = {"post": _op("post", rt, gvk, WRITE_PARAMS, ref, body=ref), "parameters": ns_param}
                continue
            paths[coll] = {"get": _op("list", rt, gvk, LIST_PARAMS, list_ref),
                           "post": _op("post", rt, gvk, WRITE_PARAMS, ref, body=ref),
                           "delete": _op("deletecollection", rt, gvk, LIST_PARAMS + DELETE_PARAMS,
                                         {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Status"}),
                           "parameters": ns_param}
            item_params = ns_param + [_path_param("name")]
            item = {"get": _op("get", rt, gvk, [], ref), "put": _op("put", rt, gvk, WRITE_PARAMS, ref, body=ref),
                    "patch": _op("patch", rt, gvk, WRITE_PARAMS, ref, patch=rt.patch_types),
                    "delete": _op("delete", rt, gvk, DELETE_PARAMS, ref), "parameters": item_params}
            paths[f"{coll}/{{name}}"] = item
            if rt.status:
                paths[f"{coll}/{{name}}/status"] = {
                    "get": _op("get", rt, gvk, [], ref), "put": _op("put", rt, gvk, WRITE_PARAMS, ref, body=ref),
                    "patch": _op("patch", rt, gvk, WRITE_PARAMS, ref, patch=rt.patch_types),
                    "parameters": item_params}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": f"v{self.version}"},
                "paths": paths, "components": {"schemas": schemas}}

    # ----- connections, pause/resume, stop

    def _track(self, conn, add: bool) -> None:
        with self.lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _drop_connections(self) -> None:
        with self.lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _listen(self) -> None:
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer

        def make():
            return cls((self.host, self.port), self, self.tls)

        if self.netns:
            from testnet import in_netns

            self.http = in_netns(self.netns, make)  # the socket belongs to that namespace, served from here
        else:
            self.http = make()
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                         name=f"kube-apiserver:{self.port}").start()

    def _close_listener(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @staticmethod
    def _drop(h) -> None:
        """Close a connection without a word, as a network that stopped carrying it would look at its end."""
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def partition(self, match: Callable[[Any], bool] | None) -> None:
        """Cut off the clients whose request headers match(headers) says (None: heal): their requests and open
        watches are dropped unanswered, while everyone else is served. E.g. the agent (its User-Agent) loses
        the server while kubectl still reaches it."""
        with self.lock:
            self.cut_off = match
            self.changed.notify_all()

    def pause(self, seconds: float | None = None, mode: str = "refuse") -> None:
        """Make the server unavailable: mode "refuse" closes the port (connection refused) and drops every open
        connection, watches included, as a stopped apiserver would; mode "503" answers every request with 503
        ServiceUnavailable and ends open watches. With seconds, resume() follows by itself."""
        if mode not in ("refuse", "503"):
            raise ValueError(f"unknown pause mode {mode!r}")
        with self.lock:
            self.paused = mode
            self.epoch += 1
            self.changed.notify_all()
        if mode == "refuse":
            self._close_listener()
        self._drop_connections()
        if seconds:
            timer = threading.Timer(seconds, self.resume, kwargs={"epoch": self.epoch})
            timer.daemon = True
            timer.start()

    def resume(self, epoch: int | None = None) -> None:
        with self.lock:
            if epoch is not None and epoch != self.epoch:
                return  # the timer of an earlier pause
            mode, self.paused = self.paused, None
        if mode == "refuse" and not self.stopping:
            self._listen()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.changed.notify_all()
        self._close_listener()
        self._drop_connections()
        if self._tls_dir:
            import shutil
            shutil.rmtree(self._tls_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ----- clients

    def kubeconfig(self, path: str | os.PathLike, user: str = "admin", groups=("system:masters",),
                   server_url: str | None = None, credential: dict | None = None) -> str:
        """Write a kubeconfig for a user in these groups (a new bearer token); cluster-admin by default.

        credential: the kubeconfig user entry to write instead (then user and groups only name it), e.g.
        {"client-certificate": crt, "client-key": key} from issue_client_cert, {"tokenFile": path}, or
        {"exec": {...}} for an exec credential plugin."""
        user_entry = credential if credential is not None else {"token": self.add_user(user, groups)}
        cluster = {"server": server_url or self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem.encode()).decode()
        config = {"apiVersion": "v1", "kind": "Config", "preferences": {},
                  "clusters": [{"name": "test", "cluster": cluster}],
                  "users": [{"name": user, "user": user_entry}],
                  "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
                  "current-context": "test"}
        Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
        os.chmod(path, 0o600)
        return str(path)

    def find_requests(self, verb: str | None = None, resource: str | None = None, name: str | None = None,
                      user: str | None = None, user_agent: str | None = None, path: str | None = None) -> list:
        """Logged requests matching all the filters given (user_agent: a substring)."""
        with self.lock:
            return [r for r in self.requests if (verb is None or r.verb == verb)
                    and (resource is None or r.resource == resource) and (name is None or r.name == name)
                    and (user is None or r.user == user) and (path is None or r.path == path)
                    and (user_agent is None or user_agent in r.user_agent)]

    def count(self, **filters) -> int:
        return len(self.find_requests(**filters))

    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    _tls_dir: str | None = None
    ca_pem: str = ""

    def _make_tls(self, names: list[str]) -> ssl.SSLContext:
        self._tls_dir = tempfile.mkdtemp(prefix="kube-apiserver-tls-")
        cert, key = os.path.join(self._tls_dir, "tls.crt"), os.path.join(self._tls_dir, "tls.key")
        sans = ["IP:127.0.0.1", "IP:::1", "DNS:localhost"]
        for n in names:
            sans.append(f"IP:{n}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", n) else f"DNS:{n}")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "7", "-subj", "/CN=kube-apiserver-test", "-addext",
                        "subjectAltName=" + ",".join(dict.fromkeys(sans)), "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        self.ca_pem = Path(cert).read_text()
        # The CA of client certificates (issue_client_cert): asked for, not required, as kube-apiserver's
        # --client-ca-file; a request without one authenticates otherwise.
        client_ca = os.path.join(self._tls_dir, "client-ca")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "7", "-subj", "/CN=kube-apiserver-test client CA",
                        "-addext", "basicConstraints=critical,CA:TRUE",
                        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                        "-keyout", f"{client_ca}.key", "-out", f"{client_ca}.crt"], check=True, capture_output=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(f"{client_ca}.crt")
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


def openapi_name(rt: RType) -> str:
    builtin = {"": "io.k8s.api.core", "events.k8s.io": "io.k8s.api.events", "rbac.authorization.k8s.io":
               "io.k8s.api.rbac", "authorization.k8s.io": "io.k8s.api.authorization",
               "coordination.k8s.io": "io.k8s.api.coordination",
               "authentication.k8s.io": "io.k8s.api.authentication",
               "apiextensions.k8s.io": "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions"}
    prefix = builtin.get(rt.group) or ".".join(reversed(rt.group.split(".")))
    return f"{prefix}.{rt.version}.{rt.kind}"


def _query_param(name: str, type_: str = "string", description: str = "") -> dict:
    return {"name": name, "in": "query", "description": description, "schema": {"type": type_, "uniqueItems": True}}


def _path_param(name: str) -> dict:
    return {"name": name, "in": "path", "description": f"{name} of the object", "required": True,
            "schema": {"type": "string", "uniqueItems": True}}


WRITE_PARAMS = [_query_param("dryRun"), _query_param("fieldManager"),
                _query_param("fieldValidation", description="fieldValidation instructs the server on how to handle "
                             "objects in the request containing unknown or duplicate fields: Ignore, Warn or Strict.")]
LIST_PARAMS = [_query_param("allowWatchBookmarks", "boolean"), _query_param("continue"),
               _query_param("fieldSelector"), _query_param("labelSelector"), _query_param("limit", "integer"),
               _query_param("resourceVersion"), _query_param("resourceVersionMatch"),
               _query_param("sendInitialEvents", "boolean"), _query_param("timeoutSeconds", "integer"),
               _query_param("watch", "boolean")]
DELETE_PARAMS = [_query_param("dryRun"), _query_param("gracePeriodSeconds", "integer"),
                 _query_param("propagationPolicy")]


def _op(action: str, rt: RType, gvk: dict, params: list, response: dict, body: dict | None = None,
        patch: list | None = None) -> dict:
    op = {"description": f"{action} {rt.kind}", "operationId": f"{action}{rt.kind}", "parameters": params,
          "responses": {"200": {"description": "OK", "content": {JSON: {"schema": response}}},
                        "401": {"description": "Unauthorized"}},
          "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk}
    if body is not None:
        op["requestBody"] = {"content": {"*/*": {"schema": body}}, "required": True}
    if patch is not None:
        patch_schema = {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"}
        op["requestBody"] = {"content": {t: {"schema": patch_schema} for t in patch}, "required": True}
    if action == "post":
        op["responses"]["201"] = op["responses"]["200"]
    return op


OPENAPI_OBJECT_META = {"type": "object", "properties": {
    "annotations": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
    "creationTimestamp": {"type": "string", "format": "date-time"},
    "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
    "deletionTimestamp": {"type": "string", "format": "date-time"},
    "finalizers": {"type": "array", "items": {"type": "string", "default": ""}, "x-kubernetes-list-type": "set"},
    "generateName": STR, "generation": {"type": "integer", "format": "int64"},
    "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
    "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    "name": STR, "namespace": STR,
    "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    "resourceVersion": STR, "selfLink": STR, "uid": STR}}
OPENAPI_LIST_META = {"type": "object", "properties": {"continue": STR, "remainingItemCount": INT,
                                                      "resourceVersion": STR, "selfLink": STR}}


# ---------------------------------------------------------------------------------------------------------
# HTTP front end

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams
    server_version = "kube-apiserver-test"
    sys_version = ""
    timeout = 300  # an idle keep-alive connection frees its thread after this long

    def setup(self):
        super().setup()
        self.server.api._track(self.connection, True)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, in the request's thread, not in the accept loop

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.api._track(self.connection, False)

    def do_GET(self):
        self.server.api.handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def log_message(self, *args):
        pass

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_bytes(self, code: int, data: bytes, content_type: str, headers=()) -> None:
        headers = list(headers)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        if not any(key == "Cache-Control" for key, _ in headers):
            self.send_header("Cache-Control", "no-cache, private")
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, code: int, obj: Any, content_type: str = JSON, headers=()) -> None:
        self.send_bytes(code, (json.dumps(obj, separators=(",", ":")) + "\n").encode(), content_type,
                        [("Audit-Id", str(uuid.uuid4())), *headers])

    def start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def client_gone(self) -> bool:
        """Has the client closed the connection of a streaming response? (It sends nothing else on it.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            if isinstance(self.connection, ssl.SSLSocket):
                return True
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, api: TestApiServer, tls: ssl.SSLContext | None):
        self.api, self.tls = api, tls
        super().__init__(address, _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds the body back until
        # the client's delayed ACK (40 ms a request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        pass  # a client that went away (or a failed TLS handshake) is not the server's problem


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


# ---------------------------------------------------------------------------------------------------------
# Entry points

def load_yaml_documents(*paths) -> list[dict]:
    docs = []
    for path in paths:
        docs += [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return docs


def start_apiserver(host: str = "127.0.0.1", port: int = 0, tls: bool = False, crds=DEFAULT_CRDS,
                    machines: bool = True, preload=(), version: str = DEFAULT_VERSION, tls_names=(),
                    netns: str | None = None, **tunables) -> TestApiServer:
    """Start a server in background threads; returns it running (server.url, server.kubeconfig(path), ...).

    crds: CRD YAML files served from the start (the project's own by default); machines: also serve a stand-in
    Machine CRD; preload: YAML files of objects that exist from the start (e.g. packaging/kubernetes/rbac.yaml,
    as `kubectl apply -f` would make them). tls_names: more names or addresses for the certificate. netns: the
    path of a network namespace (/proc/<pid>/ns/net) to listen in, e.g. a test network's (testnet.py); the
    server still runs in this process. version: the Kubernetes version to claim and emulate (before 1.31, selectableFields are
    ignored, as on a real 1.30 server). tunables: history_limit (watch window, in events), bookmark_interval
    (seconds; the real server sends one about every minute), min_request_timeout (watch length without
    timeoutSeconds; the real default is 1800 s)."""
    server = TestApiServer(crds=crds, machines=machines, preload=preload, version=version, **tunables)
    server.host, server.port, server.netns = host, port, netns
    if tls:
        server.tls = server._make_tls([host, *tls_names] if host not in ("0.0.0.0", "::", "") else list(tls_names))
    server._listen()
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="A small, faithful Kubernetes API server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a fresh self-signed certificate")
    parser.add_argument("--kubeconfig", default=None, help="write a cluster-admin kubeconfig here")
    parser.add_argument("--crd", action="append", default=None, help="CRD YAML to serve (repeatable); default: "
                                                                     "the project's")
    parser.add_argument("--no-machines", action="store_true", help="do not serve the stand-in Machine CRD")
    parser.add_argument("--preload", action="append", default=[], help="YAML of objects to create at start "
                                                                       "(repeatable), e.g. the RBAC manifest")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="Kubernetes version to claim")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    server = start_apiserver(args.host, args.port, args.tls, crds=args.crd or DEFAULT_CRDS,
                             machines=not args.no_machines, preload=args.preload, version=args.version,
                             bookmark_interval=args.bookmark_interval)
    kubeconfig = server.kubeconfig(args.kubeconfig or os.path.join(tempfile.mkdtemp(), "kubeconfig"))
    print(f"serving Kubernetes v{server.version} API at {server.url}", flush=True)
    print(f"export KUBECONFIG={kubeconfig}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
