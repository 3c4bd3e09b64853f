"""Hold points armed on a test host (lib/unbounded_agent/holdpoint.py): the programs started from now on that
reach one of them pause there.

    hold(host, unit, point)    arm point for unit's program (a second hold for the same unit replaces its first)
    unhold(host, unit)         disarm it
    clear(host)                disarm them all (after a power cut the host has forgotten them already)

The manager's environment names the armed points (`systemctl set-environment UNBOUNDED_AGENT_TEST_HOLD=a,b`):
a unit started afterwards inherits it, one already running keeps the environment it started with, as it would
keep a drop-in's. Arming costs one call to systemd where a drop-in costs a daemon-reload (every unit file read
again, every generator run again). Each point is reached by one program only (its name says which), so
naming the unit is bookkeeping: which point unhold(unit) disarms.
"""

from __future__ import annotations

ENV = "UNBOUNDED_AGENT_TEST_HOLD"


def _armed(host) -> dict[str, str]:
    """unit -> point, kept on the host object (a host's manager is the one place they live)."""
    if not hasattr(host, "held_points"):
        host.held_points = {}
    return host.held_points


def _apply(host) -> None:
    points = sorted(set(_armed(host).values()))
    if points:
        host.run(["systemctl", "set-environment", f"{ENV}={','.join(points)}"])
    else:
        host.run(["systemctl", "unset-environment", ENV])


def hold(host, unit: str, point: str) -> None:
    _armed(host)[unit] = point
    _apply(host)


def unhold(host, unit: str) -> None:
    _armed(host).pop(unit, None)
    _apply(host)


def clear(host) -> None:
    _armed(host).clear()
    _apply(host)
