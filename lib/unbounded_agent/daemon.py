"""`unbounded-agent daemon`: the long-running agent under unbounded-agent-daemon.service.

It reports readiness to systemd (Type=notify) once it has validated its configuration and then
waits for SIGTERM. The MachineOperation watcher is not part of this build.
"""

import signal
import threading

from . import log, systemd
from .config import Config
from .version import VERSION


def run(cfg: Config) -> int:
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info(f"received {signal.Signals(signum).name}, stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(f"version {VERSION} starting for machine {cfg.machine_name}")
    systemd.notify(READY=1, STATUS=f"unbounded-agent {VERSION}: idle (no MachineOperation watcher in this build)")
    log.info("ready")
    stop.wait()
    systemd.notify(STOPPING=1)
    return 0
