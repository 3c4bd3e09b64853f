"""``unbounded-agent-reset-verify.service``, last unit: verify every step of this run succeeded and a fresh
inventory finds nothing left, then remove the "resetting" checkpoint."""

from __future__ import annotations

from ... import fsutil
from ...reasons import OpsError, Reason
from ..reports import CHECKPOINT, REQUEST, read_report
from ..step import Step


class Verify(Step):
    name, number, phase = "verify", 9, 2
    title = "verify nothing is left, then remove the checkpoint"
    verify_after = False

    def work(self, ctx, directory, run_id, rec):
        finish_run(ctx, directory, run_id, rec)


def finish_run(ctx, directory, run_id: str | None, rec) -> None:
    """The final check: every step of this run succeeded and a fresh inventory finds nothing left; only
    then is the checkpoint removed (last), so an unfinished reset is always resumed."""
    from . import work_steps

    problems = []
    for step in work_steps():
        report = read_report(step.number, step.name, directory)
        if report is None or report.run_id != run_id:
            problems.append(f"{step.name} did not run in this reset")
        elif not report.succeeded:
            problems.append(f"{step.name} failed ({report.reason})")
        if step.verify_after:
            try:
                left = step.plan(ctx)
            except OpsError as e:
                problems.append(f"{step.name}: {e.message}")
                continue
            for item in left:
                problems.append(f"{item.what} is still there")
    if problems:
        raise OpsError(Reason.RESET_INCOMPLETE, "reset incomplete: " + "; ".join(problems))
    for name in (CHECKPOINT, REQUEST):
        (directory / name).unlink(missing_ok=True)
    fsutil.fsync_dir(directory)
    rec.note("verified: no agent artifact is left; checkpoint removed")


STEP = Verify()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
