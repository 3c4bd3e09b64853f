"""What a parent operation's rollout does next, decided from what the server shows: pure functions, no I/O.

A parent is a MachineOperation with ``spec.machineSelector`` instead of ``spec.machineRef``. Its parameters are
the children's (same kind, same parameters) plus three of the rollout's own, which the children never carry
(the agent refuses parameters it does not know):

  canaryCount    default 1  the first machines, done before any other starts; one failed canary halts the
                            rollout whatever the failure budget
  maxInFlight    default 1  children created and not finished, at most; also the size of each wave
  failureBudget  default 0  failed children tolerated; one more halts the rollout

The matched Machines (by label, in name order: a stable order) are taken in waves: the canary waves first
(``min(maxInFlight, canaries left)`` machines each), then waves of ``maxInFlight``. A wave starts only when
every child of the one before has finished. Halted (a canary failed, or more failures than the budget), no
further child is created, the children not yet started are withdrawn, and the parent ends ``Failed`` with
reason ``Halted`` naming the failed machines. Otherwise it ends ``Complete`` when every child did, or
``Failed``/``ChildrenFailed`` when some failed within the budget.

The parent's ``status.targets`` (the upstream CRD's per-machine list) remembers every machine a child was
created for, with its wave and phase: a machine is given a child at most once, even if that child is deleted.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ..kube import mop
from ..reasons import OpsError, Reason
from . import children, selector

WAVE_PARAMETERS = {"canaryCount": 1, "maxInFlight": 1, "failureBudget": 0}
MINIMUM = {"canaryCount": 0, "maxInFlight": 1, "failureBudget": 0}
MAXIMUM = 99999
PROGRESSING = "Progressing"
ROLLING_OUT = "RollingOut"
HALTED, CHILDREN_FAILED, NO_MACHINES, CANCELLED = "Halted", "ChildrenFailed", "NoMachinesMatched", "Cancelled"
DELETED = "the child MachineOperation was deleted before it finished"


@dataclasses.dataclass(frozen=True)
class Waves:
    canary: int = 1
    max_in_flight: int = 1
    budget: int = 0


def waves(params: dict) -> Waves:
    """The rollout's parameters, checked, with their defaults (OpsError InvalidParameters otherwise)."""
    values = {}
    for key, default in WAVE_PARAMETERS.items():
        text = params.get(key, str(default))
        # as the CRD's rule: ^[0-9]{1,5}$ (and maxInFlight at least 1)
        if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,5}", text) or int(text) < MINIMUM[key]:
            raise OpsError(Reason.INVALID_PARAMETERS, f"{key} must be a whole number from {MINIMUM[key]} to "
                                                      f"{MAXIMUM}, got {str(text)[:20]!r}")
        values[key] = int(text)
    return Waves(values["canaryCount"], values["maxInFlight"], values["failureBudget"])


def child_parameters(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in WAVE_PARAMETERS}


def check(parent: dict) -> tuple[Waves, dict]:
    """The rollout's parameters and the children's, checked as the agent will check them (its unknown-parameter
    and URL rules; plain http is left for each agent's own allowInsecureHTTP to decide)."""
    kind = mop.kind(parent)
    if kind not in mop.HANDLED:
        raise OpsError(Reason.UNSUPPORTED_OPERATION, f"{kind or 'an empty operationKind'} is not fanned out: the "
                                                     f"agents handle {' and '.join(sorted(mop.HANDLED))}")
    selector.check((parent.get("spec") or {}).get("machineSelector"))
    params = mop.parameters(parent)
    w = waves(params)
    child = {"metadata": {"name": mop.name(parent)}, "spec": {"machineRef": "x", "operationKind": kind,
                                                              "parameters": child_parameters(params)}}
    mop.check_parameters(child, allow_http=True)
    return w, child_parameters(params)


# -- the state of a rollout --------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One machine a child was created for (an entry of status.targets)."""
    machine: str
    wave: int
    phase: str = mop.PENDING
    message: str = ""  # why it failed (reason: message)
    started: bool = False  # only known from the child itself; a recorded one that is gone counts as started

    @property
    def terminal(self) -> bool:
        return self.phase in mop.TERMINAL

    def entry(self) -> dict:
        e: dict = {"machineRef": self.machine, "wave": self.wave, "phase": self.phase}
        if self.message:
            e["message"] = self.message
        return e


def recorded(parent: dict) -> dict[str, Target]:
    out = {}
    for e in (parent.get("status") or {}).get("targets") or []:
        if isinstance(e, dict) and isinstance(e.get("machineRef"), str) and e["machineRef"]:
            wave = e["wave"] if isinstance(e.get("wave"), int) else 0
            out[e["machineRef"]] = Target(e["machineRef"], wave, str(e.get("phase") or mop.PENDING),
                                          str(e.get("message") or ""), started=True)
    return out


