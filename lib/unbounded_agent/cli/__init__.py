"""The `unbounded-agent` program: parses the command line and calls one module per subcommand.

Heavy modules are imported inside the subcommand that needs them, so `version` stays instant. The
commands that change the host (``upgrade``, ``rollback``, ``reset``) only submit a request to the
operation queue and follow it; the dispatcher runs it (queue/dispatch.py).
"""

import argparse
import json
import sys

from .. import log
from ..reasons import OpsError


def _cmd_version(args) -> int:
    from ..version import VERSION

    print(f"unbounded-agent {VERSION}")
    return 0


def _cmd_status(args) -> int:
    from .. import config
    from . import status

    st = status.collect(config.load())
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else status.render(st))
    return 0


def _cmd_daemon(args) -> int:
    from .. import config, daemon

    log.set_prefix("unbounded-agent-daemon")
    return daemon.run(config.load())


def _cmd_reset(args) -> int:
    from . import reset

    return reset.command(args)


def _cmd_upgrade(args) -> int:
    from . import upgrade

    return upgrade.upgrade_command(args)


def _cmd_rollback(args) -> int:
    from . import upgrade

    return upgrade.rollback_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unbounded-agent", description="The Unbounded cluster agent.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("version", help="print the version and exit").set_defaults(func=_cmd_version)
    s = sub.add_parser("status", help="show slots, links, the operation queue, the last results and the daemon")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_status)
    sub.add_parser("daemon", help="run the agent daemon (started by unbounded-agent-daemon.service)").set_defaults(
        func=_cmd_daemon
    )
    from . import reset, upgrade  # small: their heavy imports are inside their functions

    r = sub.add_parser("reset", help="return this host to its pre-bootstrap state (queued; runs the reset units)")
    reset.add_arguments(r)
    r.set_defaults(func=_cmd_reset)
    u = sub.add_parser("upgrade", help="upgrade the agent from a release URL (blue-green, with probation and rollback)")
    upgrade.add_upgrade_arguments(u)
    u.set_defaults(func=_cmd_upgrade)
    rb = sub.add_parser("rollback", help="go back to unbounded-agent-last-good (same switch, probation and commit)")
    upgrade.add_rollback_arguments(rb)
    rb.set_defaults(func=_cmd_rollback)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code


if __name__ == "__main__":
    sys.exit(main())
