"""Running one reset step: what every ``bin/unbounded-agent-reset-<step>`` does.

A step runs only inside a reset the dispatcher runs: the host-operation lock must be held for that reset
(hostlock.require), from the first step to the last, so nothing slips in between them. The step loads
the run's checkpoint, does its work, verifies it, and always writes its report — also when it fails, and
also for an error nobody foresaw.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from .. import holdpoint, log, program, records
from ..reasons import OpsError, Reason, describe_error
from .reports import FailedItem, StepReport, read_request, reset_dir, write_report
from .step import Recorder, Step, context_from


def step_main(step: Step, doc: str | None, argv: list[str] | None = None, arguments=None, overrides=None) -> int:
    """The program of a step unit: parse its arguments, run it, log its one-line outcome, exit with its code."""
    import sys

    ap = program.parser(step.executable, doc)
    if arguments:
        arguments(ap)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    log.set_prefix(step.executable)
    return exit_code(run_step(step, **(overrides(args) if overrides else {})))


def run_step(step: Step, directory: Path | None = None, **ctx_overrides) -> StepReport:
    """Run one step for the reset that holds the host, and write its report. Returns the report."""
    directory = Path(directory or reset_dir())
    rec = Recorder()
    started, t0 = records.now(), time.monotonic()
    log.bind(kind="reset", step=step.name)
    try:
        checkpoint = step.checkpoint(directory, rec)
        request = read_request(directory)
        if request is None or request.run_id != checkpoint.run_id:
            request = None
        log.bind(request=checkpoint.run_id, operation=(request.requested_by if request else "") or checkpoint.run_id,
                 uid=request.uid if request else None)
        ctx = context_from(checkpoint.recorded, all_wg=checkpoint.all_wg, directory=str(directory),
                           tables=tuple(checkpoint.tables), **ctx_overrides)
        holdpoint.hold(directory, f"reset-{step.name}")
        step.work(ctx, directory, checkpoint.run_id, rec)
    except OpsError as e:
        rec.fail(None, e)
    except Exception as e:  # a bug: keep the traceback in the journal, and still write a report
        log.error(traceback.format_exc().rstrip())
        rec.fail(None, OpsError(Reason.EXECUTION_FAILED, f"unexpected error: {type(e).__name__}: {describe_error(e)}"))
    report = StepReport(
        step=step.name, number=step.number, phase=step.phase, title=step.title, unit=step.unit, run_id=rec.run_id,
        result="failed" if rec.failed else "succeeded",
        reason=(rec.reasons[0] if rec.reasons else Reason.SUCCEEDED).value,
        removed=rec.removed, absent=rec.absent, failed=[FailedItem(**f) for f in rec.failed], notes=rec.notes,
        forced=rec.forced, started_at=started, finished_at=records.now(), seconds=round(time.monotonic() - t0, 3))
    write_report(report, directory)
    return report


def exit_code(report: StepReport) -> int:
    """Log the step's one-line outcome and map it to the executable's exit code."""
    if report.succeeded:
        log.info(f"succeeded: {len(report.removed)} removed, {len(report.absent)} already absent", result=report.result,
                 reason=report.reason)
        return 0
    first = report.first_failure()
    log.error(f"failed ({first.reason}): {first.error}", result=report.result, reason=first.reason)
    return Reason(report.reason).exit_code
