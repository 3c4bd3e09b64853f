"""``unbounded-agent-reset-begin.service``, first unit of both phases: write the "resetting" checkpoint for
the run the dispatcher asked for (or resume the one an interrupted reset left), so every later step knows
the run and where the agent's files are."""

from __future__ import annotations

from ... import records
from ..reports import Checkpoint, read_checkpoint, read_report, read_request, write_checkpoint
from ..step import Step, recorded_paths


class Begin(Step):
    name, number, phase = "begin", 0, 0
    title = "write the 'resetting' checkpoint for this run"
    verify_after = False

    def checkpoint(self, directory, rec):
        """The run is the reset that holds the host: begin writes its checkpoint."""
        from ... import hostlock
        from ...reasons import OpsError, Reason

        who = hostlock.holder()
        if who is None or who.kind != "reset":
            raise OpsError(Reason.HOST_LOCKED, "no reset is running on this host: reset steps run only for a reset "
                           "the dispatcher runs (unbounded-agent reset)"
                           + (f"; the host is held by {who.describe()}" if who else ""))
        rec.run_id = who.operation
        return start_run(who.operation, directory, rec)

    def work(self, ctx, directory, run_id, rec):
        pass  # the checkpoint is the work


def start_run(run_id: str, directory, rec) -> Checkpoint:
    """Create the checkpoint for run_id (or resume the one an interrupted reset left) and durably write it
    before any step unit is allowed to start."""
    request = read_request(directory)
    checkpoint = read_checkpoint(directory)
    if checkpoint is None:
        checkpoint = Checkpoint(created_at=records.now(), recorded=recorded_paths())
        if checkpoint.recorded.config_error:
            rec.note(checkpoint.recorded.config_error)
        r = checkpoint.recorded
        rec.note(f"checkpoint written: resetting (agent bin dir {r.bin_dir}, state dir {r.state_dir})")
    elif checkpoint.run_id != run_id:
        rec.note(f"resuming the interrupted reset begun at {checkpoint.created_at}")
    else:  # begin again in the same run (phase 2, or a restarted dispatcher): keep what it said before
        earlier = read_report(STEP.number, STEP.name, directory)
        if earlier is not None and earlier.run_id == run_id:
            rec.notes.extend(earlier.notes)
    checkpoint.run_id = run_id
    checkpoint.all_wg = bool(request and request.run_id == run_id and request.all_wg)
    write_checkpoint(checkpoint, directory)
    return checkpoint


STEP = Begin()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
