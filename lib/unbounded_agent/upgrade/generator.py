"""``unbounded-agent-generator``: a systemd generator that makes the units honour the agent's config.

systemd runs it at boot and at every ``systemctl daemon-reload`` (``/lib/systemd/system-generators/`` holds a
link to ``/usr/libexec/unbounded-agent/unbounded-agent-generator``), and it writes into its first output
directory one drop-in per unit whose settings come from ``/etc/unbounded/agent/config.yaml``:

    unbounded-agent-daemon.service           ExecStart=<binDir>/unbounded-agent-current daemon,
                                             TimeoutStartSec=readyTimeoutSeconds, and the one directory its
                                             sandbox may write under stateDir (the watcher's progress)
    unbounded-upgrade-stage@.service         TimeoutStartSec=downloadDeadlineSeconds + a margin
    unbounded-upgrade-preflight@.service     TimeoutStartSec=preflightTimeoutSeconds + a margin, and its
                                             sandbox: stateDir writable, binDir read-only
    unbounded-upgrade-probation.service      TimeoutStartSec= from readyTimeoutSeconds and probationSeconds
    unbounded-agent-daemon-recovery.service  TimeoutStartSec= from readyTimeoutSeconds

The unit files carry the same values for the default config. A config that cannot be read writes nothing
(the units keep those defaults) and says why on stderr (the kernel log at boot, the journal at
daemon-reload); the daemon then fails at start with the same clear error. Run by hand without arguments, it
prints the drop-ins it would write. The bounds config.py puts on these settings keep every value one a unit
can honour.
"""

from __future__ import annotations

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
              f"TimeoutStartSec={seconds(cfg.ready_timeout_seconds)}"]
    if state != config_module.DEFAULT_STATE_DIR:
        # StateDirectory= only makes directories under /var/lib: elsewhere the progress dir is made before
        # the sandbox is set up ('+': outside it) and listed as the one writable place there.
        progress = f"{state}/{PROGRESS_DIR}"
        daemon += ["StateDirectory=", "StateDirectory=unbounded-agent-ops/spool unbounded-agent-ops/gates",
                   f"ExecStartPre=+/usr/bin/mkdir -p -m 0700 {progress}", f"ReadWritePaths=-{progress}"]
    preflight = ["[Service]", f"TimeoutStartSec={seconds(units.preflight_seconds(cfg))}",
                 "ReadWritePaths=", f"ReadWritePaths=-{state}", "ReadOnlyPaths=", f"ReadOnlyPaths=-{bin_dir}"]
    stage = ["[Service]", f"TimeoutStartSec={seconds(units.stage_seconds(cfg))}"]
    if any(p == t or p.startswith(t + "/") for p in (state, bin_dir) for t in config_module.TMP_DIRS):
        for lines in (daemon, preflight, stage):  # a private /tmp would hide the agent's files from the unit
            lines.append("PrivateTmp=no")
    return {
        "unbounded-agent-daemon.service": _text(daemon),
        "unbounded-upgrade-stage@.service": _text(stage),
        "unbounded-upgrade-preflight@.service": _text(preflight),
        "unbounded-upgrade-probation.service": _text(["[Service]",
                                                      f"TimeoutStartSec={seconds(units.probation_seconds(cfg))}"]),
        units.RECOVERY_UNIT: _text(["[Service]", f"TimeoutStartSec={seconds(units.recovery_seconds(cfg))}"]),
    }


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
