"""`unbounded-agent status`: what is installed, what runs, and what is in flight."""

from . import layout, state, systemd, upgrade
from .config import Config
from .version import VERSION


def collect(cfg: Config) -> dict:
    lay = layout.Layout(cfg.bin_dir)
    versions = {}  # current and last-good are often the same slot: ask each binary once

    def target(link: str) -> dict:
        name = lay.link_target(link)
        real = lay.resolves(link)
        if real and real not in versions:
            versions[real] = layout.binary_version(real)
        return {
            "link": str(lay.path(link)),
            "target": name,
            "valid": real is not None,
            "version": versions.get(real),
        }

    try:
        pending = state.read_json(cfg.state_dir / state.UPGRADE_RECORD)
    except ValueError as e:
        pending = {"error": str(e)}

    try:
        daemon = systemd.unit_state(systemd.DAEMON_UNIT)
    except systemd.SystemdUnavailable as e:
        daemon = {"unit": systemd.DAEMON_UNIT, "error": str(e)}

    store = upgrade.Store(cfg)
    return {
        "version": VERSION,
        "machine_name": cfg.machine_name,
        "config": cfg.source,
        "bin_dir": str(cfg.bin_dir),
        "active_slot": lay.active_slot(),
        "current": target(layout.CURRENT),
        "last_good": target(layout.LAST_GOOD),
        "pending_upgrade": pending,
        "upgrade": upgrade.outcome(pending) if pending and "error" not in pending else None,
        "quarantine": store.quarantine(),
        "rollback_signal": store.read_signal(),
        "daemon": daemon,
    }


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
    else:
        daemon = f"{d['active_state']} ({d['sub_state']})"
        if d.get("main_pid"):
            daemon += f", pid {d['main_pid']}"
        if d["load_state"] != "loaded":
            daemon = f"{d['load_state']}"
    pending = st["pending_upgrade"]
    rows = [
        ("agent", f"unbounded-agent {st['version']}"),
        ("machine", st["machine_name"]),
        ("bin dir", st["bin_dir"]),
        ("active slot", st["active_slot"] or "none"),
        ("current", link_line(st["current"])),
        ("last good", link_line(st["last_good"])),
        ("upgrade", _upgrade_line(st)),
        ("daemon", daemon),
    ]
    sig = st.get("rollback_signal")
    if sig:
        rows.append(("rolled back", f"{sig.get('at')} by {sig.get('kind', 'upgrade')} {sig.get('operation')}: "
                                      f"{sig.get('failureMessage')}"))
    rows += [("quarantined", f"version {q.get('version') or '?'} sha256 {(q.get('digest') or '?')[:12]} "
                             f"({q.get('failure')})") for q in st.get("quarantine") or []]
    return "\n".join(f"{k + ':':<13}{v}" for k, v in rows)


def _upgrade_line(st: dict) -> str:
    pending = st["pending_upgrade"]
    if pending is None:
        return "none pending"
    if "error" in pending:
        return pending["error"]
    return upgrade.describe(pending)
