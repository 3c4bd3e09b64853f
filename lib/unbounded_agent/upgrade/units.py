"""The units of an upgrade (units/README.md) and which of them are still at work on a record."""

from __future__ import annotations

from pathlib import Path

from .. import systemd
from .record import UpgradeRecord

STEPS = ("stage", "preflight", "switch")
PROBATION_UNIT = "unbounded-upgrade-probation.service"
RECOVERY_UNIT = "unbounded-agent-daemon-recovery.service"
MAX_UNIT_NAME = 255


def step_unit(step: str, id: str) -> str:
    return f"unbounded-upgrade-{step}@{id}.service"


def chain_units(id: str) -> list[str]:
    """The units that move the operation id forward, in order."""
    return [step_unit(step, id) for step in STEPS]


def chain_start(id: str) -> str:
    """The unit to start for operation id: switch@ Requires= (and is After=) preflight@, which Requires= stage@."""
    return step_unit("switch", id)


def own_unit() -> str | None:
    """The systemd unit this process runs in, from its cgroup (None outside a service)."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[-1]
    except (OSError, IndexError):
        return None
    last = line.rsplit("/", 1)[-1]
    return last if last.endswith(".service") else None


def busy_units(rec: UpgradeRecord) -> list[str]:
    """The units that may still move rec forward — its chain's steps, probation and recovery — that are
    active, activating or have a job queued; the caller's own unit is not counted."""
    me = own_unit()
    names = chain_units(rec.id) + [PROBATION_UNIT, RECOVERY_UNIT]
    return [n for n in systemd.busy(names) if n != me]
