"""`unbounded-agent upgrade --wait` output: every phase shows, even one shorter than the polling
interval, and the download's progress in bytes."""

import io

from unbounded_agent.upgradectl import ProgressLine


def rec(phase, history, progress=None):
    return {"kind": "upgrade", "operation": "op", "phase": phase, "progress": progress or {},
            "history": [{"phase": p} for p in history]}


def test_phases_missed_between_polls_are_still_shown():
    out = io.StringIO()
    line = ProgressLine(out)
    line.update(rec("requested", ["requested"]))
    line.update(rec("staging", ["requested", "staging"], {"bytes": 10_000_000, "total": 50_000_000}))
    line.update(rec("staging", ["requested", "staging"], {"bytes": 30_000_000, "total": 50_000_000}))
    # staged, preflighted and switching all happened between two polls
    line.update(rec("probation", ["requested", "staging", "staged", "preflighted", "switching", "probation"],
                    {"bytes": 50_000_000, "total": 50_000_000}))
    line.done()
    assert out.getvalue().splitlines() == [
        "upgrade op: requested",
        "upgrade op: staging, 10.0 MB / 50.0 MB downloaded",
        "upgrade op: staging, 30.0 MB / 50.0 MB downloaded",
        "upgrade op: staged",
        "upgrade op: preflighted",
        "upgrade op: switching",
        "upgrade op: probation (daemon restarted; watching it)",
    ]
