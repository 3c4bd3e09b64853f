"""README.md's table of the units' sandboxes: the `systemd-analyze security` exposure recorded for each unit,
the one source of truth for the tests that keep the units at or below it."""

from __future__ import annotations

import re
from pathlib import Path

SECTION = "## Hardened units"
ROW = re.compile(r"^\| `(unbounded-[^`]+\.service)` \| \*\*([0-9]+\.[0-9])\*\* \| ([0-9]+\.[0-9]|—) \|", re.M)


def recorded(readme: Path) -> dict[str, float]:
    """unit file name -> the exposure README records for it."""
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return {unit: float(level) for unit, level, _before in ROW.findall(text[start:end if end > 0 else None])}


def analyzed_name(unit: str) -> str:
    """What to ask systemd-analyze about: a template through an instance of it."""
    return unit.replace("@.", "@example.")


def exposure(output: str, unit: str) -> float:
    """The overall exposure in `systemd-analyze security <unit>`'s output."""
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", output)
    assert m, output
    return float(m[1])
