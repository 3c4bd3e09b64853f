"""The daemon without a cluster (no kubeconfig, not in a pod): nothing to watch, but still ready for probation,
and still the one to let a reset's gate go."""

from __future__ import annotations

import threading

from .. import log
from ..config import Config
from ..queue.spool import Spool
from ..version import VERSION
from . import reset_driver

TICK = 1.0


def run_standalone(cfg: Config, stop: threading.Event, notify, spool: Spool | None = None) -> None:
    """No cluster configured (no kubeconfig, not in a pod): nothing to watch. Stay up, ready and quiet, so
    that the host-side operations (`unbounded-agent upgrade`, probation) work without a cluster — and let
    a reset's gate go at once: there is nothing to report."""
    notify(READY=1, STATUS=f"unbounded-agent {VERSION}: no cluster configured (kubeconfig unset, not in a pod); "
                           "not watching MachineOperations")
    log.info("no kubeconfig configured and no in-cluster service account: not watching MachineOperations")
    spool = spool or Spool()
    while not stop.wait(TICK):
        reset_driver.let_gates_go(spool)
