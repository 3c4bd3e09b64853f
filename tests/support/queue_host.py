"""The operation queue on a test host, as a user reaches it: the CLI, systemctl, and the files it leaves.

    rid = submit(host, "upgrade", url)          # `unbounded-agent upgrade URL` (no --wait): the request id
    rid = submit_reset(host)                    # `unbounded-agent reset`, left running in a unit of its own
    res = wait_result(host, rid)                # results/<id>.json once the dispatcher wrote it
    hold(host, "unbounded-agent-dispatch.service", "dispatch-claimed"); wait_held(host, OPS, "dispatch-claimed")
"""

from __future__ import annotations

import json
import re

from holds import hold, unhold  # noqa: F401  (re-exported: the tests take them from here)
from waiting import wait_until

OPS = "/var/lib/unbounded-agent-ops"
RESET_DIR = f"{OPS}/reset"
STATE = "/var/lib/unbounded-agent"
DISPATCH = "unbounded-agent-dispatch.service"
PATH_UNIT = "unbounded-agent-requests.path"


def submit(host, command: str, *args: str) -> str:
    """`unbounded-agent upgrade|rollback ...` without --wait; the id of the queued request."""
    r = host.run(["unbounded-agent", command, *args], check=False, timeout=60)
    m = re.search(rf"^{command} (\S+) queued$", r.stdout, re.M)
    assert r.returncode == 0 and m, f"{command} was not queued: {r.stdout}{r.stderr}"
    return m[1]


TOOLSET_CLI = "/usr/libexec/unbounded-agent/unbounded-agent"


def submit_reset(host, unit: str = "cli-reset", program: str = "unbounded-agent") -> str:
    """`unbounded-agent reset` as an operator starts it, in a unit of its own so the test goes on; its id.
    program=TOOLSET_CLI: the toolset's own copy, for when the agent binary is a test script."""
    host.run(["systemd-run", f"--unit={unit}", "--collect", program, "reset"])

    def queued():
        out = host.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False).stdout
        m = re.search(r"\(request (reset-\S+)\): queued", out)
        return m[1] if m else None

    return wait_until("the reset to be queued", queued, timeout=60)


def result(host, rid: str) -> dict | None:
    p = host.path(f"{OPS}/results/{rid}.json")
    return json.loads(p.read_text()) if p.exists() else None


def wait_result(host, rid: str, timeout: float = 300) -> dict:
    return wait_until(f"the result of {rid}", lambda: result(host, rid), timeout=timeout)


def queue_files(host) -> list[str]:
    return host.run(["ls", f"{OPS}/spool/requests"], check=False).stdout.split()


def unit_show(host, unit: str, props: str = "ActiveState,SubState,Result,MainPID") -> dict:
    out = host.run(["systemctl", "show", unit, "-p", props]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_held(host, directory: str, point: str, timeout: float = 120) -> int:
    """The pid of the program paused at point (its marker is <directory>/test-hold/<point>)."""
    marker = host.path(f"{directory}/test-hold/{point}")
    wait_until(f"a program to reach hold point {point}", marker.exists, timeout)
    return int(marker.read_text())


def release(host, directory: str, point: str) -> None:
    host.path(f"{directory}/test-hold/{point}").unlink(missing_ok=True)


AGENT_PATHS = (STATE, "/etc/unbounded/agent")
AGENT_UNITS = ("unbounded-agent-daemon.service", "unbounded-agent-daemon-recovery.service",
               "unbounded-upgrade-probation.service")


def agent_left(host) -> list[str]:
    """What of the agent a reset should have removed and is there (files, running or enabled units)."""
    left = [p for p in AGENT_PATHS if host.run(["test", "-e", p], check=False).returncode == 0]
    # (/usr/bin/unbounded-agent stays, the package's: with the agent binary gone it runs the toolset's own CLI)
    for unit in AGENT_UNITS:
        st = unit_show(host, unit, "ActiveState,UnitFileState")
        if st["ActiveState"] not in ("inactive", "failed"):
            left.append(f"{unit} {st['ActiveState']}")
        if st["UnitFileState"] == "enabled":
            left.append(f"{unit} enabled")
    running = host.run(["systemctl", "list-units", "--no-legend", "--plain", "--state=active,activating",
                        "unbounded-upgrade*"], check=False).stdout.split("\n")
    left += [line.split()[0] for line in running if line.strip()]
    return left
