"""Logging for the journal: one message per call, tagged with the operation it belongs to.

Under systemd — stderr is the journal stream that ``JOURNAL_STREAM`` names — a message goes through the
journal's native protocol (Debian's python3-systemd) with a stable ``SYSLOG_IDENTIFIER`` (the program's
name), a ``PRIORITY`` and the structured fields of its operation, so that

    journalctl UNBOUNDED_OPERATION=<operation>

shows one operation across all its units (the dispatcher, each step, the watcher). Anywhere else (a
terminal, a pipe, a test), and when the journal socket cannot be reached or python3-systemd is missing, it
is one line on stderr with the program's name as prefix, as before.

The fields come from a context set where they become known: ``context`` around one operation (the
dispatcher per request, the watcher per MachineOperation), ``bind`` as a program learns more (a step from
its record or checkpoint; inside a ``context`` block only until the block ends), and keyword arguments per
message (``result=``, ``reason=``). A context belongs to its thread. Values are names, ids, versions and
reasons only: never a URL or anything else that may carry a secret.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator

# keyword -> journal field
FIELDS = {
    "operation": "UNBOUNDED_OPERATION",  # the name the host knows it by (`unbounded-agent status`, results)
    "request": "UNBOUNDED_REQUEST",  # the request id: the instance of its units
    "uid": "UNBOUNDED_OPERATION_UID",  # the MachineOperation's uid, when one asked for it
    "kind": "UNBOUNDED_KIND",  # upgrade, rollback, reset
    "step": "UNBOUNDED_STEP",  # stage, preflight, switch, probation, recovery, a reset step's name
    "result": "UNBOUNDED_RESULT",  # succeeded or failed, on the line that says how something ended
    "reason": "UNBOUNDED_REASON",  # reasons.Reason
    "from_version": "UNBOUNDED_FROM_VERSION",
    "to_version": "UNBOUNDED_TO_VERSION",
}
PRIORITY = {"error": 3, "warning": 4, "info": 6}

_prefix = "unbounded-agent"
_identifier = "unbounded-agent"
_fields: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("unbounded_agent_log", default=None)
_send = None  # systemd.journal.send once imported; False when python3-systemd is missing


def set_prefix(name: str) -> None:
    """The program's name: the prefix of stderr lines and, up to its first space, the SYSLOG_IDENTIFIER."""
    global _prefix, _identifier
    _prefix, _identifier = name, name.split()[0]


def _clean(fields: dict) -> dict[str, str]:
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown log field(s): {', '.join(sorted(unknown))}")
    return {k: str(v) for k, v in fields.items() if v is not None and v != ""}


def bind(**fields) -> None:
    """Tag every later message of this thread (None or "" removes a field); inside a ``context`` block, until
    the block ends."""
    merged = {k: v for k, v in (_fields.get() or {}).items() if k not in fields}
    _fields.set({**merged, **_clean(fields)})


@contextlib.contextmanager
def context(**fields) -> Iterator[None]:
    """Tag the messages of this thread inside the block, on top of the fields already bound."""
    token = _fields.set({**(_fields.get() or {}), **_clean(fields)})
    try:
        yield
    finally:
        _fields.reset(token)


def current(**fields) -> dict[str, str]:
    """The fields a message logged here would carry (keyword -> value)."""
    return {**(_fields.get() or {}), **_clean(fields)}


def info(msg: str, **fields) -> None:
    _emit("info", msg, fields)


def warn(msg: str, **fields) -> None:
    _emit("warning", msg, fields)


def error(msg: str, **fields) -> None:
    _emit("error", msg, fields)


def _to_journal() -> bool:
    """Whether stderr is the journal stream systemd connected this service to (sd_journal_stream_fd(3))."""
    spec = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in spec.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):  # unset, not ours, or stderr replaced (a test's capture)
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _journal_send():
    global _send
    if _send is None:
        try:
            from systemd import journal  # python3-systemd, not this package's systemd module
        except ImportError:
            _send = False
        else:
            _send = journal.send
    return _send or None


def _emit(level: str, msg: str, fields: dict) -> None:
    tags = current(**fields)
    send = _journal_send() if _to_journal() else None
    if send is not None:
        caller = sys._getframe(2)
        try:
            send(msg, PRIORITY=PRIORITY[level], SYSLOG_IDENTIFIER=_identifier, CODE_FILE=caller.f_code.co_filename,
                 CODE_LINE=caller.f_lineno, CODE_FUNC=caller.f_code.co_name,
                 **{FIELDS[k]: v for k, v in tags.items()})
            return
        except OSError:
            pass  # the journal socket is unavailable: the stream still reaches the journal
    label = "" if level == "info" else f"{level}: "
    print(f"{_prefix}: {label}{msg}", file=sys.stderr, flush=True)
