"""What the benchmarks share: figures (a median paired with its baseline), the machine's description, and the
clocks of a test host.

A test host (tests/support/testhost.py) is a systemd-nspawn container on this kernel: it shares the kernel's
CLOCK_MONOTONIC and CLOCK_REALTIME with this process, so systemd's *TimestampMonotonic properties, the
journal's timestamps and the records' times can all be put on one time line here.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DAEMON = "unbounded-agent-daemon.service"


@dataclasses.dataclass
class Figure:
    """One row of the table: our median against the baseline's, over the same number of runs."""

    what: str
    unit: str  # "s", "ms", "MiB"
    values: list[float]
    baseline: str = ""
    baseline_values: list[float] = dataclasses.field(default_factory=list)
    target: str = ""
    met: bool | None = None  # None: no target
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def baseline_median(self) -> float | None:
        return statistics.median(self.baseline_values) if self.baseline_values else None

    @property
    def ratio(self) -> float | None:
        m, b = self.median, self.baseline_median
        return m / b if m is not None and b else None

    def spread(self) -> str:
        if len(self.values) < 2:
            return ""
        return f"{fmt(min(self.values), self.unit)}–{fmt(max(self.values), self.unit)}"


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "ms":
        return f"{v:.0f} ms"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:.1f} {unit}"


def table(figures: list[Figure]) -> str:
    """A Markdown table, readable as printed."""
    rows = [("measure", "runs", "median", "min–max", "baseline", "baseline median", "ratio", "target")]
    for f in figures:
        target = f.target + ("" if f.met is None else (": met" if f.met else ": MISSED"))
        rows.append((f.what, str(len(f.values)), fmt(f.median, f.unit), f.spread(), f.baseline or "—",
                     fmt(f.baseline_median, f.unit), "—" if f.ratio is None else f"{f.ratio:.2f}", target or "—"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# -- the machine -------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, kernel and Debian version (lscpu, /proc, /etc/debian_version)."""
    out: dict[str, str] = {}
    if shutil.which("lscpu"):
        info = json.loads(subprocess.run(["lscpu", "-J"], capture_output=True, text=True).stdout)["lscpu"]
        fields = {e["field"].rstrip(":"): e["data"] for e in info}
        out["CPU"] = fields.get("Model name", "?")
        if "Hypervisor vendor" in fields:
            out["CPU"] += f" ({fields['Hypervisor vendor']} guest)"
    else:
        out["CPU"] = platform.processor() or "?"
    out["cores"] = str(os.cpu_count())
    with open("/proc/meminfo") as f:
        kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
    out["RAM"] = f"{kib / 1024 / 1024:.1f} GiB"
    out["kernel"] = platform.release()
    try:
        out["Debian"] = Path("/etc/debian_version").read_text().strip()
    except OSError:
        out["Debian"] = "not Debian"
    with open("/proc/loadavg") as f:
        out["load average at start"] = " ".join(f.read().split()[:3])
    return out


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- clocks and units in a test host ----------------------------------------------------------------------


def mono_to_epoch(usec: str | int) -> float:
    """A CLOCK_MONOTONIC time in microseconds (systemd's *TimestampMonotonic) as seconds since the epoch."""
    return int(usec) / 1e6 + (time.time() - time.monotonic())


def rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def show(host, unit: str, *props: str) -> dict[str, str]:
    out = host.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_entries(host, since_epoch: float, *units: str) -> list[dict]:
    """The journal since a time, of the given units (globs), as JSON entries."""
    args = ["journalctl", "--no-pager", "-o", "json", "--since", f"@{since_epoch - 1:.0f}"]
    for u in units:
        args += ["-u", u]
    out = host.run(args, check=False).stdout
    return [e for e in map(json.loads, out.splitlines()) if int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= since_epoch]


def when(entries: list[dict], unit: str, prefix: str) -> float | None:
    """The first time systemd said `prefix...` (Starting, Finished, Started) about unit."""
    for e in entries:
        if e.get("UNIT") == unit and str(e.get("MESSAGE", "")).startswith(prefix):
            return int(e["__REALTIME_TIMESTAMP"]) / 1e6
    return None


def process_kib(host, pid: str | int, field: str = "VmRSS") -> int:
    status = host.run(["cat", f"/proc/{pid}/status"]).stdout
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def reset_start_limit(host, unit: str = DAEMON) -> None:
    """The daemon unit allows 3 starts a minute (StartLimitBurst=): the bench restarts it more often than that,
    so it clears the count first, as the upgrade's switch does."""
    host.run(["systemctl", "reset-failed", unit], check=False)


def restart_daemon_timed(host, unit: str = DAEMON) -> tuple[float, int]:
    """`systemctl restart` of a Type=notify unit; (its process start → READY=1 in seconds, RSS in KiB once ready)."""
    reset_start_limit(host, unit)
    host.run(["systemctl", "restart", unit])
    s = show(host, unit, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "MainPID")
    ready = (int(s["ActiveEnterTimestampMonotonic"]) - int(s["ExecMainStartTimestampMonotonic"])) / 1e6
    time.sleep(1.0)  # what it holds once settled, not only at READY=1
    return ready, process_kib(host, s["MainPID"])


# A Type=notify service of nothing but Python: the floor every Python daemon starts from.
FLOOR_DAEMON = ("import os, socket, time\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                "a = os.environ['NOTIFY_SOCKET']\n"
                "s.connect('\\0' + a[1:] if a.startswith('@') else a)\n"
                "s.sendall(b'READY=1')\n"
                "time.sleep(1e9)\n")


def floor_daemon_timed(host, name: str = "bench-python-floor.service", imports: str = "") -> tuple[float, int]:
    """The same measure for a bare python3 -I Type=notify service (systemd-run), after ``imports`` (Python
    statements) if given."""
    host.run(["systemctl", "stop", name], check=False)
    host.run(["systemctl", "reset-failed", name], check=False)
    host.run(["systemd-run", f"--unit={name}", "-p", "Type=notify", "-p", "NotifyAccess=main",
              "/usr/bin/python3", "-I", "-c", imports + "\n" + FLOOR_DAEMON])
    s = show(host, name, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "MainPID")
    ready = (int(s["ActiveEnterTimestampMonotonic"]) - int(s["ExecMainStartTimestampMonotonic"])) / 1e6
    time.sleep(1.0)
    rss = process_kib(host, s["MainPID"])
    host.run(["systemctl", "stop", name], check=False)
    return ready, rss
