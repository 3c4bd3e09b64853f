"""MachineOperation (DESIGN.md §4): what an operation asks, and the status and Events the agent writes.

Pure functions on plain dicts (the JSON of the API): no client, no I/O, so each rule has a fast test.

Status follows the upstream agent (``pkg/machineops/controller/store.go``): ``phase`` and ``message``,
``startedAt`` once, ``completedAt`` when terminal, and the condition ``Completed`` — ``False`` with reason
``InProgress`` while running, ``True``/``Succeeded`` on success, ``False`` with the failure reason on failure —
whose ``lastTransitionTime`` changes only when its status does (API conventions). ``status.reason`` mirrors
the condition's reason for ``kubectl get -o wide``; a server with the upstream CRD prunes it, harmlessly.
"""

from __future__ import annotations

import datetime

from ..reasons import OpsError, Reason

PENDING, IN_PROGRESS, COMPLETE, FAILED = "Pending", "InProgress", "Complete", "Failed"
TERMINAL = frozenset({COMPLETE, FAILED})
CONDITION = "Completed"
REASON_IN_PROGRESS = "InProgress"
REASON_PENDING = "Pending"

AGENT_UPGRADE, AGENT_RESET, NODE_REBOOT = "AgentUpgrade", "AgentReset", "NodeReboot"
HANDLED = frozenset({AGENT_UPGRADE, AGENT_RESET})
# Agent kinds of the upstream enum that this agent does not implement: failed at once, never left Pending.
UNSUPPORTED = frozenset({NODE_REBOOT})
# Other controllers carry these out; the agent never touches them.
HOST_KINDS = frozenset({"HostReboot", "HostPowerOff", "HostPowerOn", "HostReplace", "HostReimage"})

PARAMETERS = {
    AGENT_UPGRADE: {"downloadURL", "sha256", "force"},
    AGENT_RESET: set(),
}
AGENT_VERSION_ANNOTATION = "unbounded-cloud.io/agent-version"
COMPONENT = "unbounded-agent"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch of an RFC 3339 time, None if absent or unreadable."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# -- reading an operation ---------------------------------------------------------------------------


def name(op: dict) -> str:
    return op.get("metadata", {}).get("name", "")


def uid(op: dict) -> str:
    return op.get("metadata", {}).get("uid", "")


def kind(op: dict) -> str:
    return (op.get("spec") or {}).get("operationKind") or ""


def machine(op: dict) -> str:
    return (op.get("spec") or {}).get("machineRef") or ""


def phase(op: dict) -> str:
    return (op.get("status") or {}).get("phase") or ""


def is_terminal(op: dict) -> bool:
    return phase(op) in TERMINAL


def parameters(op: dict) -> dict:
    p = (op.get("spec") or {}).get("parameters")
    return p if isinstance(p, dict) else {}


def ttl_deadline(op: dict) -> float | None:
    """When a finished operation is to be deleted (completedAt + ttlSecondsAfterFinished), else None."""
    ttl = (op.get("spec") or {}).get("ttlSecondsAfterFinished")
    done = parse_time((op.get("status") or {}).get("completedAt"))
    if not is_terminal(op) or done is None or not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        return None
    return done + ttl


def sort_key(op: dict) -> tuple:
    """First come, first served: creation time, then name."""
    return (op.get("metadata", {}).get("creationTimestamp") or "", name(op))


def generation(op: dict) -> int | None:
    g = op.get("metadata", {}).get("generation")
    return g if isinstance(g, int) and not isinstance(g, bool) else None


def has_selector(op: dict) -> bool:
    return (op.get("spec") or {}).get("machineSelector") is not None


def _names(keys: list[str], most: int = 10) -> str:
    """Parameter names for a message: a few, each short and printable (they come from whoever wrote the
    operation, and the message goes to the journal, the status and an Event)."""
    shown = [key if key.isprintable() and len(key) <= 64 else repr(key[:64]) for key in keys[:most]]
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(shown) + more


def check_parameters(op: dict, allow_http: bool) -> dict:
    """The operation's parameters, checked; OpsError(InvalidParameters) with a redacted message otherwise.

    Unknown keys are refused (a misspelt ``sha256`` must not silently skip the digest check). The agent
    checks for itself what our CRD's rules also say: the upstream CRD has no such rules."""
    from .. import urls

    k = kind(op)
    if has_selector(op):
        raise OpsError(Reason.INVALID_PARAMETERS, "machineRef and machineSelector are both set: an operation names "
                                                  "one machine (machineRef) or selects machines, not both")
    params = parameters(op)
    bad = sorted(str(key) for key, value in params.items() if not isinstance(value, str))
    if bad:
        raise OpsError(Reason.INVALID_PARAMETERS, f"parameters must be strings: {_names(bad)}")
    unknown = sorted(set(params) - PARAMETERS[k])
    if unknown:
        allowed = ", ".join(sorted(PARAMETERS[k])) or "none"
        raise OpsError(Reason.INVALID_PARAMETERS,
                       f"unknown parameter(s) for {k}: {_names(unknown)} (allowed: {allowed})")
    if k == AGENT_UPGRADE:
        url = urls.validate(params.get("downloadURL", ""), allow_http=allow_http)
        force = params.get("force", "false").strip().lower()
        if force not in ("true", "false"):
            raise OpsError(Reason.INVALID_PARAMETERS, f'force must be "true" or "false", got {force[:20]!r}')
        return {"downloadURL": url, "sha256": urls.parse_sha256(params.get("sha256")), "force": force == "true"}
    return {}


