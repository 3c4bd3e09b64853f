#!/usr/bin/env python3
"""The reset's figure: `unbounded-agent reset` with both machines (kube1, kube2) running, against the same
removals typed by hand. Part of `make bench` (bench/bench.py); runs alone too:

    python3 bench/bench_reset.py [--deb dist/unbounded-agent_<VERSION>_all.deb] [--runs 5]

Boots a test host, installs the .deb, and for each run makes the host look bootstrapped (kube1 and kube2
running, links, keys, rules, routes, the agent; tests/support/bootstrapped_host.py), then times one full reset
(queued by the CLI, run by the dispatcher: both phases, every step, the daemon's stop, the verification), from
the CLI's start to its exit. The baseline makes the host bootstrapped again and removes the same items with a
shell script (systemctl disable --now, umount, rm -rf, ip link/rule/route, daemon-reload); both must leave
nothing of the fixture behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "lib"))

import bootstrapped_host as bh  # noqa: E402
import testhost_tree  # noqa: E402
from hostbench import Figure, table  # noqa: E402
from testhost import boot_testhost  # noqa: E402


def by_hand_script() -> str:
    machines = [f"systemd-nspawn@{m}.service" for m in bh.AGENT_MACHINES]
    lines = ["set -e", f"systemctl disable --now {' '.join(machines)}", f"umount {bh.BIND_TARGET}"]
    lines += [f"ip link del {name}" for name in bh.AGENT_LINKS]
    lines += [f"ip -{fam} rule del pref {pref} lookup {table}" for fam, table, pref, _ in bh.AGENT_RULES]
    tables = sorted({t for _, t, _ in bh.AGENT_ROUTES})
    lines += [f"ip -{fam} route flush table {t} 2>/dev/null || true" for t in tables for fam in "46"]
    lines += ["systemctl disable --now unbounded-agent-daemon.service",
              "rm -rf " + " ".join(p for p in bh.AGENT_FILES),
              "systemctl daemon-reload"]
    return "\n".join(lines)


def measure(deb: Path, runs: int, log=print) -> list[Figure]:
    walls, hand, clean = [], [], []
    with boot_testhost("bench-reset", testhost_tree.build_tree()) as host:
        host.install_deb(deb)
        for i in range(runs):
            fx = bh.bootstrap(host)
            started = time.monotonic()
            code, report, stderr = bh.run_reset(host, toolset=True)
            walls.append(time.monotonic() - started)
            if code != 0:
                raise SystemExit(f"reset failed (exit {code}):\n{stderr}")
            left = fx.items - fx.gone(bh.snapshot(host))
            assert not left, f"left after reset: {left}"
            steps = "  ".join(f"{s['step']} {s.get('seconds', 0):.2f}" for s in report["steps"])
            started = time.monotonic()
            bh.run_reset(host, toolset=True)
            clean.append(time.monotonic() - started)

            fx = bh.bootstrap(host)
            started = time.monotonic()
            host.run(["sh", "-c", by_hand_script()], timeout=600)
            hand.append(time.monotonic() - started)
            left = fx.items - fx.gone(bh.snapshot(host))
            assert not left, f"left after the reset by hand: {left}"
            log(f"  run {i + 1}: reset {walls[-1]:.2f} s (steps, s: {steps}), by hand {hand[-1]:.2f} s")
    return [Figure("reset, kube1 + kube2 running: CLI start → exit", "s", walls,
                   "by hand: disable --now, umount, rm -rf, ip, daemon-reload", hand),
            Figure("second reset of a clean host (a no-op)", "s", clean)]


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
