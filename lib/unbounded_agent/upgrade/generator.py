"""``unbounded-agent-generator``: a systemd generator that makes the units honour the agent's config.

systemd runs it at boot and at every ``systemctl daemon-reload`` (``/lib/systemd/system-generators/`` holds a
link to ``/usr/libexec/unbounded-agent/unbounded-agent-generator``), and it writes into its first output
directory one drop-in per unit whose settings come from ``/etc/unbounded/agent/config.yaml``:

    unbounded-agent-daemon.service           ExecStart=<binDir>/unbounded-agent-current daemon,
                                             TimeoutStartSec=readyTimeoutSeconds + a margin, and the one directory its
                                             sandbox may write under stateDir (the watcher's progress)
    unbounded-upgrade-stage@.service         TimeoutStartSec=downloadDeadlineSeconds + a margin
    unbounded-upgrade-preflight@.service     TimeoutStartSec=preflightTimeoutSeconds + a margin, and its
                                             sandbox: stateDir writable, binDir read-only
    unbounded-upgrade-probation.service      TimeoutStartSec= from readyTimeoutSeconds and probationSeconds
    unbounded-agent-daemon-recovery.service  TimeoutStartSec= from readyTimeoutSeconds
    and every sandboxed unit that writes     ReadWritePaths= for binDir and stateDir (the dispatcher, stage,
    or inventories the agent's files         switch, probation, recovery), or their parents (stop-daemon);
                                             PrivateTmp=no when they are under /tmp or /var/tmp

The unit files carry the same values for the default config. A config that cannot be read writes nothing
(the units keep those defaults) and says why on stderr (the kernel log at boot, the journal at
daemon-reload); the daemon then fails at start with the same clear error. Run by hand without arguments, it
prints the drop-ins it would write. The bounds config.py puts on these settings keep every value one a unit
can honour.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import config as config_module
from .. import fsutil, log, program
from ..config import Config
from ..reasons import OpsError
from . import units

DROPIN = "10-unbounded-agent-config.conf"  # early: drop-ins of an admin (or a test) win
PROGRESS_DIR = "machineoperations"  # kube/progress.py: the watcher's own files, the one place it writes


def seconds(value: float) -> str:
    """A time span as a unit file takes it: whole seconds, or milliseconds when it has a fraction."""
    return f"{int(value)}s" if float(value).is_integer() else f"{round(value * 1000)}ms"


def dropins(cfg: Config) -> dict[str, str]:
    """unit name -> the drop-in that makes it follow cfg."""
    state, bin_dir = str(cfg.state_dir), str(cfg.bin_dir)
    daemon = ["[Service]", "ExecStart=", f"ExecStart={bin_dir}/unbounded-agent-current daemon",
              f"TimeoutStartSec={seconds(units.daemon_start_seconds(cfg))}"]
    if state != config_module.DEFAULT_STATE_DIR:
        # StateDirectory= only makes directories under /var/lib: elsewhere the progress dir is made before
        # the sandbox is set up ('+': outside it) and listed as the one writable place there.
        progress = f"{state}/{PROGRESS_DIR}"
        daemon += ["StateDirectory=", "StateDirectory=unbounded-agent-ops/spool unbounded-agent-ops/gates",
                   f"ExecStartPre=+/usr/bin/mkdir -p -m 0700 {progress}", f"ReadWritePaths=-{progress}"]
    preflight = ["[Service]", f"TimeoutStartSec={seconds(units.preflight_seconds(cfg))}",
                 "ReadWritePaths=", f"ReadWritePaths=-{state}", "ReadOnlyPaths=", f"ReadOnlyPaths=-{bin_dir}"]
    # Added to the defaults the unit files list ('-': a directory that does not exist is no error). The units
    # that write the agent's files get the directories themselves; stop-daemon, which removes a state dir made
    # again, gets its parent: a directory bound into a unit's namespace is a mount point there, and cannot be
    # removed. (remove-agent has no mount namespace: its unmounts must reach the host's.)
    writes = "ReadWritePaths=" + " ".join(f"-{d}" for d in _outermost([state, bin_dir]))
    removes = "ReadWritePaths=" + " ".join(f"-{d}" for d in _outermost([os.path.dirname(state), bin_dir]))
    out = {
        "unbounded-agent-daemon.service": daemon,
        "unbounded-upgrade-stage@.service": ["[Service]", f"TimeoutStartSec={seconds(units.stage_seconds(cfg))}",
                                             writes],
        "unbounded-upgrade-preflight@.service": preflight,
        "unbounded-upgrade-switch@.service": ["[Service]", writes],
        "unbounded-upgrade-probation.service": ["[Service]", f"TimeoutStartSec={seconds(units.probation_seconds(cfg))}",
                                                writes],
        units.RECOVERY_UNIT: ["[Service]", f"TimeoutStartSec={seconds(units.recovery_seconds(cfg))}", writes],
        units.DISPATCH_UNIT: ["[Service]", writes],
        "unbounded-agent-reset-stop-daemon.service": ["[Service]", removes],
        # they only read there (inventories), but a private /tmp would show them nothing
        "unbounded-agent-reset-verify.service": ["[Service]"],
        "unbounded-agent-reset-finish.service": ["[Service]"],
        "unbounded-agent-metrics.service": ["[Service]"],
    }
    if any(p == t or p.startswith(t + "/") for p in (state, bin_dir) for t in config_module.TMP_DIRS):
        for lines in out.values():  # a private /tmp would hide the agent's files from the unit
            lines.append("PrivateTmp=no")
    return {unit: _text(lines) for unit, lines in out.items() if len(lines) > 1}


def _outermost(dirs: list[str]) -> list[str]:
    """dirs without those inside another of them (binDir inside stateDir, the default)."""
    return [d for d in dict.fromkeys(dirs) if not any(o != d and d.startswith(o.rstrip("/") + "/") for o in dirs)]


def _text(lines: list[str]) -> str:
    return f"# written by unbounded-agent-generator from {config_module.config_path()}\n" + "\n".join(lines) + "\n"


def write(out_dir: str | Path, cfg: Config) -> list[Path]:
    written = []
    for unit, text in dropins(cfg).items():
        d = Path(out_dir) / f"{unit}.d"
        d.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write(d / DROPIN, text.encode(), mode=0o644)
        written.append(d / DROPIN)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("unbounded-agent-generator", __doc__)
    ap.add_argument("dirs", nargs="*", metavar="DIR", help="systemd's output directories (normal, early, late)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    log.set_prefix("unbounded-agent-generator")
    try:
        cfg = config_module.load()
    except OpsError as e:
        log.error(f"{e}: the units keep their defaults until the config is fixed (then systemctl daemon-reload)")
        return 0  # a generator's failure changes nothing more; the daemon reports the same error at start
    if not args.dirs:
        for unit, text in dropins(cfg).items():
            print(f"# {unit}.d/{DROPIN}\n{text}")
        return 0
    write(args.dirs[0], cfg)
    return 0
