#!/usr/bin/env python3
"""`make bench`: every speed and memory figure in one table, with the machine it ran on.

    python3 bench/bench.py [--runs 5] [--deb dist/unbounded-agent_<VERSION>_all.deb] [--only upgrade,stage,reset,mop]
                           [--write bench/results.md]

Each figure is the median of --runs runs taken in this invocation, next to its baseline's median over as many
runs (the minimum done by hand, or a bare Python process). Then the upgrade's time line, step by step, from the
upgrade record's phase history, systemd's journal and the daemon's timestamps. Nothing here is asserted by the
tests: how fast something runs depends on the machine (and on what else runs on it: the load average is shown).

    upgrade  bench_upgrade.py  upgrade vs by hand, rollback, executables' start-up, daemon without a kubeconfig
    stage    bench_stage.py    the stage's download + extract in a fresh process, 50 MB vs 500 MB: peak RSS
    reset    bench_reset.py    reset with kube1 and kube2 running vs by hand
    mop      bench_mop.py      MachineOperation created → stage unit starting; the daemon with a kubeconfig
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostbench  # noqa: E402
from hostbench import REPO, Figure, table  # noqa: E402

PARTS = ("upgrade", "stage", "reset", "mop")


def stage_figures(runs: int) -> list[Figure]:
    import bench_stage

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="unbounded-agent-bench-") as d:
        rows = bench_stage.stage_rows([50, 500], Path(d) / "stage", runs=runs)
    floor = rows[0][6]
    out = []
    for name, _dl, _ex, total, _rss, ok, peaks in rows[1:]:
        out.append(Figure(f"stage peak RSS, {name} (download + extract {total} s{'' if ok == 'ok' else ', ' + ok})",
                          "MiB", [k / 1024 for k in peaks], "the same imports, no work", [k / 1024 for k in floor]))
    if len(rows) == 3:
        growth = (rows[2][4] - rows[1][4]) / 1024
        out[-1].target = "flat (< 16 MiB above 50 MB's)"
        out[-1].met = growth < 16
        out[-1].note = f"{growth:+.1f} MiB against 50 MB"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (default 5); medians are shown")
    ap.add_argument("--deb", type=Path,
                    default=REPO / "dist" / f"unbounded-agent_{(REPO / 'VERSION').read_text().strip()}_all.deb")
    ap.add_argument("--only", default=",".join(PARTS), help="parts to run, comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--mb", type=int, default=50, help="size of the agent the upgrade downloads (MB)")
    ap.add_argument("--write", type=Path, help="also write the table, the machine and the time line here (Markdown)")
    args = ap.parse_args()
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown or args.runs < 1:
        ap.error(f"unknown parts {sorted(unknown)}" if unknown else "--runs must be at least 1")
    if not args.deb.is_file() and set(parts) - {"stage"}:
        print(f"bench: {args.deb} not found: run `make deb` first", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    machine = hostbench.machine()
    started = time.monotonic()
    figures: list[Figure] = []
    line = ""
    if "upgrade" in parts:
        import bench_upgrade

        log("upgrade host ...")
        up, line = bench_upgrade.measure(args.deb, args.runs, args.mb, log)
        figures += up
    if "stage" in parts:
        log("stage, 50 MB and 500 MB ...")
        figures += stage_figures(args.runs)
    if "reset" in parts:
        import bench_reset

        log("reset host ...")
        figures += bench_reset.measure(args.deb, args.runs, log)
    if "mop" in parts:
        import bench_mop

        log("MachineOperation host ...")
        figures += bench_mop.measure(args.deb, args.runs, log)
    machine["load average at end"] = hostbench.load_average()
    machine["bench wall time"] = f"{time.monotonic() - started:.0f} s"

    text = "## Machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in machine.items())
    text += f"\n\n## Figures (median of {args.runs} runs each)\n\n" + table(figures)
    notes = [f"- {f.what}: {f.note}" for f in figures if f.note]
    if notes:
        text += "\n\n" + "\n".join(notes)
    if line:
        text += f"\n\n## Where the upgrade's time goes ({args.mb} MB agent, median of {args.runs} runs)\n\n" + line
    print(text)
    if args.write:
        args.write.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
