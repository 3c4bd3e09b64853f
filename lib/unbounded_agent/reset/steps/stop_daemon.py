"""``unbounded-agent-reset-stop-daemon.service``, reset step 7 (its end): stop and disable the agent daemon, and
the reporter that stood in for it, with the copy of the config and credentials kept for it (reporter_kit.py).

It runs after the gate: every step that can fail (1–6 and the removals of step 7) is done and verified, and
the requester (the daemon itself, for a MachineOperation) has reported ``Complete``. A daemon restarted
after its files went could not start again; systemd still made its state directory for it
(``StateDirectory=``): that goes too."""

from __future__ import annotations

from ..reporter_kit import REPORTER_UNIT, kit_dir, release
from ..step import Item, Step, disable_unit, exists, remove_path, stop_unit, unexpected
from .remove_agent import DAEMON_UNIT, state_paths

DAEMON_STOP_TIMEOUT = 120.0  # the daemon's own TimeoutStopSec (90 s default) ends it before this


class StopDaemon(Step):
    name, number, phase = "stop-daemon", 7, 2
    title = "stop and disable the agent daemon"

    def plan(self, ctx):
        ops = ctx.units()
        items = []
        for unit in (DAEMON_UNIT, REPORTER_UNIT):
            if ops.running(unit):
                items.append(Item(f"running unit {unit}", action="stop"))
        if ops.enabled(DAEMON_UNIT):
            items.append(Item(f"enabled unit {DAEMON_UNIT}", action="disable"))
        if ctx.directory and exists(str(kit_dir(ctx.directory))):
            items.append(Item(f"directory {kit_dir(ctx.directory)}", note="(the copy kept for the report)"))
        return items  # a state directory made again is remove-agent's to report (finish checks both)

    def apply(self, ctx, rec):
        ops = ctx.units()
        if not all(stop_unit(ops, rec, unit, DAEMON_STOP_TIMEOUT) for unit in (DAEMON_UNIT, REPORTER_UNIT)):
            return
        if ctx.directory:
            try:
                if release(ctx.directory):
                    rec.did(f"directory {kit_dir(ctx.directory)}")
            except OSError as e:
                rec.fail(f"directory {kit_dir(ctx.directory)}", unexpected(e, "cannot remove the copy kept for the report"))
        disable_unit(ops, rec, DAEMON_UNIT)
        for p in state_paths(ctx):
            if exists(ctx.p(p)):
                rec.note(f"{p} was made again for a restart of the daemon: removing it")
                remove_path(ctx, rec, p)


STEP = StopDaemon()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
