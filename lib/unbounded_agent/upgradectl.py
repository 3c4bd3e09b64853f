"""`unbounded-agent upgrade URL [--sha256 HEX] [--wait] [--force]` and `unbounded-agent rollback [--wait]`.

Both only record the request and start the unit chain (upgrade.start_upgrade / start_rollback);
with --wait they follow the record with a live progress line and exit 0 only once the new binary is
committed, otherwise with the code of the failure's reason (reasons.py).
"""

from __future__ import annotations

import argparse
import sys

from . import log
from .reasons import OpsError


def add_upgrade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="release archive (.tar.gz holding one member, unbounded-agent)")
    p.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the archive (64 hex digits, optional sha256: prefix)")
    p.add_argument("--wait", action="store_true", help="follow the upgrade until it is committed or rolled back")
    p.add_argument("--force", action="store_true", help="accept a release that was rolled back before (quarantined)")
    p.add_argument("--operation", help=argparse.SUPPRESS)  # a name for the record (the watcher passes the MOP's)


def add_rollback_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="follow the rollback until it is committed or rolled back")
    p.add_argument("--force", action="store_true", help="go back even to a quarantined binary")


def upgrade_command(args) -> int:
    from . import config, upgrade

    log.set_prefix("unbounded-agent upgrade")
    try:
        cfg = config.load()
        rec = upgrade.start_upgrade(cfg, args.url, sha256=args.sha256, force=args.force, operation=args.operation)
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code
    return _started(cfg, rec, args.wait)


def rollback_command(args) -> int:
    from . import config, upgrade

    log.set_prefix("unbounded-agent rollback")
    try:
        cfg = config.load()
        rec = upgrade.start_rollback(cfg, force=args.force)
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code
    return _started(cfg, rec, args.wait)


def _started(cfg, rec: dict, wait: bool) -> int:
    from . import upgrade

    unit = upgrade.entry_unit(rec["instance"]) if rec.get("instance") else None
    print(f"{rec['kind']} {rec['operation']} started" + (f" ({unit})" if unit else ""), flush=True)
    if not wait:
        if rec.get("phase") in upgrade.TERMINAL:  # this operation was already finished
            (print if rec.get("phase") == upgrade.COMMITTED else log.error)(upgrade.describe(rec))
            return upgrade.exit_code(rec)
        print(f"follow it with: unbounded-agent status, or journalctl -u 'unbounded-upgrade*' -u unbounded-agent-daemon-recovery")
        return 0
    line = ProgressLine(sys.stdout)
    try:
        rec = upgrade.follow(cfg, rec["operation"], on_change=line.update)
    except OpsError as e:
        line.done()
        log.error(str(e))
        return e.reason.exit_code
    line.done()
    if rec.get("phase") == upgrade.COMMITTED:
        print(upgrade.describe(rec), flush=True)
    else:
        log.error(upgrade.describe(rec))
    return upgrade.exit_code(rec)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


class ProgressLine:
    """One line rewritten in place on a terminal; elsewhere (a pipe, the journal) one line per phase —
    taken from the record's history, so a phase shorter than the polling interval is still shown —
    and per tenth of the download."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.seen = 0  # history entries already shown
        self.last = None

    def _text(self, rec: dict, phase: str) -> str:
        text = f"{rec.get('kind', 'upgrade')} {rec.get('operation')}: {phase}"
        p = rec.get("progress") or {}
        if phase == "staging" and (p.get("bytes") or p.get("total")):
            text += f", {_mb(p.get('bytes') or 0)} / {_mb(p.get('total'))} downloaded"
        elif phase == "probation":
            text += " (daemon restarted; watching it)"
        return text

    def update(self, rec: dict) -> None:
        history = rec.get("history") or []
        for i, entry in enumerate(history[self.seen:], self.seen):
            if entry["phase"] == "staging" and i == len(history) - 1 and rec.get("phase") == "staging":
                continue  # shown with its progress just below
            self._emit(self._text(rec, entry["phase"]), (entry["phase"],))
        self.seen = len(history)
        if rec.get("phase") == "staging":  # the download as it goes
            p = rec.get("progress") or {}
            got, total = p.get("bytes") or 0, p.get("total")
            self._emit(self._text(rec, "staging"), ("staging", int(10 * got / total) if total else got // (10 << 20)))

    def _emit(self, text: str, key: tuple) -> None:
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
        elif key != self.last:
            print(text, file=self.out, flush=True)
        self.last = key

    def done(self) -> None:
        if self.tty and self.last is not None:
            self.out.write("\n")
            self.out.flush()
