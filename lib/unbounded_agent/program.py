"""The shape every small executable in bin/ shares: name its program, parse its arguments, run one
library call, and turn the outcome into the journal line and the exit code (reasons.Reason)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import log
from .reasons import OpsError


def run(name: str, fn: Callable[..., object], *args, config: bool = True) -> int:
    """Call fn(cfg, *args) (or fn(*args) with config=False) and map an OpsError to its exit code."""
    log.set_prefix(name)
    try:
        if config:
            from . import config as config_module

            fn(config_module.load(), *args)
        else:
            fn(*args)
    except OpsError as e:
        log.error(str(e), result="failed", reason=e.reason.value)
        return e.reason.exit_code
    return 0


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of the module's docstring."""
    return argparse.ArgumentParser(prog=name, description=(doc or "").split("\n\n")[0])


def instance_main(name: str, doc: str | None, fn: Callable[..., object], argv: list[str] | None = None) -> int:
    """A step of a templated unit: its one argument is the unit's instance (%i), the operation id."""
    ap = parser(name, doc)
    ap.add_argument("id", metavar="ID", help="the operation id (the unit's instance, %%i)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    log.bind(request=args.id)
    return run(name, fn, args.id)


def plain_main(name: str, doc: str | None, fn: Callable[..., object], argv: list[str] | None = None) -> int:
    """A step without arguments."""
    parser(name, doc).parse_args(sys.argv[1:] if argv is None else argv)
    return run(name, fn)
