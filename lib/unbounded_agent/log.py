"""Journal-friendly logging: one line per message on stderr, with the program's name as prefix.

systemd puts a unit's stderr into the journal, so no syslog or journal API is needed.
"""

import sys

_prefix = "unbounded-agent"


def set_prefix(name: str) -> None:
    global _prefix
    _prefix = name


def info(msg: str) -> None:
    print(f"{_prefix}: {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"{_prefix}: warning: {msg}", file=sys.stderr, flush=True)


def error(msg: str) -> None:
    print(f"{_prefix}: error: {msg}", file=sys.stderr, flush=True)
