"""``unbounded-agent-reset-verify.service``, last unit of phase 1: verify that every step of this run that
can fail (1–6, and the removals of 7) succeeded and that a fresh inventory finds nothing of them left. Only
then does the dispatcher open the gate (the requester reports ``Complete``) and stop the daemon."""

from __future__ import annotations

from ...reasons import OpsError, Reason
from ..reports import read_report
from ..step import Step


class Verify(Step):
    name, number, phase = "verify", 9, 1
    title = "verify that nothing but the running daemon is left"
    verify_after = False

    def work(self, ctx, directory, run_id, rec):
        from . import of_phase

        problems = check_steps([s for s in of_phase(1) if 1 <= s.number <= 8], ctx, directory, run_id)
        if problems:
            raise OpsError(Reason.RESET_INCOMPLETE, "reset incomplete: " + "; ".join(problems))
        rec.note("verified: nothing of the agent is left but its running daemon")


def check_steps(steps, ctx, directory, run_id: str | None, inventory=None) -> list[str]:
    """What is wrong with these steps in this run: one that failed or did not run, or anything a fresh
    inventory (of the steps in ``inventory``; None: all of them) still finds."""
    problems = []
    for step in steps:
        report = read_report(step.number, step.name, directory)
        if report is None or report.run_id != run_id:
            problems.append(f"{step.name} did not run in this reset")
        elif not report.succeeded:
            problems.append(f"{step.name} failed ({report.reason})")
        if step.verify_after and (inventory is None or step in inventory):
            try:
                left = step.plan(ctx)
            except OpsError as e:
                problems.append(f"{step.name}: {e.message}")
                continue
            for item in left:
                problems.append(f"{item.what} is still there")
    return problems


STEP = Verify()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
