"""``unbounded-agent status [--json]``: what is installed, what runs, what is queued, and how the last
operations ended."""

from __future__ import annotations

from .. import layout, records, systemd
from ..config import Config
from ..version import VERSION


def collect(cfg: Config) -> dict:
    from ..queue.spool import Spool
    from ..upgrade.record import Store, UpgradeRecord

    lay = layout.Layout(cfg.bin_dir)
    versions = {}  # current and last-good are often the same slot: ask each binary once

    def target(link: str) -> dict:
        name = lay.link_target(link)
        real = lay.resolves(link)
        if real and real not in versions:
            versions[real] = layout.binary_version(real)
        return {"link": str(lay.path(link)), "target": name, "valid": real is not None,
                "version": versions.get(real) if real else None}

    store = Store(cfg)
    try:
        rec = records.load(UpgradeRecord, store.record_path)
        upgrade = records.to_dict(rec) if rec else None
    except records.CorruptRecord as e:
        rec, upgrade = None, {"error": str(e)}
    try:
        daemon = systemd.unit_state(systemd.DAEMON_UNIT)
    except systemd.SystemdError as e:
        daemon = {"unit": systemd.DAEMON_UNIT, "error": str(e)}
    spool = Spool()
    try:
        queue: list[dict] | None = [
            {"id": r.id, "kind": r.kind, "operation": r.name, "source": r.source, "submitted_at": r.submitted_at,
             "state": "running" if p.name.endswith(".claimed") else "queued"} for p, r in spool.queue()]
    except PermissionError:
        queue = None  # the spool is root's: requests may carry signed URLs
    signal = store.read_signal()
    results = [records.to_dict(r) for r in spool.recent_results(5)]
    # the operation running now, else the last one that ended: its whole story, across all its units
    latest = next((q["operation"] for q in queue or [] if q["state"] == "running"), None) or next(
        (r["operation"] for r in results), None)
    return {
        "after_commit_watch": _after_commit_watch(store, rec),
        "version": VERSION,
        "machine_name": cfg.machine_name,
        "config": cfg.source,
        "bin_dir": str(cfg.bin_dir),
        "active_slot": lay.active_slot(),
        "current": target(layout.CURRENT),
        "last_good": target(layout.LAST_GOOD),
        "upgrade": upgrade,
        "upgrade_summary": rec.describe() if rec else None,
        "queue": queue,
        "results": results,
        "journal": f"journalctl UNBOUNDED_OPERATION={latest}" if latest else None,
        "quarantine": [records.to_dict(q) for q in store.quarantine()],
        "rollback_signal": records.to_dict(signal) if signal else None,
        "daemon": daemon,
    }


def _after_commit_watch(store, rec) -> dict | None:
    """While a committed upgrade is in its failure-detection window: its crashes so far (upgrade/crashes.py)."""
    import datetime
    import time

    from ..upgrade import crashes
    from ..upgrade.record import COMMITTED

    committed = rec.phase_time(COMMITTED) if rec is not None and rec.committed and not rec.same_content else None
    if committed is None or time.time() - committed > crashes.WINDOW_SECONDS:
        return None
    n = len([e for e in crashes.read_exits(store) if e.t >= committed and rec.to and e.digest == rec.to.digest])
    until = datetime.datetime.fromtimestamp(committed + crashes.WINDOW_SECONDS, datetime.UTC)
    return {"crashes": n, "rolls_back_at": crashes.CRASHES, "window_seconds": crashes.WINDOW_SECONDS,
            "until": until.isoformat(timespec="seconds").replace("+00:00", "Z")}


def render(st: dict) -> str:
    def link_line(t: dict) -> str:
        if t["target"] is None:
            return "missing"
        if not t["valid"]:
            return f"{t['target']} (dangling or not executable)"
        return f"{t['target']} (version {t['version'] or 'unknown'})"

    d = st["daemon"]
    if "error" in d:
        daemon = f"unknown ({d['error']})"
    elif d["load_state"] != "loaded":
        daemon = d["load_state"]
    else:
        daemon = f"{d['active_state']} ({d['sub_state']})" + (f", pid {d['main_pid']}" if d.get("main_pid") else "")
    upgrade = st["upgrade"]
    if upgrade is None:
        upgrade_line = "none yet"
    elif "error" in upgrade:
        upgrade_line = upgrade["error"]
    else:
        upgrade_line = st["upgrade_summary"]
    rows = [
        ("agent", f"unbounded-agent {st['version']}"),
        ("machine", st["machine_name"]),
        ("bin dir", st["bin_dir"]),
        ("active slot", st["active_slot"] or "none"),
        ("current", link_line(st["current"])),
        ("last good", link_line(st["last_good"])),
        ("upgrade", upgrade_line),
        ("daemon", daemon),
    ]
    w = st.get("after_commit_watch")
    if w:
        rows.append(("crash watch", f"{w['crashes']} of {w['rolls_back_at']} crashes before {w['until']} roll the "
                                    "committed upgrade back to last good"))
    if st["queue"] is None:
        rows.append(("queue", "unknown (only root may read it)"))
    else:
        rows += [("queue", f"{q['state']}: {q['kind']} {q['operation']} (request {q['id']}, from {q['source']})")
                 for q in st["queue"]] or [("queue", "empty")]
    for r in st["results"]:
        verdict = "succeeded" if r["succeeded"] else f"failed ({r['reason']})"
        if r.get("after_commit"):
            verdict += f", then rolled back after its commit ({r['after_commit'].get('reason')})"
        rows.append(("last results", f"{r['finished_at']} {r['kind']} {r['operation']} {verdict}"))
    if st.get("journal"):
        rows.append(("journal", f"{st['journal']}  (one operation, all its units)"))
    sig = st.get("rollback_signal")
    if sig:
        rows.append(("rolled back", f"{sig.get('at')} by {sig.get('kind', 'upgrade')} {sig.get('operation')}: "
                                      f"{sig.get('failureMessage')}"))
    rows += [("quarantined", f"version {q.get('version') or '?'} sha256 {(q.get('digest') or '?')[:12]} "
                             f"({q.get('failure')})") for q in st.get("quarantine") or []]
    return "\n".join(f"{k + ':':<13}{v}" for k, v in rows)
