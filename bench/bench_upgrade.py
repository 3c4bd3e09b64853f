#!/usr/bin/env python3
"""The upgrade's figures, on one test host with the .deb installed: upgrade against the minimum done by hand,
rollback after a crash, the start-up of each small executable, and the daemon's time to ready and RSS without a
kubeconfig. Part of `make bench` (bench/bench.py); runs alone too:

    python3 bench/bench_upgrade.py [--deb dist/unbounded-agent_<VERSION>_all.deb] [--runs 5] [--mb 50]

The upgrade is timed from `systemctl start unbounded-upgrade@<URL>.service` (the unit runs
`unbounded-upgrade`, which queues the request like `unbounded-agent upgrade URL --wait`) until the new binary
runs as the active daemon: its invocation's ActiveEnterTimestampMonotonic (Type=notify: READY=1). Probation is
excluded. Releases alternate between two padded real releases of the same size, so each run changes the binary.
The baseline runs on the same host, served by the same HTTPS server: `curl | tar`, a `version` run of the new
binary, `ln -sfn` + `mv -T` of the current link, `systemctl restart` of the daemon — timed the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
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
from hostbench import (  # noqa: E402
    DAEMON,
    Figure,
    floor_daemon_timed,
    journal_entries,
    mono_to_epoch,
    reset_start_limit,
    restart_daemon_timed,
    rfc3339,
    show,
    table,
    when,
)
from testhost import HTTPS_PORT, boot_testhost  # noqa: E402
from upgrade_host import BIN, escape, prepare, record, result, settle  # noqa: E402

# probation is outside the measure: short, so that the runs follow each other quickly
CONFIG = """\
probationSeconds: 2
readyTimeoutSeconds: 30
maxArchiveBytes: 1073741824
maxExtractedBytes: 1073741824
"""
CURRENT = f"{BIN}/unbounded-agent-current"
HAND_DIR = f"{BIN}/by-hand"
CURL_DIR = "/opt/bench-curl"

# (label, start, end): names are record phases, or "<step>@" for systemd's "Starting" of that step's unit,
# "t0" (systemctl start), "queued"/"claimed" (the dispatcher's result), "exec"/"active" (the new daemon).
TIMELINE = [
    ("systemctl start → request queued (entry unit, its Python, the submit)", "t0", "queued"),
    ("queued → claimed (path unit starts the dispatcher)", "queued", "claimed"),
    ("claimed → requested (lock, checks, record)", "claimed", "requested"),
    ("requested → stage unit starting (chain of three jobs queued)", "requested", "stage@"),
    ("stage unit starting → staging (exec, imports, record)", "stage@", "staging"),
    ("staging → staged (download, hash, extract, rename)", "staging", "staged"),
    ("staged → preflight unit starting", "staged", "preflight@"),
    ("preflight unit → preflighted (sandbox, imports, `version`)", "preflight@", "preflighted"),
    ("preflighted → switch unit starting", "preflighted", "switch@"),
    ("switch unit starting → switching (exec, imports, record)", "switch@", "switching"),
    ("switching → probation (links, record)", "switching", "probation"),
    ("probation → old daemon stopping (restart job)", "probation", "stopping"),
    ("old daemon stopping → its last line (SIGTERM handled)", "stopping", "stopped-line"),
    ("its last line → stopped (exit, ExecStopPost= hook)", "stopped-line", "stopped"),
    ("stopped → new daemon's process (start job, sandbox, exec)", "stopped", "exec"),
    ("new daemon's process → active (READY=1)", "exec", "active"),
]


def install_curl(host) -> None:
    """The test host has no curl: this machine's, with the libraries it links (both are Debian 12)."""
    libs = subprocess.run(["ldd", "/usr/bin/curl"], capture_output=True, text=True, check=True).stdout
    host.put("/usr/bin/curl", f"{CURL_DIR}/curl", mode=0o755)
    for line in libs.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].split() and parts[1].split()[0].startswith("/"):
            lib = parts[1].split()[0]
            if not Path(lib).name.startswith(("libc.so", "libm.so", "ld-linux")):
                host.put(lib, f"{CURL_DIR}/{Path(lib).name}")
    host.run(["sh", "-c", f"LD_LIBRARY_PATH={CURL_DIR} {CURL_DIR}/curl --version >/dev/null"])


