"""`unbounded-agent reset`: run the reset units and show each step as it finishes.

The steps run in their own units (see reset.py and units/unbounded-agent-reset-*), not in this
process: phase 1 (steps 1-6) first; phase 2 (steps 7-8 and the final verification, which stop
and remove the agent) only when every phase-1 step succeeded, so that a failed reset leaves a
working agent to run it again with. This process only starts the two targets over D-Bus, waits
for their jobs, and reads back the reports the steps write.

Phase 2 deletes the binary this command may be running from (the agent's zipapp, whose modules
are imported lazily from the file): everything needed after that is imported before it starts.
"""

from __future__ import annotations

import json
import os
import sys
import time

from . import log, reset
from .reasons import OpsError, Reason, describe_error

POLL = 0.2
TOOLSET_RESET = "/usr/libexec/unbounded-agent/unbounded-reset"


def _preload() -> None:
    # Imported now, while the agent binary still exists (see the module docstring).
    from . import config, fsutil, hostlock, layout, machines, netlinks, routing, treeremove  # noqa: F401
    from pystemd.systemd1 import Manager, Unit  # noqa: F401


def _manager():
    from pystemd.systemd1 import Manager

    m = Manager()
    m.load()
    return m


def _unit_info(name: str) -> dict:
    from pystemd.systemd1 import Unit

    with Unit(name.encode()) as u:
        info = {"load_state": u.Unit.LoadState.decode(), "active_state": u.Unit.ActiveState.decode()}
        if name.endswith(".service") and info["load_state"] == "loaded":
            info["result"] = u.Service.Result.decode()
            info["exit_status"] = int(u.Service.ExecMainStatus)
    return info


def _context_for_dry_run(all_wg: bool) -> reset.Context:
    checkpoint = reset.read_checkpoint()
    recorded = checkpoint.get("recorded", {}) if checkpoint else reset.recorded_paths()
    return reset.context_from(recorded, all_wg=all_wg)


def dry_run(all_wg: bool, as_json: bool, out=print) -> int:
    ctx = _context_for_dry_run(all_wg)
    steps = reset.dry_run(ctx)
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


class _Run:
    def __init__(self, run_id: str, as_json: bool, out):
        self.run_id = run_id
        self.as_json = as_json
        self.out = out
        self.reports: dict[str, dict] = {}

    def say(self, text: str) -> None:
        if not self.as_json:
            self.out(text)

    def phase(self, number: int, target: str) -> bool:
        """Start one phase target, show its steps as they finish; True if all succeeded."""
        steps = reset.steps_of_phase(number)
        before = {s.name: _mtime(reset.report_path(s)) for s in steps}
        manager = _manager()
        job = manager.Manager.StartUnit(target.encode(), b"replace")
        shown: set[str] = set()
        while True:
            running = any(j[4] == job for j in manager.Manager.ListJobs())
            for s in steps:
                if s.name in shown:
                    continue
                if _mtime(reset.report_path(s)) == before[s.name]:
                    continue
                report = reset.read_report(s)
                if report and report.get("run_id") == self.run_id:
                    self._show(s, report)
                    shown.add(s.name)
            if not running:
                break
            time.sleep(POLL)
        ok = True
        for s in steps:
            if s.name not in shown:  # never reported: not started, or killed before it could write
                self._show(s, self._unreported(s))
            ok = ok and self.reports[s.name]["result"] == "succeeded"
        return ok

    def _unreported(self, s: reset.Step) -> dict:
        try:
            info = _unit_info(s.unit)
        except Exception as e:
            info = {"result": f"unknown ({describe_error(e)})"}
        result = info.get("result", "")
        if result in ("", "success") and info.get("active_state") == "inactive":
            why = "did not run (a unit it requires failed, or the job was cancelled)"
        else:
            why = f"ended without a report (unit result: {result}, exit status {info.get('exit_status')})"
        return {"step": s.name, "number": s.number, "phase": s.phase, "unit": s.unit, "run_id": self.run_id,
                "result": "failed", "reason": Reason.EXECUTION_FAILED.value, "removed": [], "absent": [], "notes": [],
                "failed": [{"item": None, "reason": Reason.EXECUTION_FAILED.value, "error": why}]}

    def _show(self, s: reset.Step, report: dict) -> None:
        if s.name == "begin" and "begin" in self.reports and report["result"] == "succeeded":
            return  # phase 2's begin only confirms phase 1's: show it only if it failed
        self.reports[s.name] = report
        label = f"[{s.number}/8] {s.name}" if 1 <= s.number <= 8 else f"      {s.name}"
        if report["result"] == "succeeded":
            done = ", ".join(report["removed"]) if report["removed"] else "nothing to remove"
            if s.name in ("begin", "verify", "reload-systemd"):
                done = report["notes"][-1] if report["notes"] else ""
            line = f"  {label:<32} ok    {done}"
            if report.get("forced"):
                line += f" (terminated after the graceful stop timed out: {', '.join(report['forced'])})"
        else:
            f = report["failed"][0] if report["failed"] else {"reason": report["reason"], "error": "failed"}
            line = f"  {label:<32} FAIL  {f['reason']}: {f['error']}"
            if report["removed"]:
                line += f" (did remove: {', '.join(report['removed'])})"
        self.say(line)