# -- writing status ------------------------------------------------------------------------------------


def desired(phase_: str, reason: str, message: str, *, started_at: str | None = None,
            completed_at: str | None = None, machine_generation: int | None = None,
            observed_generation: int | None = None) -> dict:
    """What the agent wants an operation's status to say (kept in the progress file until written).

    observed_generation: the generation of the object version the agent decided from (its parameters),
    published on the condition whatever version the write lands on."""
    d: dict[str, str | int] = {"phase": phase_, "reason": reason, "message": message[:4096]}
    if observed_generation:
        d["observedGeneration"] = observed_generation
    if started_at:
        d["startedAt"] = started_at
    if completed_at:
        d["completedAt"] = completed_at
    if machine_generation:
        d["observedMachineGeneration"] = machine_generation
    return d


def apply_status(op: dict, want: dict, at: str | None = None) -> dict:
    """The status op gets when want is written over it (the input is not changed)."""
    at = at or now()
    old = dict(op.get("status") or {})
    st = dict(old)
    st["phase"], st["message"], st["reason"] = want["phase"], want["message"], want["reason"]
    for key in ("startedAt", "completedAt", "observedMachineGeneration"):
        if want.get(key):
            st[key] = want[key]
    if want["phase"] in (IN_PROGRESS, *TERMINAL):
        st.setdefault("startedAt", want.get("startedAt") or at)
    if want["phase"] in TERMINAL:
        st.setdefault("completedAt", at)
    status = "True" if want["phase"] == COMPLETE else "False"
    conditions = [c for c in old.get("conditions") or [] if isinstance(c, dict)]
    prev = next((c for c in conditions if c.get("type") == CONDITION), None)
    cond = {"type": CONDITION, "status": status, "reason": want["reason"], "message": want["message"],
            "observedGeneration": want.get("observedGeneration") or op.get("metadata", {}).get("generation", 1),
            "lastTransitionTime": prev["lastTransitionTime"] if prev and prev.get("status") == status
            and prev.get("lastTransitionTime") else at}
    extra = []
    for c in want.get("conditions") or []:  # more conditions beside Completed (kube/aftercommit.py)
        before = next((old_c for old_c in conditions if old_c.get("type") == c["type"]), None)
        extra.append(dict(c, observedGeneration=cond["observedGeneration"],
                          lastTransitionTime=before["lastTransitionTime"] if before and before.get("status") == c["status"]
                          and before.get("lastTransitionTime") else at))
    replaced = {CONDITION, *(c["type"] for c in extra)}
    st["conditions"] = [c for c in conditions if c.get("type") not in replaced] + [cond] + extra
    return st


def status_matches(op: dict, want: dict) -> bool:
    """Whether op's status already says what want says (so nothing needs writing)."""
    st = op.get("status") or {}
    cond = next((c for c in st.get("conditions") or [] if isinstance(c, dict) and c.get("type") == CONDITION), {})
    have = {c.get("type"): c for c in st.get("conditions") or [] if isinstance(c, dict)}
    return (st.get("phase") == want["phase"] and st.get("message") == want["message"]
            and cond.get("reason") == want["reason"]
            and (not want.get("observedGeneration") or cond.get("observedGeneration") == want["observedGeneration"])
            and all(st.get(k) == want[k] for k in ("completedAt", "startedAt") if want.get(k))
            and all({k: have.get(c["type"], {}).get(k) for k in ("status", "reason", "message")}
                    == {k: c[k] for k in ("status", "reason", "message")} for c in want.get("conditions") or []))


def event(op: dict, reason: str, message: str, warning: bool, host: str, namespace: str = "default",
          at: str | None = None, suffix: str = "", component: str = COMPONENT) -> dict:
    """A core/v1 Event on op (cluster-scoped objects' events live in the default namespace, as client-go
    records them; ``kubectl describe mop`` finds them by the involved object's uid)."""
    at = at or now()
    meta = op.get("metadata", {})
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta.get('name')}.{suffix}", "namespace": namespace},
        "involvedObject": {"apiVersion": op.get("apiVersion") or "unbounded-cloud.io/v1alpha3",
                           "kind": "MachineOperation", "name": meta.get("name"), "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
        "source": {"component": component, "host": host},
        "reportingComponent": component, "reportingInstance": host,
        "firstTimestamp": at, "lastTimestamp": at, "count": 1,
    }