def by_hand(host, name: str) -> float:
    """The baseline upgrade; seconds from its start to the new daemon's READY=1."""
    script = (f"set -e; rm -rf {HAND_DIR}; mkdir -p {HAND_DIR}; "
              f"LD_LIBRARY_PATH={CURL_DIR} {CURL_DIR}/curl -sSf https://localhost:{HTTPS_PORT}/{name} "
              f"| tar -xzf - -C {HAND_DIR}; "
              f"{HAND_DIR}/unbounded-agent version >/dev/null; "
              f"ln -sfn {HAND_DIR}/unbounded-agent {BIN}/.by-hand-link && mv -T {BIN}/.by-hand-link {CURRENT}; "
              f"systemctl restart {DAEMON}")
    reset_start_limit(host)
    before = show(host, DAEMON, "InvocationID")["InvocationID"]
    t0 = time.time()
    host.run(["sh", "-c", script], timeout=600)
    d = show(host, DAEMON, "InvocationID", "ActiveEnterTimestampMonotonic")
    assert d["InvocationID"] != before, "the daemon was not restarted"
    return mono_to_epoch(d["ActiveEnterTimestampMonotonic"]) - t0


def put_back(host, slot: str) -> None:
    """Undo the baseline (not timed): current selects the product's slot again, the daemon runs it."""
    reset_start_limit(host)
    host.run(["sh", "-c", f"ln -sfn {slot} {BIN}/.by-hand-link && mv -T {BIN}/.by-hand-link {CURRENT} && "
                          f"systemctl restart {DAEMON} && rm -rf {HAND_DIR}"])


