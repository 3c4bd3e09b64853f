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


# What each command does, beyond its one-line help: `unbounded-agent COMMAND --help` prints it, and the
# man page (packaging/manpage.py) is generated from this parser.
_STATUS = ("Show the active slot, the current and last-good binaries with their versions, the pending upgrade, "
           "the operation queue, the last results and the daemon's state.")
_DAEMON = ("Run the agent daemon: the MachineOperation watcher. It lists and watches the cluster's "
           "MachineOperations (unbounded-cloud.io/v1alpha3) for this machine only, queues each AgentUpgrade and "
           "AgentReset exactly once, and reports phase, conditions and Events on the operation from its result. It "
           "reports readiness to systemd after its first list (or after readyWithoutApiSeconds when the API server "
           "cannot be reached) and feeds a watchdog it arms itself. Without a kubeconfig or an in-cluster service "
           "account it stays ready and idle.")
_RESET = ("Queue an AgentReset and show each step as it finishes: stop the machines kube1 and kube2, remove the "
          "agent's links, WireGuard keys, nspawn configuration, machine trees and images, routing (the tables of the "
          "agent's wg links only) and the agent's own files, verify, and only then stop and disable the agent daemon "
          "(the units unbounded-agent-reset-phase1.target and unbounded-agent-reset-phase2.target). When the agent "
          "is gone, /usr/libexec/unbounded-agent/unbounded-agent (the toolset's own copy of this program) runs the "
          "same reset again.")
_UPGRADE = ("Queue an AgentUpgrade (the units unbounded-upgrade@.service): download and validate the release archive "
            "into the inactive slot, check that it runs, switch unbounded-agent-current to it, restart the daemon and "
            "keep it on probation; a daemon that fails probation is rolled back to unbounded-agent-last-good and its "
            "archive quarantined.")
_ROLLBACK = "Go back to unbounded-agent-last-good on purpose, through the same switch, probation and commit as an upgrade."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unbounded-agent", description="The Unbounded cluster agent.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("version", help="print the version and exit").set_defaults(func=_cmd_version)
    s = sub.add_parser("status", help="show slots, links, the operation queue, the last results and the daemon",
                       description=_STATUS)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_status)
    sub.add_parser("daemon", help="run the agent daemon (started by unbounded-agent-daemon.service)",
                   description=_DAEMON).set_defaults(func=_cmd_daemon)
    from . import reset, upgrade  # small: their heavy imports are inside their functions

    r = sub.add_parser("reset", help="return this host to its pre-bootstrap state (queued; runs the reset units)",
                       description=_RESET)
    reset.add_arguments(r)
    r.set_defaults(func=_cmd_reset)
    u = sub.add_parser("upgrade", help="upgrade the agent from a release URL (blue-green, with probation and rollback)",
                       description=_UPGRADE)
    upgrade.add_upgrade_arguments(u)
    u.set_defaults(func=_cmd_upgrade)
    rb = sub.add_parser("rollback", help="go back to unbounded-agent-last-good (same switch, probation and commit)",
                        description=_ROLLBACK)
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
