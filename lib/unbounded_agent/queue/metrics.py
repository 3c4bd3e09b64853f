"""``unbounded-agent-metrics.service`` and the dispatcher: the host's operations as metrics for
node_exporter's textfile collector.

    /var/lib/prometheus/node-exporter/unbounded_agent.prom   the textfile (the directory of Debian's
                                                             prometheus-node-exporter; written only where
                                                             that directory exists)
    <ops dir>/metrics.json                                   the counters, kept across runs and resets
                                                             (a purge resets them, as Prometheus allows)

The dispatcher, which owns the operations' results, counts each operation as it ends and writes the file;
``unbounded-agent-metrics.service``, which the daemon wants (``WantedBy=``), writes it again each time the
daemon starts, since the current agent may have changed. The daemon itself writes nothing here: its
sandbox keeps it out of both places. Both writers take ``metrics.lock`` so an older view never replaces a
newer one, and write the file atomically (fsutil), so the collector never reads half of it.

The format is four kinds of lines (``# HELP``, ``# TYPE``, a sample, label values escaped): a writer of a
few lines here, rather than python3-prometheus-client, whose metrics live in one process while these
counters must outlive every process that adds to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import os
import time
from dataclasses import field
from pathlib import Path

from .. import fsutil, layout, log, program, records
from ..config import ops_dir
from .spool import Result

TEXTFILE = "/var/lib/prometheus/node-exporter/unbounded_agent.prom"
ENV_TEXTFILE = "UNBOUNDED_AGENT_METRICS_TEXTFILE"
COUNTERS_FILE = "metrics.json"
LOCK_FILE = "metrics.lock"
REQUESTED = "Requested"  # the rollbacks' reason for `unbounded-agent rollback`
UNKNOWN = "Unknown"

# name -> (type, help, label names)
FAMILIES = {
    "unbounded_agent_operations_total": ("counter", "Host operations that ended, by kind, result and reason.",
                                         ("kind", "result", "reason")),
    "unbounded_agent_rollbacks_total": ("counter", "Returns to the last-good agent: Requested (unbounded-agent "
                                        "rollback) or why the new daemon failed its probation.", ("reason",)),
    "unbounded_agent_reset_steps_total": ("counter", "Reset steps that ended, by step and result.", ("step", "result")),
    "unbounded_agent_current_info": ("gauge", "The agent binary unbounded-agent-current selects.", ("slot", "version")),
    "unbounded_agent_last_good_info": ("gauge", "The agent binary unbounded-agent-last-good selects.",
                                       ("slot", "version")),
    "unbounded_agent_last_operation_timestamp_seconds": ("gauge", "When the last host operation ended (Unix time).",
                                                         ()),
    "unbounded_agent_last_operation_duration_seconds": ("gauge", "How long the last host operation ran, from its "
                                                        "claim to its result.", ()),
}


@dataclasses.dataclass
class Counters:
    """What the textfile says that no other file remembers. Keys are label values joined by '/'."""

    operations: dict[str, int] = field(default_factory=dict)
    rollbacks: dict[str, int] = field(default_factory=dict)
    reset_steps: dict[str, int] = field(default_factory=dict)
    last_operation: str = ""  # its request id
    last_operation_at: float | None = None
    last_operation_seconds: float | None = None
    format: int = 1


def textfile() -> Path:
    return Path(os.environ.get(ENV_TEXTFILE) or TEXTFILE)


def main(argv: list[str] | None = None) -> int:
    return program.plain_main("unbounded-agent-metrics", __doc__, run, argv)


def run(cfg) -> None:
    """The metrics unit: write the textfile (the daemon has just started)."""
    written = write(cfg)
    if written is None:
        log.info(f"{textfile().parent} does not exist (is prometheus-node-exporter installed?): no metrics written")
    else:
        log.info(f"wrote {written}")


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load(root: Path | None = None) -> Counters:
    try:
        return records.load(Counters, (root or ops_dir()) / COUNTERS_FILE) or Counters()
    except records.CorruptRecord as e:
        log.warn(f"starting the counters again: {e}")
        return Counters()


def count(cfg, result: Result, root: Path | None = None) -> Path | None:
    """Count an operation that ended (the dispatcher calls this once per result, root is its ops dir), then
    write the textfile."""
    root = root or ops_dir()
    with _locked(root):
        c = load(root)
        _add(c.operations, result.kind, "succeeded" if result.succeeded else "failed", result.reason)
        if result.kind in ("upgrade", "rollback") and cfg is not None:
            reason = rollback_reason(cfg, result.id)
            if reason:
                _add(c.rollbacks, reason)
        elif result.kind == "reset":
            for step, outcome in reset_steps(result.id, root / "reset"):
                _add(c.reset_steps, step, outcome)
        c.last_operation = result.id
        c.last_operation_at = _epoch(result.finished_at)
        c.last_operation_seconds = result.seconds
        records.save(c, root / COUNTERS_FILE)
        return _write(cfg, c)


def write(cfg=None, root: Path | None = None) -> Path | None:
    """Write the textfile from the counters and the links as they are now; None when its directory is
    missing (node_exporter is not installed)."""
    root = root or ops_dir()
    if not root.is_dir():  # nothing counted yet (and the metrics unit may not create it)
        return _write(cfg, Counters())
    with _locked(root):
        return _write(cfg, load(root))


def _add(counts: dict[str, int], *labels: str) -> None:
    key = "/".join(labels)
    counts[key] = counts.get(key, 0) + 1


def _epoch(stamp: str) -> float:
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (AttributeError, ValueError):
        return time.time()


def rollback_reason(cfg, id: str) -> str | None:
    """Whether operation id ended on the last-good binary, and why: Requested, or the cause of the failure
    (upgrade.record.CAUSES)."""
    from ..upgrade import record

    rec = record.Store(cfg).read()
    if rec is None or rec.id != id:
        return None
    if rec.phase == record.ROLLED_BACK:
        return (rec.failure.cause if rec.failure else None) or UNKNOWN
    if rec.kind == record.ROLLBACK and rec.committed:
        return REQUESTED
    return None


def reset_steps(run_id: str, directory: Path) -> list[tuple[str, str]]:
    """(step, result) of each step that reported for reset run_id (in the reset's directory)."""
    from ..reset.reports import read_report
    from ..reset.steps import all_steps

    out = []
    for step in all_steps():
        report = read_report(step.number, step.name, directory)
        if report is not None and report.run_id == run_id:
            out.append((step.name, report.result))
    return out


def versions(cfg) -> dict[str, tuple[str, str]]:
    """link -> (slot, version) for current and last-good, where the link leads to a binary."""
    from .. import config

    if cfg is None:
        try:
            cfg = config.load()
        except Exception:  # a broken config: the default bin dir, as the reset does
            cfg = None
    lay = layout.Layout(cfg.bin_dir if cfg is not None else config.DEFAULT_BIN_DIR)
    out = {}
    asked: dict[Path, str] = {}  # current and last-good are often one binary: ask it once
    for link in (layout.CURRENT, layout.LAST_GOOD):
        real = lay.resolves(link)
        if real is None:
            continue
        if real not in asked:
            asked[real] = layout.binary_version(real) or UNKNOWN
        out[link] = (lay.link_target(link) or "", asked[real])
    return out


def _write(cfg, c: Counters) -> Path | None:
    path = textfile()
    if not path.parent.is_dir():
        return None
    fsutil.atomic_write(path, render(c, versions(cfg)).encode(), mode=0o644)
    return path


def render(c: Counters, links: dict[str, tuple[str, str]]) -> str:
    samples: dict[str, list[tuple[tuple[str, ...], float]]] = {name: [] for name in FAMILIES}

    def counted(name: str, counts: dict[str, int]) -> None:
        width = len(FAMILIES[name][2])
        for key, n in sorted(counts.items()):
            parts = key.split("/", width - 1)
            samples[name].append((tuple(parts + [""] * (width - len(parts))), n))

    counted("unbounded_agent_operations_total", c.operations)
    counted("unbounded_agent_rollbacks_total", c.rollbacks)
    counted("unbounded_agent_reset_steps_total", c.reset_steps)
    for link, name in ((layout.CURRENT, "unbounded_agent_current_info"), (layout.LAST_GOOD, "unbounded_agent_last_good_info")):
        if link in links:
            samples[name].append((links[link], 1))
    if c.last_operation_at is not None:
        samples["unbounded_agent_last_operation_timestamp_seconds"].append(((), c.last_operation_at))
    if c.last_operation_seconds is not None:
        samples["unbounded_agent_last_operation_duration_seconds"].append(((), c.last_operation_seconds))
    lines = []
    for name, (kind, help_text, labels) in FAMILIES.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for values, value in samples[name]:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(labels, values, strict=True))
            lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"
