#!/usr/bin/env python3
"""`make bench` (upgrade part): the time of each AgentUpgrade step for a 50 MB agent, and the stage
step's peak memory for a 50 MB and a 500 MB archive (streaming: it must not grow with the size).

    python3 bench/bench_upgrade.py [--deb dist/unbounded-agent_<VERSION>_all.deb] [--small-mb 50] [--big-mb 500]

Boots a test host, installs the .deb, serves padded real releases over the host's HTTPS server and runs
`unbounded-agent upgrade URL --wait`. Step times come from the upgrade record's history (each step
stamps its phase when it starts and finishes); the probation window is the configured 5 s.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests" / "support"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO / "lib"))

import releases  # noqa: E402
import testhost_tree  # noqa: E402
from testhost import boot_testhost  # noqa: E402
from upgrade_host import prepare, record, request_id, result, upgrade  # noqa: E402

CONFIG = """\
probationSeconds: 5
readyTimeoutSeconds: 30
maxArchiveBytes: 1073741824
maxExtractedBytes: 1073741824
"""
STEPS = [("requested", "staging", "start of the chain (switch@ started → stage runs)"),
         ("staging", "staged", "stage: download + sha256 + extract + rename"),
         ("staged", "preflighted", "preflight: `version` in the sandbox"),
         ("preflighted", "switching", "switch unit start"),
         ("switching", "probation", "switch: record, links, restart requested"),
         ("probation", "committed", "probation: ready + stable window, commit")]


def times(rec: dict) -> dict:
    at = {h["phase"]: h["t"] for h in rec["history"]}
    return {label: at[b] - at[a] for a, b, label in STEPS if a in at and b in at}


def run_one(host, url: str, what: str) -> dict:
    started = time.monotonic()
    r = upgrade(host, url, "--wait", timeout=1800)
    wall = time.monotonic() - started
    if r.returncode:
        raise SystemExit(f"{what}: upgrade failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    rec, res = record(host), result(host, request_id(r))
    print(f"\n{what}: archive {rec['progress']['total'] / 1e6:.1f} MB, `unbounded-agent upgrade --wait` took {wall:.2f} s")
    print(f"  {res['queued_seconds']:7.2f} s  in the queue (submitted → claimed by the dispatcher)")
    for label, seconds in times(rec).items():
        print(f"  {seconds:7.2f} s  {label}")
    print(f"  {res['seconds']:7.2f} s  the dispatcher's run (claimed → result written)")
    print(f"  stage peak RSS: {rec['stage_peak_rss_kib'] / 1024:.1f} MiB")
    return {"wall": wall, "queued": res["queued_seconds"], "dispatched": res["seconds"], "steps": times(rec),
            "peak_kib": rec["stage_peak_rss_kib"], "bytes": rec["progress"]["total"]}


def main() -> int:
    root = REPO
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path,
                    default=root / "dist" / f"unbounded-agent_{(root / 'VERSION').read_text().strip()}_all.deb")
    ap.add_argument("--small-mb", type=int, default=50)
    ap.add_argument("--big-mb", type=int, default=500)
    args = ap.parse_args()
    if not args.deb.is_file():
        print(f"bench_upgrade: {args.deb} not found: run `make deb` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        print(f"building padded releases ({args.small_mb} MB, {args.big_mb} MB) ...", flush=True)
        small = releases.padded_release(root, "2.0.0", Path(tmp) / "small", args.small_mb << 20)
        big = releases.padded_release(root, "3.0.0", Path(tmp) / "big", args.big_mb << 20)
        with boot_testhost("bench-upgrade", testhost_tree.build_tree()) as host:
            prepare(host, args.deb, CONFIG)
            urls = {"small": host.serve(small, "small.tar.gz"), "big": host.serve(big, "big.tar.gz")}
            a = run_one(host, urls["small"], f"{args.small_mb} MB agent")
            b = run_one(host, urls["big"], f"{args.big_mb} MB agent")
    growth = (b["peak_kib"] - a["peak_kib"]) / 1024
    print(f"\nstage peak memory: {a['peak_kib'] / 1024:.1f} MiB for {a['bytes'] / 1e6:.0f} MB, "
          f"{b['peak_kib'] / 1024:.1f} MiB for {b['bytes'] / 1e6:.0f} MB (difference {growth:+.1f} MiB)")
    print(json.dumps({"small": a, "big": b}))
    return 0 if growth < 16 else 1  # flat: a few MiB of noise, never the archive's size


if __name__ == "__main__":
    sys.exit(main())
