"""``unbounded-agent-reset-finish.service``, last unit of phase 2: verify every step of this run succeeded and
nothing is left — then remove the "resetting" checkpoint (last, so that an unfinished reset is always
resumed). The inventory of steps 1–6 was taken fresh by ``verify`` at the end of phase 1, under the same
lock; what can change after it is taken again here: the daemon (stop-daemon) and the agent's files (a
daemon restarted in between makes its state directory again)."""

from __future__ import annotations

from ... import fsutil
from ...reasons import OpsError, Reason
from ..reports import CHECKPOINT, REQUEST
from ..step import Step
from .verify import check_steps


class Finish(Step):
    name, number, phase = "finish", 10, 2
    title = "verify nothing is left, then remove the checkpoint"
    verify_after = False

    def work(self, ctx, directory, run_id, rec):
        from . import by_name, work_steps

        again = [by_name("remove-agent"), by_name("stop-daemon")]
        problems = check_steps(work_steps(), ctx, directory, run_id, inventory=again)
        if problems:
            raise OpsError(Reason.RESET_INCOMPLETE, "reset incomplete: " + "; ".join(problems))
        for name in (CHECKPOINT, REQUEST):
            (directory / name).unlink(missing_ok=True)
        fsutil.fsync_dir(directory)
        rec.note("verified: no agent artifact is left; checkpoint removed")


STEP = Finish()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
