"""`unbounded-agent daemon`: the long-running agent under unbounded-agent-daemon.service.

It runs the MachineOperation watcher (kube/watcher.py) for this machine. systemd learns three things from it:
- READY=1 (Type=notify) once the first list of MachineOperations succeeded — or, when the API server
  cannot be reached, after a short grace (watcher.ready_grace): the host side must not depend on the API;
- WATCHDOG=1 from a thread, every quarter of WatchdogSec=, but only while the main loop is alive (its
  heartbeat is recent): a wedged loop stops the pings and systemd restarts the daemon;
- STOPPING=1 on SIGTERM.
Without a kubeconfig and outside a pod there is nothing to watch: the daemon stays up, ready, idle.

The daemon runs from the agent's zipapp, whose modules Python reads from the file when they are first
imported. An AgentReset removes that file before the daemon reports ``Complete`` (and stops only after
that), so every module the daemon may ever need is imported at start (``preload``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from . import fsutil, log, systemd
from .config import Config
from .version import VERSION


def watchdog_seconds() -> float | None:
    """WatchdogSec= of this service as systemd passes it (sd_watchdog_enabled(3)), None if off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 or None
    except ValueError:
        return None


# The daemon arms its own watchdog (sd_notify WATCHDOG_USEC=, honoured by systemd 252) rather than the
# unit setting WatchdogSec=: the unit runs whichever binary is current, and one that cannot feed a
# watchdog (an older release) must not be killed every minute. A WatchdogSec= drop-in still wins.
WATCHDOG_SECONDS = 60.0


def start_watchdog(alive, stop: threading.Event, notify=systemd.notify) -> threading.Thread | None:
    """Ping the systemd watchdog while alive() says the main loop made progress recently."""
    period = watchdog_seconds()
    if not period:
        if not os.environ.get("NOTIFY_SOCKET"):
            return None  # not run by systemd: nobody to ping
        period = WATCHDOG_SECONDS
        notify(WATCHDOG_USEC=int(period * 1_000_000))

    def feed():
        warned = False
        while not stop.wait(period / 4):
            if alive(period * 0.75):
                notify(WATCHDOG=1)
                warned = False
            elif not warned:
                log.error(f"the main loop made no progress for {period * 0.75:.0f} s: not feeding the watchdog")
                warned = True

    t = threading.Thread(target=feed, name="watchdog", daemon=True)
    t.start()
    return t


# Every module of this package the daemon can reach, imported inside functions included (test_daemon.py
# checks the list against the code).
PRELOAD = ("config", "fsutil", "kubeconfig", "log", "program", "records", "reasons", "systemd", "urls", "version", "queue.spool",
           "upgrade.record", "reset.reporter_kit", "reset.reports", "kube.adoption", "kube.aftercommit", "kube.client", "kube.listwatch", "kube.mop", "kube.progress",
           "kube.events", "kube.reset_driver", "kube.standalone", "kube.status", "kube.upgrade_driver", "kube.watcher")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(f"{__package__}.{name}")


def run(cfg: Config, annotate: bool = True) -> int:
    preload()
    from .kube import client as kubeclient
    from .kube import standalone, watcher
    from .kube.progress import PROGRESS_DIR

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info(f"received {signal.Signals(signum).name}, stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(f"version {VERSION} starting for machine {cfg.machine_name}")
    # The daemon is the one writer of its progress and event files: what a killed run (or a power cut) left
    # half-written is swept before anything writes there.
    for stale in fsutil.remove_stale_temps(Path(cfg.state_dir) / PROGRESS_DIR, depth=2):
        log.info(f"removed {stale}, left by a run that was cut short")
    if not kubeclient.configured(cfg.kubeconfig):
        start_watchdog(lambda _max_age: True, stop)
        standalone.run_standalone(cfg, stop, systemd.notify)
    else:
        w = watcher.Watcher(cfg, notify=systemd.notify)
        w.api.machine_annotated = not annotate  # the reset's reporter is not the agent: no version on the Machine
        start_watchdog(lambda max_age: time.monotonic() - w.heartbeat < max_age, stop)
        w.run(stop)
    systemd.notify(STOPPING=1)
    log.info("stopped")
    return 0


def report_reset() -> int:
    """``unbounded-agent-reset-reporter.service``: this watcher, run from the toolset on the copy of the agent's
    config and credentials that a reset kept (reset/reporter_kit.py), in the place of a daemon that stopped
    after its files were removed and cannot start again. It follows the reset from the host's queue like a
    restarted daemon (kube/adoption.py): publishes it, acknowledges its gate, and is stopped with the daemon's
    turn in the reset. It is not the agent: it does not annotate the Machine with a version."""
    import sys

    from . import config, program
    from .reset import reporter_kit
    from .reset.reports import reset_dir

    program.parser("unbounded-agent-reset-reporter", report_reset.__doc__).parse_args(sys.argv[1:])
    log.set_prefix("unbounded-agent-reset-reporter")
    held = reporter_kit.config_path(reset_dir())
    if held is None:
        log.error(f"nothing to report from: no copy of the agent's config in {reporter_kit.kit_dir(reset_dir())}")
        return 1
    return program.run("unbounded-agent-reset-reporter", lambda: run(config.load(str(held)), annotate=False),
                       config=False)
