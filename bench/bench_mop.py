#!/usr/bin/env python3
"""The watcher's figures, on a test host whose daemon talks to the test API server (tests/support/mop_host.py):
the daemon's time to ready and RSS with a kubeconfig (client-certificate auth), and MachineOperation created →
host operation started, against the same operation queued by `unbounded-agent upgrade URL`. Part of
`make bench` (bench/bench.py); runs alone too:

    python3 bench/bench_mop.py [--deb dist/unbounded-agent_<VERSION>_all.deb] [--runs 5]

"Created" is the API server's time of the `kubectl apply` that created the MachineOperation (the request it
logged); "started" is systemd's "Starting" of the operation's stage unit in the host's journal (as
tests/host/test_mop_upgrade_with_kubectl.py prints it). The baseline starts its clock just before
`unbounded-agent upgrade URL` runs in the host. Releases alternate between two real ones (`make release`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "lib"))

import releases  # noqa: E402
import testhost_tree  # noqa: E402
from hostbench import Figure, floor_daemon_timed, restart_daemon_timed, table  # noqa: E402
from mop_host import KubeLink, mop, unit_started_at, wait_until  # noqa: E402
from testhost import boot_testhost  # noqa: E402
from upgrade_host import settle  # noqa: E402

# What the daemon's client imports (kube/client.py) when a kubeconfig is configured.
KUBE_IMPORTS = "from kubernetes import client, config"


def created_at(kube, name: str) -> float:
    return next(r.time for r in kube.server.requests
                if r.verb == "create" and r.resource == "machineoperations" and r.name in (name, None, ""))


def measure(deb: Path, runs: int, log=print) -> list[Figure]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        built = {v: releases.real_release(REPO, v, Path(tmp) / v) for v in ("2.0.0", "3.0.0")}
        with boot_testhost("bench-mop", testhost_tree.build_tree()) as host:
            host.install_deb(deb)
            kube = KubeLink.start(host, Path(tmp))
            try:
                kube.apply({"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                            "metadata": {"name": host.name}, "spec": {}})
                kube.configure_agent(host)
                urls = {v: host.serve(p, f"agent-{v}.tar.gz") for v, p in built.items()}

                log("daemon with a kubeconfig: time to ready and RSS ...")
                ours = []
                for _ in range(runs):
                    kube.server.clear_requests()
                    ours.append(restart_daemon_timed(host))
                floor = [floor_daemon_timed(host, imports=KUBE_IMPORTS) for _ in range(runs)]
                floor_what = "python3 -I notify service importing the kubernetes client"
                figures = [Figure("daemon: process start → READY=1 (kubeconfig, first list)", "ms",
                                  [1000 * r for r, _ in ours], floor_what, [1000 * r for r, _ in floor]),
                           Figure("daemon RSS once ready (kubeconfig)", "MiB", [k / 1024 for _, k in ours], floor_what,
                                  [k / 1024 for _, k in floor], "< 40 MiB",
                                  statistics.median(k / 1024 for _, k in ours) < 40)]

                log(f"MachineOperation created → stage unit starting, {runs} runs, each paired with the CLI ...")
                mops, cli = [], []
                for i in range(runs):
                    v = ("3.0.0", "2.0.0")[i % 2]
                    name = f"bench-upgrade-{i}"
                    kube.server.clear_requests()
                    kube.apply(mop(name, host.name, "AgentUpgrade", downloadURL=urls[v]))
                    wait_until(f"{name} to end", lambda n=name: (kube.get(n).get("status") or {}).get("phase")
                               in ("Complete", "Failed"), timeout=300)
                    assert kube.get(name)["status"]["phase"] == "Complete", kube.get(name)["status"]
                    created = created_at(kube, name)
                    mops.append(unit_started_at(host, "unbounded-upgrade-stage@*", after=created) - created)
                    settle(host)

                    v = ("2.0.0", "3.0.0")[i % 2]
                    t0 = time.time()
                    host.run(["unbounded-agent", "upgrade", urls[v]])
                    rec = settle(host)
                    cli.append(unit_started_at(host, "unbounded-upgrade-stage@*", after=t0) - t0)
                    assert rec["phase"] == "committed", rec["phase"]
                    log(f"  run {i + 1}: MachineOperation {1000 * mops[-1]:.0f} ms, CLI {1000 * cli[-1]:.0f} ms")
                figures.insert(0, Figure("MachineOperation created → stage unit starting", "ms",
                                         [1000 * s for s in mops], "`unbounded-agent upgrade URL` → stage unit starting",
                                         [1000 * s for s in cli]))
            finally:
                kube.stop()
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path,
                    default=REPO / "dist" / f"unbounded-agent_{(REPO / 'VERSION').read_text().strip()}_all.deb")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(table(measure(args.deb, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
