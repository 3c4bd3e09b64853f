"""`make demo` chapter: a fleet upgrade — one MachineOperation with machineSelector, rolled through three hosts in
waves by the fan-out controller, and a crashing release halted after its canary.

run(host, say, deb) boots two more test hosts next to the demo host and installs the .deb on them; each host has
its own agent daemon and identity. One test API server (in a test network bridged to the three hosts) holds a
Machine per host, labelled pool=demo. The demo host doubles as the management host: the controller's unit,
installed disabled by the package, is given a kubeconfig and enabled. Then, with kubectl only:
  1. an AgentUpgrade to 3.0.0 for pool=demo (canaryCount 1, maxInFlight 2): the canary first, then the other
     two together; `kubectl get mop -o wide` shows the ROLLOUT counts, `kubectl describe` an Event per wave;
  2. an AgentUpgrade to a release whose daemon crashes: the canary rolls back (DaemonFailed), the rollout halts
     (Failed/Halted, naming it), and the other two hosts are never given a child: they keep 3.0.0.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "demo", REPO / "tests" / "support", REPO / "lib"):  # run from demo.py as a script
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import releases  # noqa: E402
import testhost_tree  # noqa: E402
from demo_mop import apply, ensure_agent, kubectl  # noqa: E402
from fleet_host import (  # noqa: E402
    CONTROLLER,
    CONTROLLER_DIR,
    children,
    fleet_link,
    install_controller,
    parent,
    start_controller,
    version,
    wait_leader,
)
from mop_host import wait_until  # noqa: E402
from testhost import boot_testhost  # noqa: E402

from demo import show  # noqa: E402

TERMINAL = ("Complete", "Failed")


def watch_parent(link, name: str, timeout: float = 600) -> str:
    """`kubectl get mop -o wide -w`, printed live, until the parent is Complete or Failed."""
    print("$ kubectl get mop -o wide -w", flush=True)
    proc = subprocess.Popen(link.command("get", "mop", "-o", "wide", "-w"), env=link.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    phase, deadline = "", time.monotonic() + timeout
    try:
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            cells = line.split()
            if cells and cells[0] == name and len(cells) > 2 and cells[2] in TERMINAL:  # MACHINE empty: 3rd cell
                phase = cells[2]
                break
            if time.monotonic() > deadline:
                break
    finally:
        proc.terminate()
        proc.wait(10)
    print("^C", flush=True)
    return phase


def versions(hosts) -> None:
    for h in hosts:
        show(h, ["unbounded-agent", "version"])


def run(host, say, deb: Path) -> None:
    ensure_agent(host, say)  # the MachineOperations chapter ends with a reset of this host
    work = Path(tempfile.mkdtemp(prefix="demo-fleet-"))
    say("Fleet operations: two more hosts, each with the .deb and its own agent daemon")
    with contextlib.ExitStack() as stack:
        tree = testhost_tree.build_tree()
        hosts = [host] + [stack.enter_context(boot_testhost(f"{host.name}-{i}", tree)) for i in (2, 3)]
        for h in hosts[1:]:
            h.install_deb(deb)
            show(h, ["systemctl", "is-active", "unbounded-agent-daemon"])
        link = fleet_link(hosts, work, pool="demo")
        stack.callback(link.stop)
        print(f"API server at {link.server.url} (in the test network); each agent is unbounded-agent:<host>",
              flush=True)
        kubectl(link, "get", "machines", "--show-labels")

        say(f"The management host ({host.name}): the controller's unit, installed disabled, enabled with a kubeconfig")
        show(host, ["systemctl", "is-enabled", CONTROLLER])
        install_controller(link, host)
        show(host, ["cat", f"{CONTROLLER_DIR}/config.yaml"])
        start_controller(host)
        wait_leader(link, host)
        show(host, ["systemctl", "status", "--no-pager", "--lines=4", CONTROLLER])
        kubectl(link, "get", "lease", "-n", "unbounded-system")

        say("Building two releases: 3.0.0 (`make release`), and 9.1.0 whose daemon crashes at start")
        good = releases.real_release(REPO, "3.0.0", work / "3.0.0")
        crash = releases.script_release(work / "crash.tar.gz", version="9.1.0", daemon="crash")
        for h in hosts:  # the same URL on each host: its own release server
            urls = {"good": h.serve(good, "agent-3.0.0.tar.gz"), "crash": h.serve(crash, "agent-9.1.0.tar.gz")}
        versions(hosts)

        say("One operation for the pool: canaryCount 1, maxInFlight 2 — the canary alone, then the other two")
        apply(link, parent("upgrade-pool-demo", urls["good"], pool="demo", canaryCount="1", maxInFlight="2"))
        watch_parent(link, "upgrade-pool-demo")
        kubectl(link, "get", "mop", "-o", "wide")
        kubectl(link, "describe", "mop", "upgrade-pool-demo")
        versions(hosts)

        say("A release whose daemon crashes: the canary rolls back, the rollout halts, the others are never touched")
        apply(link, parent("upgrade-pool-crash", urls["crash"], pool="demo", canaryCount="1", maxInFlight="2"))
        watch_parent(link, "upgrade-pool-crash")
        wait_until("the canary's daemon back", lambda: version(host) == "3.0.0", timeout=120)
        kubectl(link, "get", "mop", "-o", "wide")
        kubectl(link, "get", "mop", "-l", "unbounded-cloud.io/fleet-parent=upgrade-pool-crash")
        print(f"(children of upgrade-pool-crash: {', '.join(children(link, 'upgrade-pool-crash')) or 'none'})",
              flush=True)
        kubectl(link, "describe", "mop", "upgrade-pool-crash")
        versions(hosts)
        show(host, ["systemctl", "disable", "--now", CONTROLLER])
        say("Done with the fleet: the two extra hosts are powered off")
