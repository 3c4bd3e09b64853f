"""systemd over D-Bus through pystemd (imported lazily: the `version` path must not pay for it)."""

DAEMON_UNIT = "unbounded-agent-daemon.service"


class SystemdUnavailable(Exception):
    """The system bus or systemd could not be reached."""


def notify(**fields: str | int) -> None:
    """sd_notify(3): e.g. notify(READY=1, STATUS="...") — a no-op outside a notify-type unit."""
    from pystemd.daemon import notify as _notify

    _notify(False, **{k.upper(): v for k, v in fields.items()})


def unit_state(name: str) -> dict:
    """The few unit properties that status and the tools need, as plain Python values."""
    from pystemd.systemd1 import Unit

    try:
        with Unit(name.encode(), _autoload=True) as unit:
            state = {
                "unit": name,
                "load_state": unit.Unit.LoadState.decode(),
                "active_state": unit.Unit.ActiveState.decode(),
                "sub_state": unit.Unit.SubState.decode(),
                "unit_file_state": unit.Unit.UnitFileState.decode(),
            }
            if name.endswith(".service") and state["load_state"] == "loaded":
                state["main_pid"] = int(unit.Service.MainPID)
                state["result"] = unit.Service.Result.decode()
            return state
    except Exception as e:  # pystemd raises plain DBus errors; keep the caller's handling simple
        raise SystemdUnavailable(f"cannot query {name} over D-Bus: {e}") from None
