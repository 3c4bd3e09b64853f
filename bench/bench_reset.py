#!/usr/bin/env python3
"""`make bench` (reset part): wall time of `unbounded-agent reset` with both machines running.

    python3 bench/bench_reset.py [--deb dist/unbounded-agent_<VERSION>_all.deb] [--runs 3]

Boots a test host, installs the .deb, and for each run makes the host look bootstrapped (kube1 and
kube2 running, links, keys, rules, routes, the agent), then times one full reset (queued by the CLI, run by
the dispatcher: both phases, every step, daemon stop, verification). Also prints each step's
own time from its report, and the time of a second reset on the clean host.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests" / "support"
sys.path.insert(0, str(TESTS))

import testhost_tree  # noqa: E402
from bootstrapped_host import bootstrap, result_of, run_reset, snapshot  # noqa: E402
from testhost import boot_testhost  # noqa: E402


def main() -> int:
    root = REPO
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path,
                    default=root / "dist" / f"unbounded-agent_{(root / 'VERSION').read_text().strip()}_all.deb")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not args.deb.is_file():
        print(f"bench_reset: {args.deb} not found: run `make deb` first", file=sys.stderr)
        return 2
    walls, clean_walls = [], []
    with boot_testhost("bench-reset", testhost_tree.build_tree()) as host:
        host.install_deb(args.deb)
        for i in range(args.runs):
            fx = bootstrap(host)
            snap = snapshot(host)
            assert snap["machine kube1"] and snap["machine kube2"], "both machines must run before the reset"
            started = time.monotonic()
            code, report, stderr = run_reset(host, toolset=True)
            walls.append(time.monotonic() - started)
            if code != 0:
                print(f"reset failed (exit {code}):\n{stderr}", file=sys.stderr)
                return 1
            left = fx.items - fx.gone(snapshot(host))
            assert not left, f"left after reset: {left}"
            steps = "  ".join(f"{s['step']} {s.get('seconds', 0):.2f}" for s in report["steps"])
            res = result_of(host, report["run_id"])
            print(f"run {i + 1}: reset wall time {walls[-1]:.2f} s (the CLI's {report['seconds']:.2f} s: "
                  f"{res['queued_seconds']:.2f} s queued, {res['seconds']:.2f} s run by the dispatcher)\n"
                  f"  steps (s): {steps}")
            started = time.monotonic()
            code, _, _ = run_reset(host, toolset=True)
            clean_walls.append(time.monotonic() - started)
    print(f"reset with kube1+kube2 running: median {statistics.median(walls):.2f} s, "
          f"min {min(walls):.2f} s, max {max(walls):.2f} s over {len(walls)} runs")
    print(f"reset of an already clean host: median {statistics.median(clean_walls):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
