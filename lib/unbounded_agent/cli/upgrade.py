"""``unbounded-agent upgrade URL [--sha256 HEX] [--wait] [--force]``, ``unbounded-agent rollback [--wait]``,
and ``unbounded-upgrade@<URL>.service`` (``systemctl start`` of a URL, or of ``rollback``).

All three check what can be checked at once (a bad URL or digest is refused and nothing is queued), submit
a request to the operation queue and — with --wait, and always for the unit — follow it: a line per phase
from the upgrade record, then the result. The exit code is 0 only once the new binary is committed,
otherwise the code of the failure's reason (reasons.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import log
from ..reasons import OpsError, Reason

POLL_SECONDS = 0.2
QUEUE_HINT_SECONDS = 10.0
# systemd 252's journal refuses the output stream of a unit whose name is 255 characters long (the most a unit
# name may be): such an entry unit would queue the upgrade and then die on its first line, unheard.
JOURNALED_UNIT_NAME_MAX = 254


def add_upgrade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="release archive (.tar.gz holding one member, unbounded-agent)")
    p.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the archive (64 hex digits, optional sha256: prefix)")
    p.add_argument("--wait", action="store_true", help="follow the upgrade until it is committed or rolled back")
    p.add_argument("--force", action="store_true", help="accept a release that was rolled back before (quarantined)")


def add_rollback_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="follow the rollback until it is committed or rolled back")
    p.add_argument("--force", action="store_true", help="go back even to a quarantined binary")


def upgrade_command(args) -> int:
    log.set_prefix("unbounded-agent upgrade")
    return _run("upgrade", args.url, args.sha256, args.force, args.wait, "cli")


def rollback_command(args) -> int:
    log.set_prefix("unbounded-agent rollback")
    return _run("rollback", "", None, args.force, args.wait, "cli")


def unit_main(argv: list[str] | None = None) -> int:
    """``unbounded-upgrade@<instance>.service``: the instance (%I) is the URL, or ``rollback``."""
    from .. import program

    ap = program.parser("unbounded-upgrade", __doc__)
    ap.add_argument("target", metavar="URL|rollback", help="the unit's instance, unescaped (%%I)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    log.set_prefix("unbounded-upgrade")
    refused = _unit_name_refused()
    if refused:
        return refused
    if args.target == "rollback":
        return _run("rollback", "", None, False, True, "systemctl")
    return _run("upgrade", args.target, None, False, True, "systemctl")


def _unit_name_refused() -> int:
    """An entry unit whose name the journal would not take refuses at once, saying why through syslog (its own
    output would be lost), and queues nothing. 0 when the name is fine."""
    from ..upgrade.units import own_unit

    unit = own_unit()
    if unit is None or len(unit) <= JOURNALED_UNIT_NAME_MAX:
        return 0
    import syslog

    syslog.openlog("unbounded-upgrade")
    syslog.syslog(syslog.LOG_ERR, f"{Reason.INVALID_PARAMETERS.value}: the unit name is {len(unit)} characters long, "
                                  f"more than the {JOURNALED_UNIT_NAME_MAX} the journal takes; nothing was queued: "
                                  "upgrade from this URL with `unbounded-agent upgrade URL` instead")
    return Reason.INVALID_PARAMETERS.exit_code


def _run(kind: str, url: str, sha256: str | None, force: bool, wait: bool, source: str) -> int:
    from .. import config
    from ..queue.spool import Request, Spool, new_id

    try:
        cfg = config.load()
        if kind == "upgrade":
            from .. import urls

            url = urls.validate(url, allow_http=cfg.allow_insecure_http)
            sha256 = urls.parse_sha256(sha256)
        if os.geteuid() != 0:
            raise OpsError(Reason.INVALID_PARAMETERS, f"an {kind} changes the host: run it as root")
        spool = Spool()
        req = spool.submit(Request(id=new_id(kind), kind=kind, source=source, url=url, sha256=sha256, force=force))
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code
    log.bind(operation=req.name, request=req.id, kind=kind)
    print(f"{kind} {req.id} queued", flush=True)
    if not wait:
        print(f"follow it with: unbounded-agent status, or journalctl UNBOUNDED_OPERATION={req.name} -f")
        return 0
    line = ProgressLine(sys.stdout)
    try:
        result = follow(cfg, spool, req.id, on_record=line.update, on_waiting=line.waiting)
    except OpsError as e:
        line.done()
        log.error(str(e))
        return e.reason.exit_code
    line.done()
    (print if result.succeeded else log.error)(result.describe())
    return result.exit_code()


def follow(cfg, spool, id: str, on_record=None, on_waiting=None, poll: float = POLL_SECONDS):
    """Wait for request id's result; on the way, pass the upgrade record to on_record whenever it changes
    and, while the request waits in the queue, what it waits behind to on_waiting."""
    from ..upgrade.record import Store

    store = Store(cfg)
    queued_since = time.monotonic()
    seen = None
    while True:
        result = spool.result(id)
        if result is not None:
            rec = store.read()
            if on_record and rec is not None and rec.id == id:
                on_record(rec)
            return result
        state = spool.state(id)
        if state is None:
            raise OpsError(Reason.EXECUTION_FAILED, f"request {id} left the queue without a result")
        if state == "queued":
            if on_waiting:
                ahead = [r for _, r in spool.queue() if r.id != id]
                on_waiting(ahead[0] if ahead else None, time.monotonic() - queued_since)
        elif on_record:
            rec = store.read()
            if rec is not None and rec.id == id and (rec.phase, rec.updated_at) != seen:
                seen = (rec.phase, rec.updated_at)
                on_record(rec)
        time.sleep(poll)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


class ProgressLine:
    """One line rewritten in place on a terminal; elsewhere (a pipe, the journal) one line per phase — taken
    from the record's history, so a phase shorter than the polling interval is still shown — and per tenth
    of the download."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.seen = 0  # history entries already shown
        self.last = None
        self.hinted = False

    def waiting(self, ahead, seconds: float) -> None:
        if ahead is not None:  # with nothing ahead it is about to run: no line for that
            self._emit(f"queued behind {ahead.kind} {ahead.name}", ("queued", ahead.id))
        if seconds >= QUEUE_HINT_SECONDS and ahead is None and not self.hinted:
            self.hinted = True
            log.warn("nothing runs the queue yet: is unbounded-agent-requests.path active? "
                     "(systemctl status unbounded-agent-requests.path unbounded-agent-dispatch)")

    def _text(self, rec, phase: str) -> str:
        text = f"{rec.kind} {rec.operation}: {phase}"
        p = rec.progress
        if phase == "staging" and p and (p.bytes or p.total):
            text += f", {_mb(p.bytes or 0)} / {_mb(p.total)} downloaded"
        elif phase == "probation":
            text += " (daemon restarted; watching it)"
        return text

    def update(self, rec) -> None:
        history = rec.history
        for i, entry in enumerate(history[self.seen:], self.seen):
            if entry.phase == "staging" and i == len(history) - 1 and rec.phase == "staging":
                continue  # shown with its progress just below
            self._emit(self._text(rec, entry.phase), (entry.phase,))
        self.seen = len(history)
        if rec.phase == "staging":  # the download as it goes
            p = rec.progress
            got, total = (p.bytes or 0, p.total) if p else (0, None)
            self._emit(self._text(rec, "staging"), ("staging", int(10 * got / total) if total else got // (10 << 20)))

    def _emit(self, text: str, key: tuple) -> None:
        if key == self.last:
            return
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
        else:
            print(text, file=self.out, flush=True)
        self.last = key

    def done(self) -> None:
        if self.tty and self.last is not None:
            self.out.write("\n")
            self.out.flush()
