"""The reset steps, one module per step unit, in order (DESIGN.md §5).

``begin`` takes the run's checkpoint before any step; ``finish`` removes it last. Phase 1 is everything
that can fail, with the daemon running: steps 1–6, the removals of step 7 (``remove-agent``) and
``verify``. Phase 2 comes after the gate (the requester has reported): ``stop-daemon`` (the end of step
7), 8 (``reload-systemd``) and ``finish``. Each module holds its step and its program's ``main``; the
step's heavy imports (pystemd, pyroute2) are inside its functions.
"""

from __future__ import annotations

import importlib

ORDER = ("begin", "stop_machines", "remove_links", "remove_wireguard_keys", "remove_nspawn_config",
         "remove_machine_trees", "remove_routing", "remove_agent", "verify", "stop_daemon", "reload_systemd", "finish")


def all_steps() -> list:
    return [importlib.import_module(f"{__name__}.{m}").STEP for m in ORDER]


def by_name(name: str):
    return next(s for s in all_steps() if s.name == name)


def work_steps() -> list:
    """The eight steps of DESIGN.md §5 (step 7 in two units: remove-agent, stop-daemon)."""
    return [s for s in all_steps() if 1 <= s.number <= 8]


def of_phase(phase: int) -> list:
    """The units a phase target runs, in order (begin runs with both: it is idempotent)."""
    return [s for s in all_steps() if s.phase in (0, phase)]
