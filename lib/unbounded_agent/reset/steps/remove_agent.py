"""``unbounded-agent-reset-remove-agent.service``, reset step 7: stop and disable the agent daemon (and any
upgrade unit still at work); remove the agent's slots and links, its config and its state. The toolset
package itself stays."""

from __future__ import annotations

import os

from ...reasons import OpsError
from ..step import DEFAULT_CONFIG_DIR, UNIT_DIR, Item, Step, plan_paths, remove_path, unexpected

DAEMON_UNIT = "unbounded-agent-daemon.service"
RECOVERY_UNIT = "unbounded-agent-daemon-recovery.service"
BOOTSTRAP_UNIT = "unbounded-agent-bootstrap.service"
# The upgrade chain (unbounded-upgrade@, -stage@, -preflight@, -switch@, -probation): a unit still at work
# would put a binary back, so every running one is stopped first.
UPGRADE_UNITS = ("unbounded-upgrade@*.service", "unbounded-upgrade-*.service")
# Units of the agent that must not run (or start at boot) after a reset. Their unit files in
# /lib/systemd/system belong to the toolset package and stay; copies in /etc/systemd/system (an
# upstream-style install, or an admin's override) and drop-in dirs are the agent's and go.
AGENT_UNITS = (DAEMON_UNIT, RECOVERY_UNIT, BOOTSTRAP_UNIT)
DAEMON_STOP_TIMEOUT = 120.0  # the daemon's own TimeoutStopSec (90 s default) ends it before this


def agent_unit_files() -> list[str]:
    out = []
    for unit in AGENT_UNITS:
        out += [f"{UNIT_DIR}/{unit}", f"{UNIT_DIR}/{unit}.d"]
    return out


def agent_file_paths(ctx) -> list[str]:
    from ... import layout

    paths = []
    for d in ctx.bin_dirs:
        for name in (*layout.SLOTS, layout.CURRENT, layout.LAST_GOOD, layout.COMPAT):
            paths.append(f"{d}/{name}")
        real = ctx.p(d)
        try:  # temporaries a crash left next to the slots (fsutil's hidden ".<name>.tmp-*")
            paths += sorted(f"{d}/{n}" for n in os.listdir(real) if n.startswith(".unbounded-agent") and ".tmp-" in n)
        except OSError:
            pass
    # Whole directories only when they are the agent's own by name: a stateDir set to /var/lib by mistake
    # must not take /var/lib with it. The bin dir goes with the state dir it is in (the default), never by
    # itself: it may be a shared one such as /usr/local/bin.
    paths += [d for d in ctx.state_dirs if "unbounded" in os.path.basename(d.rstrip("/"))]
    paths.append(DEFAULT_CONFIG_DIR)
    paths += list(ctx.config_files)
    paths += agent_unit_files()
    return list(dict.fromkeys(paths))


class RemoveAgent(Step):
    name, number, phase = "remove-agent", 7, 2
    title = "stop and disable the agent daemon; remove its binaries, config and state"

    def _stoppable(self, ops) -> list[str]:
        return [*ops.matching(UPGRADE_UNITS), DAEMON_UNIT, RECOVERY_UNIT, BOOTSTRAP_UNIT]

    def plan(self, ctx):
        items = []
        ops = ctx.units()
        for unit in self._stoppable(ops):
            if ops.running(unit):
                items.append(Item(f"running unit {unit}", action="stop"))
        for unit in AGENT_UNITS:
            if ops.enabled(unit):
                items.append(Item(f"enabled unit {unit}", action="disable"))
        items += plan_paths(ctx, agent_file_paths(ctx))
        return items

    def apply(self, ctx, rec):
        ops = ctx.units()
        # An upgrade unit at work would put a binary back; the daemon would restart into a deleted one.
        for unit in self._stoppable(ops):
            try:
                if ops.running(unit):
                    ops.stop(unit, DAEMON_STOP_TIMEOUT)
                    rec.did(f"running unit {unit}", "stopped")
            except OpsError as e:
                rec.fail(f"running unit {unit}", e)
            except Exception as e:
                rec.fail(f"running unit {unit}", unexpected(e, f"cannot stop {unit}"))
        if rec.failed:  # never delete the agent from under a unit that still runs it
            rec.note("not removing the agent's files while one of its units still runs")
            return
        for unit in AGENT_UNITS:
            try:
                if ops.enabled(unit):
                    ops.disable(unit)
                    rec.did(f"enabled unit {unit}", "disabled")
            except OpsError as e:
                rec.fail(f"enabled unit {unit}", e)
            except Exception as e:
                rec.fail(f"enabled unit {unit}", unexpected(e, f"cannot disable {unit}"))
        for p in agent_file_paths(ctx):
            if os.path.lexists(ctx.p(p)):  # a path inside an already removed state dir is simply gone
                remove_path(ctx, rec, p)


STEP = RemoveAgent()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
