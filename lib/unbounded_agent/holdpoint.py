"""Crash-point injection for the test host: a step pauses at a named point so a test can kill it there.

When ``UNBOUNDED_AGENT_TEST_HOLD`` (a comma-separated list a test puts in the manager's environment with
``systemctl set-environment``) names the point, the step announces it in ``<dir>/test-hold/<point>`` and
waits until that file is removed (or the step is killed). Otherwise it costs one environment lookup.
"""

import os
import time
from pathlib import Path

from . import log

ENV_HOLD = "UNBOUNDED_AGENT_TEST_HOLD"
HOLD_DIR = "test-hold"


def hold(directory: str | os.PathLike, name: str) -> None:
    wanted = os.environ.get(ENV_HOLD)
    if not wanted or name not in wanted.split(","):
        return
    marker = Path(directory) / HOLD_DIR / name
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()}\n")
    log.info(f"test hold point {name}: waiting until {marker} is removed")
    while marker.exists():
        time.sleep(0.05)