def upgrade_once(host, url: str) -> tuple[float, dict[str, float]]:
    """One upgrade from `systemctl start unbounded-upgrade@<URL>`; (seconds to the new daemon active, the
    points of its time line as epoch seconds)."""
    unit = f"unbounded-upgrade@{escape(host, url)}.service"
    reset_start_limit(host)  # not timed; the switch clears it too
    before = show(host, DAEMON, "InvocationID")["InvocationID"]
    t0 = time.time()
    r = host.run(["systemctl", "start", unit], check=False, timeout=900)  # returns once committed
    if r.returncode:
        raise SystemExit(f"upgrade failed: {r.stderr}\n" + host.run(["journalctl", "-n", "60", "--no-pager"]).stdout)
    rec = record(host)
    assert rec["phase"] == "committed", rec["phase"]
    res = result(host, rec["id"])
    d = show(host, DAEMON, "InvocationID", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    assert d["InvocationID"] != before, "the daemon was not restarted"
    points = {"t0": t0, "queued": rfc3339(res["submitted_at"]), "claimed": rfc3339(res["started_at"]),
              "exec": mono_to_epoch(d["ExecMainStartTimestampMonotonic"]),
              "active": mono_to_epoch(d["ActiveEnterTimestampMonotonic"])}
    for h in rec["history"]:
        points.setdefault(h["phase"], h["t"])
    entries = journal_entries(host, t0, "unbounded-upgrade-*", DAEMON)
    found = {f"{step}@": when(entries, f"unbounded-upgrade-{step}@{rec['id']}.service", "Starting")
             for step in ("stage", "preflight", "switch")}
    found["stopping"] = when(entries, DAEMON, "Stopping")
    found["stopped"] = when(entries, DAEMON, "Stopped")
    found["stopped-line"] = next((int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in entries
                                  if e.get("_SYSTEMD_UNIT") == DAEMON and e.get("MESSAGE") == "stopped"), None)
    points.update({k: t for k, t in found.items() if t is not None})
    points["stage_peak_rss_kib"] = rec.get("stage_peak_rss_kib") or 0
    host.run(["systemctl", "reset-failed"], check=False)
    return points["active"] - t0, points


def timeline(runs: list[dict[str, float]]) -> str:
    rows = []
    for label, a, b in TIMELINE:
        # two stamps of the same moment from two processes may come out a fraction of a millisecond apart
        ms = [max(0.0, 1000 * (p[b] - p[a])) for p in runs if a in p and b in p]
        if ms:
            rows.append(f"| {label} | {statistics.median(ms):.0f} | {min(ms):.0f}–{max(ms):.0f} |")
    total = [1000 * (p["active"] - p["t0"]) for p in runs]
    rows.append(f"| **total: systemctl start → new daemon active** | **{statistics.median(total):.0f}** | "
                f"{min(total):.0f}–{max(total):.0f} |")
    return "| step | median ms | min–max ms |\n|---|---|---|\n" + "\n".join(rows)


def rollback_once(host, url: str) -> float:
    """An upgrade to a release whose daemon crashes at once; seconds from its first crash (systemd's "Main
    process exited") to last-good's daemon active again."""
    reset_start_limit(host)
    t0 = time.time()
    r = host.run(["unbounded-agent", "upgrade", url, "--wait"], check=False, timeout=900)
    rec = settle(host)
    assert rec["phase"] == "rolled-back", f"{rec['phase']}: {r.stdout}{r.stderr}"
    entries = journal_entries(host, t0, DAEMON)
    crashed = next(int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in entries
                   if e.get("UNIT") == DAEMON and "Main process exited" in str(e.get("MESSAGE")))
    d = show(host, DAEMON, "ActiveState", "ActiveEnterTimestampMonotonic")
    assert d["ActiveState"] == "active"
    host.run(["systemctl", "reset-failed"], check=False)
    return mono_to_epoch(d["ActiveEnterTimestampMonotonic"]) - crashed


def rollback_by_hand(host) -> float:
    """The baseline: the least a person does once the crash is seen — point current at the good binary
    (here: the one it selects already) and restart the daemon."""
    slot = host.run(["readlink", CURRENT]).stdout.strip()
    reset_start_limit(host)
    t0 = time.time()
    host.run(["sh", "-c", f"ln -sfn {slot} {BIN}/.by-hand-link && mv -T {BIN}/.by-hand-link {CURRENT} && "
                          f"systemctl restart {DAEMON}"])
    return mono_to_epoch(show(host, DAEMON, "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"]) - t0


# Runs inside the test host: each executable's `--help`, timed from fork to exit, after one warm-up run.
STARTUP = r"""
import json, os, statistics, subprocess, sys, time
runs, exes = ARGS["runs"], ARGS["exes"]
def timed(cmd):
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = []
    for _ in range(runs):
        s = time.perf_counter()
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        out.append(time.perf_counter() - s)
    return {"ms": [1000 * t for t in out], "code": code}
res = {"python3 -I -c pass": timed(["/usr/bin/python3", "-I", "-c", "pass"])}
for exe in exes:
    res[exe] = timed([exe, "--help"])
print(json.dumps(res))
"""


def startup(host, runs: int) -> list[Figure]:
    names = sorted(p.name for p in (REPO / "bin").iterdir())
    exes = ["/usr/bin/unbounded-agent"] + [f"/usr/libexec/unbounded-agent/{n}" for n in names]
    args = json.dumps({"runs": runs, "exes": exes})
    raw = json.loads(host.run(["python3", "-c", f"import json; ARGS = json.loads({args!r})\n" + STARTUP],
                              timeout=600).stdout)
    floor = raw.pop("python3 -I -c pass")["ms"]
    figures = []
    for exe, r in raw.items():
        m = statistics.median(r["ms"])
        note = "" if r["code"] == 0 else f"exit {r['code']}"
        figures.append(Figure(f"start-up: `{Path(exe).name} --help`" + (" (/usr/bin launcher)" if exe.startswith("/usr/bin")
                                                                         else ""),
                              "ms", r["ms"], "python3 -I -c pass", floor, "< 80 ms", m < 80, note))
    return figures


def measure(deb: Path, runs: int, mb: int, log=print) -> tuple[list[Figure], str]:
    """All of this host's figures, and the upgrade's time line (Markdown)."""
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        log(f"building two padded {mb} MB releases and {runs} crashing ones ...")
        padded = {v: releases.padded_release(REPO, v, Path(tmp) / v, mb << 20) for v in ("2.0.0", "3.0.0")}
        crash = [releases.script_release(Path(tmp) / f"crash-{i}.tar.gz", version=f"9.0.{i}", daemon="crash")
                 for i in range(runs)]
        with boot_testhost("bench-upgrade", testhost_tree.build_tree()) as host:
            host.install_deb(deb)
            prepare(host, CONFIG)
            install_curl(host)
            names = {v: f"agent-{v}.tar.gz" for v in padded}
            urls = {v: host.serve(p, names[v]) for v, p in padded.items()}
            crash_urls = [host.serve(p, p.name) for p in crash]

            log("daemon: time to ready and RSS, without a kubeconfig ...")
            ours = [restart_daemon_timed(host) for _ in range(runs)]
            floor = [floor_daemon_timed(host) for _ in range(runs)]
            figures.append(Figure("daemon: process start → READY=1 (no kubeconfig)", "ms",
                                  [1000 * r for r, _ in ours], "python3 -I notify service",
                                  [1000 * r for r, _ in floor]))
            rss = [k / 1024 for _, k in ours]
            figures.append(Figure("daemon RSS once ready (no kubeconfig)", "MiB", rss, "python3 -I notify service",
                                  [k / 1024 for _, k in floor], "< 40 MiB", statistics.median(rss) < 40))

            log("start-up of each executable ...")
            figures += startup(host, runs)

            log(f"upgrade, {runs} runs, each paired with the baseline ...")
            walls, hand, points = [], [], []
            for i in range(runs):
                v = ("3.0.0", "2.0.0")[i % 2]
                wall, p = upgrade_once(host, urls[v])
                walls.append(wall)
                points.append(p)
                slot = host.run(["readlink", CURRENT]).stdout.strip()
                time.sleep(1.0)  # past probation's commit: the crash watch's hook is quiet
                hand.append(by_hand(host, names[("2.0.0", "3.0.0")[i % 2]]))
                put_back(host, slot)
                log(f"  run {i + 1}: upgrade {wall:.2f} s, by hand {hand[-1]:.2f} s")
            ratio = statistics.median(walls) / statistics.median(hand)
            figures.insert(0, Figure(f"upgrade, {mb} MB agent: systemctl start → new daemon active", "s", walls,
                                     "by hand: curl|tar, version, ln+mv, systemctl restart", hand,
                                     "ratio ≤ 1.5", ratio <= 1.5))
            stage_rss = [p["stage_peak_rss_kib"] / 1024 for p in points]

            log(f"rollback, {runs} runs ...")
            rb, rb_hand = [], []
            for u in crash_urls:
                rb.append(rollback_once(host, u))
                rb_hand.append(rollback_by_hand(host))
                log(f"  rollback {rb[-1]:.2f} s, by hand {rb_hand[-1]:.2f} s")
            figures.insert(1, Figure("rollback: new daemon's first crash → last-good active", "s", rb,
                                     "by hand: ln+mv, systemctl restart", rb_hand))
    figures.insert(2, Figure(f"stage unit's peak RSS, {mb} MB agent (from the record)", "MiB", stage_rss))
    return figures, timeline(points)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path,
                    default=REPO / "dist" / f"unbounded-agent_{(REPO / 'VERSION').read_text().strip()}_all.deb")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=50)
    args = ap.parse_args()
    figures, line = measure(args.deb, args.runs, args.mb)
    print(table(figures))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
