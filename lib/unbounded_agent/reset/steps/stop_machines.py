"""``unbounded-agent-reset-stop-machines.service``, reset step 1: disable and stop the nspawn machines kube1
and kube2 — gracefully within --graceful-timeout, then terminated within --terminate-timeout; other
machines are left alone."""

from __future__ import annotations

from ..step import MACHINES, Item, Step


class StopMachines(Step):
    name, number, phase = "stop-machines", 1, 1
    title = "stop the nspawn machines kube1 and kube2"

    def plan(self, ctx):
        from .. import machines

        items = []
        for s in machines.inspect(MACHINES):
            if s.enabled:
                items.append(Item(f"enabled unit {machines.unit_of(s.name)}", f"({s.unit_file_state})", "disable"))
            if s.running:
                detail = "registered" if s.registered else "not registered"
                items.append(Item(f"machine {s.name}", f"({detail}, {machines.unit_of(s.name)} {s.unit_active_state})", "stop"))
        return items

    def apply(self, ctx, rec):
        from ...reasons import OpsError
        from .. import machines

        for m in MACHINES:  # disable first: even if stopping fails, the machine will not come back at boot
            try:
                if machines.disable(m):
                    rec.did(f"enabled unit {machines.unit_of(m)}", "disabled")
            except OpsError as e:
                rec.fail(f"enabled unit {machines.unit_of(m)}", e)
        outcomes = machines.stop(MACHINES, ctx.graceful_timeout, ctx.terminate_timeout, log=rec.note)
        for o in outcomes:
            if not o.was_running:
                rec.already_absent(f"machine {o.machine}")
                continue
            rec.did(f"machine {o.machine}", "stopped")
            if o.forced:
                rec.note(f"machine {o.machine} ignored the graceful stop for {ctx.graceful_timeout:g} s and was terminated")
        rec.forced = [o.machine for o in outcomes if o.forced]


STEP = StopMachines()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    def arguments(ap):
        ap.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds for a graceful stop (default 30)")
        ap.add_argument("--terminate-timeout", type=float, default=15.0,
                        help="seconds for termination after that (default 15)")

    return step_main(STEP, __doc__, argv, arguments,
                     lambda a: {"graceful_timeout": a.graceful_timeout, "terminate_timeout": a.terminate_timeout})
