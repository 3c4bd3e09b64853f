"""The units of an upgrade (units/README.md), which of them are still at work on a record, and the bounds
their settings derive from (upgrade/generator.py writes them into drop-ins from the config)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import systemd
from ..config import Config
from ..records import STATE_RETRY_SECONDS

if TYPE_CHECKING:  # the generator reads the timeouts here at every daemon-reload: no record code for it
    from .record import UpgradeRecord

STEPS = ("stage", "preflight", "switch")
PROBATION_UNIT = "unbounded-upgrade-probation.service"
RECOVERY_UNIT = "unbounded-agent-daemon-recovery.service"
DISPATCH_UNIT = "unbounded-agent-dispatch.service"
MAX_UNIT_NAME = 255

# The daemon unit's TimeoutStopSec=: a daemon that ignores SIGTERM is killed after it, then systemd waits as
# long again for the kill (the final SIGKILL). Probation waits that out before the new daemon's clock starts.
DAEMON_STOP_SECONDS = 30
STOP_BOUND_SECONDS = 2 * DAEMON_STOP_SECONDS + 10
# How often probation watches again after someone restarted the daemon from outside (not held against it).
MAX_REWATCH = 3
START_LIMIT_WAIT_MAX = 305.0  # as upstream: at most the 5-minute interval, plus 5 s
STAGE_MARGIN_SECONDS = 120  # after the download's deadline: extraction, digests, fsync
PREFLIGHT_MARGIN_SECONDS = 60  # after the candidate's own timeout: kill, digest, record
MARGIN_SECONDS = 60
# The daemon's own TimeoutStartSec= is this much past readyTimeoutSeconds: probation judges readiness, and
# systemd's kill at the same moment would turn "not ready in time" into "exited before ready".
DAEMON_START_MARGIN_SECONDS = 30
FORGET_WAIT_SECONDS = 5.0  # a step on its way out once its operation has ended exits in well under this


def step_unit(step: str, id: str) -> str:
    return f"unbounded-upgrade-{step}@{id}.service"


def chain_units(id: str) -> list[str]:
    """The units that move the operation id forward, in order."""
    return [step_unit(step, id) for step in STEPS]


def chain_start(id: str) -> str:
    """The unit to start for operation id: switch@ Requires= (and is After=) preflight@, which Requires= stage@."""
    return step_unit("switch", id)


def forget(id: str, wait: float = FORGET_WAIT_SECONDS) -> None:
    """Clear the failed state of operation id's chain units once it has ended. A step that failed, or that
    stopped the chain on purpose (preflight after a no-op), would otherwise stay loaded as a failed unit for
    ever: one more per operation, and the host "degraded". The record, the result and the journal keep what
    happened. A step may still be on its way out when the record ends (preflight after a no-op): wait for the
    chain to go idle, a bounded while."""
    names = chain_units(id)
    deadline = time.monotonic() + wait
    try:
        while systemd.busy(names) and time.monotonic() < deadline:
            time.sleep(0.1)
    except systemd.SystemdError:
        pass  # cannot tell: clear what has failed so far
    for name in names:
        try:
            systemd.reset_failed(name)
        except systemd.SystemdError:
            pass  # not loaded (it succeeded and was collected) or not ours to clear: nothing left behind


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


# -- how long each unit may take, from the config ---------------------------------------------------------


def probation_seconds(cfg: Config) -> float:
    """The probation unit's bound: the old daemon's stop, then ready + stable for the first watch and each
    re-watch, then writing the verdict (retried while the state dir refuses writes)."""
    return (STOP_BOUND_SECONDS + (MAX_REWATCH + 1) * (cfg.ready_timeout_seconds + cfg.probation_seconds)
            + 2 * STATE_RETRY_SECONDS + MARGIN_SECONDS)


def recovery_seconds(cfg: Config) -> float:
    """The recovery unit's bound: the failing daemon's stop, one start-limit interval of waiting, the restored
    daemon's readiness, and its writes (retried while the state dir refuses them)."""
    return (STOP_BOUND_SECONDS + START_LIMIT_WAIT_MAX + cfg.ready_timeout_seconds + 3 * STATE_RETRY_SECONDS
            + MARGIN_SECONDS)


def daemon_start_seconds(cfg: Config) -> float:
    return cfg.ready_timeout_seconds + DAEMON_START_MARGIN_SECONDS


def stage_seconds(cfg: Config) -> float:
    return cfg.download_deadline_seconds + STAGE_MARGIN_SECONDS


def preflight_seconds(cfg: Config) -> float:
    return cfg.preflight_timeout_seconds + PREFLIGHT_MARGIN_SECONDS