def target_of(child: dict, machine: str, old: Target | None) -> Target:
    phase = mop.phase(child) or mop.PENDING
    message = ""
    if phase == mop.FAILED:
        cond = next((c for c in (child.get("status") or {}).get("conditions") or []
                     if isinstance(c, dict) and c.get("type") == mop.CONDITION), {})
        message = f"{cond.get('reason') or 'Failed'}: {(child.get('status') or {}).get('message', '')}"[:300]
    wave = children.wave_of(child) or (old.wave if old else 0)
    return Target(machine, wave, phase, message, started=children.started(child))


@dataclasses.dataclass
class View:
    """Every machine of a rollout and where it stands."""
    targets: dict[str, Target]  # machines with a child, by name
    not_started: list[str]  # matched machines without a child, in order

    @property
    def ordered(self) -> list[Target]:
        return sorted(self.targets.values(), key=lambda t: (t.wave, t.machine))

    def with_phase(self, *phases: str) -> list[Target]:
        return [t for t in self.ordered if t.phase in phases]

    @property
    def in_flight(self) -> list[Target]:
        return [t for t in self.ordered if not t.terminal]

    @property
    def matched(self) -> int:
        return len(self.targets) + len(self.not_started)

    @property
    def last_wave(self) -> int:
        return max((t.wave for t in self.targets.values()), default=0)

    def counts(self) -> str:
        return (f"{self.matched} matched: {len(self.with_phase(mop.COMPLETE))} complete, "
                f"{len(self.with_phase(mop.FAILED))} failed, {len(self.in_flight)} in flight, "
                f"{len(self.not_started)} not started")

    def canaries(self, w: Waves) -> list[Target]:
        return self.ordered[:w.canary]


def view(parent: dict, matched: list[str], kids: dict[str, dict], gone: set[str] | None = None,
         taken: dict[str, tuple[int, str]] | None = None, withdrawn: set[str] | None = None) -> View:
    """kids: the parent's children by machine (the cache's); gone: recorded machines whose child is confirmed
    deleted; taken: machines whose child's name belongs to another object ((wave, why)); withdrawn: machines
    whose child the controller has just deleted before it started (not started: never ran, never will). A
    recorded machine stays in the rollout whatever its labels do now.

    A child deleted before it finished counts as failed — except one that never left Pending once the rollout
    is over (halted or cancelled: the controller withdrew it), which counts as not started: it never ran and
    never will."""
    targets = recorded(parent)
    for machine, child in kids.items():
        targets[machine] = target_of(child, machine, targets.get(machine))
    over = mop.is_terminal(parent) or children.deleting(parent)
    for machine in gone or ():
        t = targets.get(machine)
        if t is None or t.terminal:
            continue
        if over and t.phase == mop.PENDING:
            del targets[machine]
        else:
            t.phase, t.message = mop.FAILED, DELETED
    for machine in withdrawn or ():
        targets.pop(machine, None)
    for machine, (wave, why) in (taken or {}).items():
        targets[machine] = Target(machine, wave, mop.FAILED, why, started=True)
    return View(targets, sorted(m for m in set(matched) if m not in targets))


# -- the decision ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Decision:
    phase: str
    reason: str
    message: str
    create: list[str] = dataclasses.field(default_factory=list)  # machines of the next wave
    wave: int = 0  # its number
    withdraw: list[str] = dataclasses.field(default_factory=list)  # machines whose unstarted child goes
    event: tuple[str, str, bool] | None = None  # (reason, message, warning) when this decision is news


def names(machines: list[str], limit: int = 5) -> str:
    if len(machines) <= limit:
        return ", ".join(machines)
    return f"{', '.join(machines[:limit])} and {len(machines) - limit} more"


def failures(targets: list[Target]) -> str:
    return ", ".join(f"{t.machine} ({t.message.split(':')[0] or 'Failed'})" for t in targets)


def total_waves(v: View, w: Waves) -> int:
    """The waves the rollout takes, as far as the matched machines now tell."""
    left, started, n = len(v.not_started), len(v.targets), v.last_wave
    canary_left = min(left, max(0, w.canary - started))
    n += math.ceil(canary_left / w.max_in_flight) + math.ceil((left - canary_left) / w.max_in_flight)
    return n


def halted(v: View, w: Waves) -> list[Target] | None:
    """The failed children that halt the rollout, None while it may go on."""
    failed = v.with_phase(mop.FAILED)
    if any(t.phase == mop.FAILED for t in v.canaries(w)) or len(failed) > w.budget:
        return failed
    return None


