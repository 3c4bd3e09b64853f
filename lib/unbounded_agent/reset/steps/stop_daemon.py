"""``unbounded-agent-reset-stop-daemon.service``, reset step 7 (its end): stop and disable the agent daemon.

It runs after the gate: every step that can fail (1–6 and the removals of step 7) is done and verified, and
the requester (the daemon itself, for a MachineOperation) has reported ``Complete``. A daemon restarted
after its files went could not start again; systemd still made its state directory for it
(``StateDirectory=``): that goes too."""

from __future__ import annotations

from ...reasons import OpsError
from ..step import Item, Step, exists, remove_path, unexpected
from .remove_agent import DAEMON_UNIT, state_paths

DAEMON_STOP_TIMEOUT = 120.0  # the daemon's own TimeoutStopSec (90 s default) ends it before this


class StopDaemon(Step):
    name, number, phase = "stop-daemon", 7, 2
    title = "stop and disable the agent daemon"

    def plan(self, ctx):
        ops = ctx.units()
        items = []
        if ops.running(DAEMON_UNIT):
            items.append(Item(f"running unit {DAEMON_UNIT}", action="stop"))
        if ops.enabled(DAEMON_UNIT):
            items.append(Item(f"enabled unit {DAEMON_UNIT}", action="disable"))
        return items  # a state directory made again is remove-agent's to report (finish checks both)

    def apply(self, ctx, rec):
        ops = ctx.units()
        try:
            if ops.running(DAEMON_UNIT):
                ops.stop(DAEMON_UNIT, DAEMON_STOP_TIMEOUT)
                rec.did(f"running unit {DAEMON_UNIT}", "stopped")
        except OpsError as e:
            rec.fail(f"running unit {DAEMON_UNIT}", e)
            return
        except Exception as e:
            rec.fail(f"running unit {DAEMON_UNIT}", unexpected(e, f"cannot stop {DAEMON_UNIT}"))
            return
        try:
            if ops.enabled(DAEMON_UNIT):
                ops.disable(DAEMON_UNIT)
                rec.did(f"enabled unit {DAEMON_UNIT}", "disabled")
        except OpsError as e:
            rec.fail(f"enabled unit {DAEMON_UNIT}", e)
        except Exception as e:
            rec.fail(f"enabled unit {DAEMON_UNIT}", unexpected(e, f"cannot disable {DAEMON_UNIT}"))
        for p in state_paths(ctx):
            if exists(ctx.p(p)):
                rec.note(f"{p} was made again for a restart of the daemon: removing it")
                remove_path(ctx, rec, p)


STEP = StopDaemon()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
