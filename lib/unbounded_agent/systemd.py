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


# -- AgentUpgrade: start/restart units and watch the daemon (used by the upgrade_* modules) ----------

_BUSY_STATES = {"active", "activating", "deactivating", "reloading"}
# ExecMainCode is a waitid() si_code: how the main process ended.
_CLD = {1: "exited", 2: "killed", 3: "dumped"}


def _manager_call(method: str, *args: bytes):
    from pystemd.systemd1 import Manager

    try:
        with Manager() as m:
            return getattr(m.Manager, method)(*args)
    except Exception as e:
        raise SystemdUnavailable(f"{method}({', '.join(a.decode() for a in args)}) failed: {e}") from None


def start_unit(name: str, mode: str = "replace") -> None:
    """Queue a start job and return at once (like `systemctl start --no-block`)."""
    _manager_call("StartUnit", name.encode(), mode.encode())


def restart_unit(name: str, mode: str = "replace") -> None:
    """Queue a restart job and return at once (like `systemctl restart --no-block`)."""
    _manager_call("RestartUnit", name.encode(), mode.encode())


def reset_failed(name: str) -> None:
    """Clear the failed state and the start-limit counter (some SELinux policies deny this)."""
    _manager_call("ResetFailedUnit", name.encode())


def busy(names: list[str]) -> list[str]:
    """Those of names that are active, activating, deactivating or have a job queued."""
    from pystemd.systemd1 import Unit

    found = []
    for name in names:
        try:
            with Unit(name.encode(), _autoload=True) as unit:
                job_id = unit.Unit.Job[0]
                if unit.Unit.ActiveState.decode() in _BUSY_STATES or job_id:
                    found.append(name)
        except Exception as e:
            raise SystemdUnavailable(f"cannot query {name} over D-Bus: {e}") from None
    return found


def service_snapshot(name: str) -> dict:
    """What probation and recovery watch on a service, as plain values."""
    from pystemd.systemd1 import Unit

    try:
        with Unit(name.encode(), _autoload=True) as unit:
            svc = unit.Service
            code = int(svc.ExecMainCode)
            return {
                "active_state": unit.Unit.ActiveState.decode(),
                "sub_state": unit.Unit.SubState.decode(),
                "invocation": bytes(unit.Unit.InvocationID).hex(),
                "job": int(unit.Unit.Job[0]),
                "main_pid": int(svc.MainPID),
                "n_restarts": int(svc.NRestarts),
                "result": svc.Result.decode(),
                "exec_main_code": _CLD.get(code, str(code) if code else None),
                "exec_main_status": int(svc.ExecMainStatus),
                "exec_main_pid": int(svc.ExecMainPID),
            }
    except Exception as e:
        raise SystemdUnavailable(f"cannot query {name} over D-Bus: {e}") from None


def unit_property(name: str, interface: str, prop: str):
    from pystemd.systemd1 import Unit

    try:
        with Unit(name.encode(), _autoload=True) as unit:
            return getattr(getattr(unit, interface), prop)
    except Exception as e:
        raise SystemdUnavailable(f"cannot query {name} over D-Bus: {e}") from None