def decide(parent: dict, v: View, w: Waves) -> Decision:
    """What a parent that is not being deleted does next."""
    if mop.is_terminal(parent):  # decided already: only the counts (and targets) keep up with the children
        return Decision(mop.phase(parent), _reason(parent), _keep(parent, v), withdraw=_unstarted(v))
    stop = halted(v, w)
    if stop is not None:
        in_canary = any(t.phase == mop.FAILED for t in v.canaries(w))
        message = (f"halted: {failures(stop)} failed{' in the canary wave' if in_canary else ''}; no further "
                   f"MachineOperations are created (failure budget {w.budget}); {v.counts()}")
        return Decision(mop.FAILED, HALTED, message, withdraw=_unstarted(v), event=(HALTED, message, True))
    if v.in_flight:
        running = v.in_flight
        canary = " (canary)" if any(t in v.canaries(w) for t in running) else ""
        message = (f"wave {v.last_wave} of {total_waves(v, w)}{canary}: {names([t.machine for t in running])} "
                   f"in flight; {v.counts()}")
        return Decision(mop.IN_PROGRESS, mop.REASON_IN_PROGRESS, message)
    if v.not_started:
        # The next wave; the status is written once its children exist (decided again then: in flight).
        started = len(v.targets)
        size = min(w.max_in_flight, w.canary - started) if started < w.canary else w.max_in_flight
        wave, batch = v.last_wave + 1, v.not_started[:size]
        canary = " (canary)" if started < w.canary else ""
        message = (f"wave {wave} of {total_waves(v, w)}{canary}: {len(batch)} machine(s): {names(batch, 20)} "
                   f"(max in flight {w.max_in_flight})")
        return Decision(mop.IN_PROGRESS, mop.REASON_IN_PROGRESS, message, create=batch, wave=wave,
                        event=("WaveStarted", message, False))
    if not v.targets:
        sel = selector.describe((parent.get("spec") or {}).get("machineSelector") or {})
        message = f"the machineSelector ({sel}) matches no Machine"
        return Decision(mop.FAILED, NO_MACHINES, message, event=(NO_MACHINES, message, True))
    failed = v.with_phase(mop.FAILED)
    if failed:
        message = (f"{len(failed)} of {v.matched} machines failed (within the failure budget of {w.budget}): "
                   f"{failures(failed)}; {v.counts()}")
        return Decision(mop.FAILED, CHILDREN_FAILED, message, event=(CHILDREN_FAILED, message, True))
    message = f"{mop.kind(parent)} complete on {v.matched} machine(s) in {v.last_wave} wave(s); {v.counts()}"
    return Decision(mop.COMPLETE, Reason.SUCCEEDED.value, message, event=("Completed", message, False))


def decide_deleted(parent: dict, v: View) -> Decision:
    """The parent is being deleted: no further child; those not started are withdrawn, the running ones finish."""
    running = [t.machine for t in v.in_flight if t.started]
    message = ("cancelled: the operation is being deleted; no further MachineOperations are created"
               + (f"; waiting for {names(running)} to finish" if running else "") + f"; {v.counts()}")
    first = mop.phase(parent) != mop.FAILED or _reason(parent) != CANCELLED
    return Decision(mop.FAILED, CANCELLED, message, withdraw=_unstarted(v),
                    event=(CANCELLED, message, True) if first else None)


def _unstarted(v: View) -> list[str]:
    return [t.machine for t in v.in_flight if not t.started]


def _reason(parent: dict) -> str:
    return (parent.get("status") or {}).get("reason") or ""


def _keep(parent: dict, v: View) -> str:
    """A finished parent's message with today's counts."""
    text = (parent.get("status") or {}).get("message") or ""
    head, sep, _ = text.rpartition("; ")
    return f"{head}; {v.counts()}" if sep and " matched: " in text else text


# -- the status that says it -------------------------------------------------------------------------------


def status(parent: dict, d: Decision, v: View, at: str | None = None) -> dict:
    """The parent's status for decision d: phase, message, the Completed condition (mop.apply_status), the
    Progressing condition whose message is the counts (the ROLLOUT column of kubectl get -o wide), targets."""
    at = at or mop.now()
    want = mop.desired(d.phase, d.reason, d.message, observed_generation=mop.generation(parent))
    st = mop.apply_status(parent, want, at)
    rolling = d.phase not in mop.TERMINAL
    cond_status = "True" if rolling else "False"
    conditions = [c for c in st.get("conditions") or [] if c.get("type") != PROGRESSING]
    prev = next((c for c in (parent.get("status") or {}).get("conditions") or []
                 if isinstance(c, dict) and c.get("type") == PROGRESSING), None)
    conditions.append({"type": PROGRESSING, "status": cond_status, "reason": ROLLING_OUT if rolling else d.reason,
                       "message": v.counts(), "observedGeneration": mop.generation(parent) or 1,
                       "lastTransitionTime": prev["lastTransitionTime"] if prev and prev.get("status") == cond_status
                       and prev.get("lastTransitionTime") else at})
    st["conditions"] = conditions
    st["targets"] = [t.entry() for t in v.ordered]
    return st


def same_status(old: dict, new: dict) -> bool:
    """Whether writing new over old would change anything but timestamps."""
    def key(st: dict) -> tuple:
        conds = sorted(((c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
                        for c in st.get("conditions") or [] if isinstance(c, dict)), key=str)
        return (st.get("phase"), st.get("reason"), st.get("message"), conds, st.get("targets") or [],
                st.get("completedAt") is not None)
    return key(old or {}) == key(new)
