"""``unbounded-agent reset [--dry-run] [--json] [--all-wg]``: queue a reset and show each step as it finishes.

The steps run in their own units (reset/), started by the dispatcher under the host-operation lock:
phase 1 (steps 1-6, the removal of the agent's files, and their verification) first, with the daemon
running; phase 2 (stop and disable the daemon, daemon-reload, the final check) only when every phase-1
step succeeded. This process only submits the request and reads back the reports the steps write and
the result the dispatcher writes.

Phase 1 deletes the agent binary this command may be running from (the agent's zipapp, whose modules are
imported lazily from the file): everything needed after that is imported before the request is queued.
The toolset's own copy, /usr/libexec/unbounded-agent/unbounded-agent, stays.
"""

from __future__ import annotations

import json
import os
import time

from .. import log
from ..reasons import OpsError, Reason

POLL_SECONDS = 0.2
TOOLSET_CLI = "/usr/libexec/unbounded-agent/unbounded-agent"


def add_arguments(ap) -> None:
    ap.add_argument("--dry-run", action="store_true", help="print exactly what would be stopped and removed; change nothing")
    ap.add_argument("--json", action="store_true", help="a structured report (removed / already absent / failed, per step)")
    ap.add_argument("--all-wg", action="store_true",
                    help="also remove every wg<N> link (the docs' broad form), not only the agent's wg51820-wg51899, "
                         "and flush every table of 51820-51899, an operator's wg-quick tunnel's included")


def command(args) -> int:
    log.set_prefix("unbounded-agent reset")
    try:
        if args.dry_run:
            return dry_run(args.all_wg, args.json)
        return run(args.all_wg, args.json)
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code


def _preload() -> None:
    # Imported now, while the agent binary still exists (see the module docstring).
    from .. import config, fsutil, hostlock, layout, records, systemd  # noqa: F401
    from ..queue import spool  # noqa: F401
    from ..reset import reports, step, steps  # noqa: F401

    steps.all_steps()


def _context(all_wg: bool):
    from ..reset import reports, step

    checkpoint = reports.read_checkpoint()
    return step.context_from(checkpoint.recorded if checkpoint else step.recorded_paths(), all_wg=all_wg)


def say(text: str) -> None:
    """One line at a time, also into a pipe or the journal: each step as it finishes, not all at the end."""
    print(text, flush=True)


def dry_run(all_wg: bool, as_json: bool, out=say) -> int:
    from ..reset.dryrun import dry_run as plan

    ctx = _context(all_wg)
    steps = plan(ctx)
    errors = [s for s in steps if s.get("error")]
    if as_json:
        out(json.dumps({"dry_run": True, "all_wg": all_wg, "steps": steps}, indent=2))
    else:
        out("unbounded-agent reset --dry-run: nothing is changed. A reset would:")
        for s in steps:
            out(f"  [{s['number']}/8] {s['step']}: {s['title']}")
            if s.get("error"):
                out(f"      cannot tell: {s['error']} (the real step would fail closed)")
            for item in s["items"]:
                out(f"      {item['action']} {item['what']} {item['note']}".rstrip())
            for item in s["goes_with"]:
                out(f"      (goes with {item['goes_with']}) {item['what']}")
            if not s["items"] and not s["goes_with"] and not s.get("error"):
                out("      nothing to do" if s["step"] != "reload-systemd" else "      daemon-reload")
        if ctx.machine_name:
            out(f"Afterwards: kubectl delete node {ctx.machine_name}")
    return Reason(errors[0]["reason"]).exit_code if errors else 0


class _Shown:
    """The step lines of one run, as their reports arrive."""

    def __init__(self, run_id: str, as_json: bool, out):
        from ..reset.steps import all_steps

        self.run_id, self.as_json, self.out = run_id, as_json, out
        self.steps = all_steps()
        self.reports: dict[str, object] = {}
        self.mtimes: dict[str, int | None] = {}

    def poll(self) -> None:
        from ..reset import reports

        for s in self.steps:
            mtime = reports.report_mtime(s.number, s.name)
            if mtime is None or self.mtimes.get(s.name) == mtime:
                continue
            self.mtimes[s.name] = mtime
            report = reports.read_report(s.number, s.name)
            if report is None or report.run_id != self.run_id:
                continue
            first = s.name not in self.reports
            self.reports[s.name] = report
            if first or not report.succeeded:
                self._show(s, report)

    def _show(self, s, report) -> None:
        if self.as_json:
            return
        label = f"[{s.number}/8] {s.name}" if 1 <= s.number <= 8 else f"      {s.name}"
        if report.succeeded:
            done = ", ".join(report.removed) if report.removed else "nothing to remove"
            if s.name in ("begin", "verify", "reload-systemd", "finish"):
                done = report.notes[-1] if report.notes else ""
            line = f"  {label:<32} ok    {done}"
            if report.forced:
                line += f" (terminated after the graceful stop timed out: {', '.join(report.forced)})"
        else:
            f = report.first_failure()
            line = f"  {label:<32} FAIL  {f.reason}: {f.error}"
            if report.removed:
                line += f" (did remove: {', '.join(report.removed)})"
        self.out(line)


def run(all_wg: bool, as_json: bool, out=say) -> int:
    from .. import records
    from ..queue.spool import Request, Spool, new_id
    from ..reset import step

    _preload()
    if os.geteuid() != 0:
        raise OpsError(Reason.INVALID_PARAMETERS, "a reset changes the host: run it as root (sudo unbounded-agent reset)")
    try:
        checkpoint_paths = _context(False)
        machine_name = checkpoint_paths.machine_name
    except OpsError:
        machine_name = step.recorded_paths().machine_name
    spool = Spool()
    req = spool.submit(Request(id=new_id("reset"), kind="reset", source="cli", all_wg=all_wg))
    shown = _Shown(req.id, as_json, out)
    started = time.monotonic()
    if not as_json:
        out(f"unbounded-agent reset (request {req.id}): queued")
    while True:
        shown.poll()
        result = spool.result(req.id)
        if result is not None:
            shown.poll()
            break
        if spool.state(req.id) is None:
            raise OpsError(Reason.EXECUTION_FAILED, f"request {req.id} left the queue without a result")
        time.sleep(POLL_SECONDS)
    seconds = round(time.monotonic() - started, 3)
    follow_up = [f"kubectl delete node {machine_name}" if machine_name else "kubectl delete node <this machine's name>",
                 "reboot (optional: clears anything a reset cannot, such as kernel state)"]
    if as_json:
        steps = [records.to_dict(shown.reports[s.name]) if s.name in shown.reports
                 else {"step": s.name, "number": s.number, "phase": s.phase, "result": "not-run"} for s in shown.steps]
        out(json.dumps({"run_id": req.id, "result": "succeeded" if result.succeeded else "failed",
                        "reason": result.reason, "message": result.message, "machine_name": machine_name,
                        "seconds": seconds, "phase2_ran": any(s.phase == 2 and s.name in shown.reports for s in shown.steps),
                        "steps": steps, "follow_up": follow_up if result.succeeded else []}, indent=2))
    elif result.succeeded:
        out(f"reset complete in {seconds:.1f} s: the agent, its machines, links, keys and routing are gone from this host.")
        out("The toolset package stays; the reset does not remove the Kubernetes Node. Next:")
        for line in follow_up:
            out(f"  {line}")
    else:
        out(f"reset incomplete ({result.reason}): {result.message}")
        out("Fix the cause and run `unbounded-agent reset` again: finished steps find nothing to do"
            f" (if the agent binary is gone already: {TOOLSET_CLI} reset).")
    return result.exit_code()