def _mtime(path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _busy_units() -> list[str]:
    manager = _manager()
    names = {s.unit for s in reset.STEPS} | {reset.PHASE1_TARGET, reset.PHASE2_TARGET, "unbounded-agent-reset.target"}
    return sorted(j[1].decode() for j in manager.Manager.ListJobs() if j[1].decode() in names)


def run(all_wg: bool, as_json: bool, out=print) -> int:
    _preload()
    if os.geteuid() != 0:
        raise OpsError(Reason.INVALID_PARAMETERS, "a reset changes the host: run it as root (sudo unbounded-agent reset)")
    try:
        phase1 = _unit_info(reset.PHASE1_TARGET)
    except Exception as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot reach systemd over D-Bus: {describe_error(e)}") from None
    if phase1["load_state"] != "loaded":
        raise OpsError(Reason.EXECUTION_FAILED,
                       f"{reset.PHASE1_TARGET} is {phase1['load_state']}: the toolset package (unbounded-agent) is not installed")
    busy = _busy_units()
    if busy:
        raise OpsError(Reason.HOST_LOCKED, f"a reset is already running ({', '.join(busy)}); wait for it to finish")
    try:
        machine_name = reset.context_from((reset.read_checkpoint() or {}).get("recorded") or reset.recorded_paths()).machine_name
    except OpsError:
        machine_name = ""
    run_id = reset.write_request(all_wg, requested_by="unbounded-agent reset")
    r = _Run(run_id, as_json, out)
    started = time.monotonic()
    r.say(f"unbounded-agent reset (run {run_id})")
    r.say("phase 1: machines, links, keys, nspawn config, machine trees, routing (the agent keeps running)")
    ok1 = r.phase(1, reset.PHASE1_TARGET)
    ok2 = False
    if ok1:
        r.say("phase 2: stop and remove the agent, reload systemd, verify")
        ok2 = r.phase(2, reset.PHASE2_TARGET)
    seconds = round(time.monotonic() - started, 3)
    ok = ok1 and ok2
    follow_up = [f"kubectl delete node {machine_name}" if machine_name else "kubectl delete node <this machine's name>",
                 "reboot (optional: clears anything a reset cannot, such as kernel state)"]
    if as_json:
        steps = [r.reports.get(s.name) or {"step": s.name, "number": s.number, "phase": s.phase, "result": "not-run"}
                 for s in reset.STEPS]
        first = next((s for s in steps if s["result"] != "succeeded"), None)
        out(json.dumps({"run_id": run_id, "result": "succeeded" if ok else "failed",
                        "reason": Reason.SUCCEEDED.value if ok else (first.get("reason") or Reason.RESET_INCOMPLETE.value),
                        "machine_name": machine_name, "seconds": seconds, "phase2_ran": ok1,
                        "steps": steps, "follow_up": follow_up if ok else []}, indent=2))
    elif ok:
        out(f"reset complete in {seconds:.1f} s: the agent, its machines, links, keys and routing are gone from this host.")
        out("The toolset package stays; the reset does not remove the Kubernetes Node. Next:")
        for line in follow_up:
            out(f"  {line}")
    elif not ok1:
        out("reset incomplete: a phase-1 step failed (see above); the agent was left installed and running.")
        out("Fix the cause and run `unbounded-agent reset` again: finished steps find nothing to do.")
    else:
        out("reset incomplete: a phase-2 step failed (see above). The agent binary may already be gone:")
        out(f"run `{TOOLSET_RESET}` (from the toolset package) again to finish.")
    if ok:
        return 0
    failed = [r.reports[s.name] for s in reset.STEPS if s.name in r.reports and r.reports[s.name]["result"] != "succeeded"]
    return Reason(failed[0]["reason"]).exit_code if failed else Reason.RESET_INCOMPLETE.exit_code


def main(argv: list[str] | None = None) -> int:
    """The toolset's own entry (bin/unbounded-reset): the same command, usable after phase 2 removed the agent."""
    import argparse

    log.set_prefix("unbounded-reset")
    ap = argparse.ArgumentParser(prog="unbounded-reset", description="Reset this host (as `unbounded-agent reset`).")
    add_arguments(ap)
    args = ap.parse_args(argv)
    return command(args)


def add_arguments(ap) -> None:
    ap.add_argument("--dry-run", action="store_true", help="print exactly what would be stopped and removed; change nothing")
    ap.add_argument("--json", action="store_true", help="a structured report (removed / already absent / failed, per step)")
    ap.add_argument("--all-wg", action="store_true",
                    help="also remove every wg<N> link (the docs' broad form), not only the agent's wg51820-wg51899")


def command(args) -> int:
    try:
        if args.dry_run:
            return dry_run(args.all_wg, args.json)
        return run(args.all_wg, args.json)
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code


if __name__ == "__main__":
    sys.exit(main())
