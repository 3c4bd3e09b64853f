"""systemd over D-Bus through pystemd: the one place the toolset talks to systemd1 and machine1.

pystemd is imported inside each call, so a program that never talks to systemd (``unbounded-agent
version``) never pays for it. Each call opens one bus connection and asks by name and D-Bus type: pystemd's
objects open a connection per property and introspect first, which made a probation poll cost 8 ms of CPU
(and systemd's own time to describe its interfaces) where 0.5 ms does. Every failure — bus unreachable,
access denied, a unit systemd refuses — raises ``SystemdError``, whose message carries the D-Bus error's name and text; callers decide what it
means for them (the reset fails closed on it, the upgrade records it).
"""

from __future__ import annotations

import contextlib
import time

from .reasons import describe_error

DAEMON_UNIT = "unbounded-agent-daemon.service"
RUNNING_STATES = frozenset({"active", "activating", "deactivating", "reloading"})
# ExecMainCode is a waitid() si_code: how the main process ended.
_CLD = {1: "exited", 2: "killed", 3: "dumped"}
# UnitFileState values that mean "does not start at boot".
NOT_ENABLED = frozenset({"", "disabled", "not-found", "masked", "masked-runtime", "static", "indirect", "bad",
                         "generated", "transient"})


class SystemdError(Exception):
    """systemd (or machined) could not be reached, or refused the request."""


def _fail(what: str, e: BaseException) -> SystemdError:
    return SystemdError(f"{what}: {describe_error(e)}")


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def notify(**fields: str | int) -> None:
    """sd_notify(3): e.g. notify(READY=1, STATUS="...") — a no-op outside a notify-type unit."""
    from pystemd.daemon import notify as _notify

    _notify(False, **{k.upper(): v for k, v in fields.items()})


# -- the manager -------------------------------------------------------------------------------------


# A daemon-reload drops the manager's bus connections: a call in flight then ends with "Message recipient
# disconnected from message bus without replying" although nothing is wrong. Questions are asked again.
RELOAD_RETRIES, RELOAD_RETRY_SECONDS = 25, 0.2


def _dropped_by_reload(e: BaseException) -> bool:
    import errno

    text = describe_error(e).lower()
    return "disconnected" in text or "noreply" in text or getattr(e, "errno", None) in (-errno.ECONNRESET,
                                                                                           -errno.ENOTCONN)


def _asking(fn):
    """fn() (a question, safe to ask twice), asked again while a daemon-reload drops the manager's answer."""
    for _ in range(RELOAD_RETRIES):
        try:
            return fn()
        except Exception as e:
            if not _dropped_by_reload(e):
                raise
            time.sleep(RELOAD_RETRY_SECONDS)
    return fn()


_SYSTEMD = b"org.freedesktop.systemd1"
_MANAGER_PATH, _MANAGER = b"/org/freedesktop/systemd1", b"org.freedesktop.systemd1.Manager"
# The manager's methods the toolset calls, with their D-Bus argument signatures (org.freedesktop.systemd1(5)).
_SIGNATURES = {"StartUnit": "ss", "RestartUnit": "ss", "StopUnit": "ss", "ResetFailedUnit": "s", "KillUnit": "ssi",
               "DisableUnitFiles": "asb", "Reload": "", "ListUnitsByPatterns": "asas", "ListUnitsByNames": "as",
               "ListJobs": "", "GetUnitFileState": "s", "ListMachines": "", "KillMachine": "ssi"}
# The unit properties read, with their D-Bus types.
_UNIT_PROPS = {"ActiveState": "s", "SubState": "s", "LoadState": "s", "UnitFileState": "s", "InvocationID": "ay",
               "Job": "(uo)", "InactiveExitTimestampMonotonic": "t", "InactiveExitTimestamp": "t",
               "StartLimitIntervalUSec": "t"}
_SERVICE_PROPS = {"MainPID": "u", "NRestarts": "u", "StatusText": "s", "Result": "s", "ExecMainCode": "i",
                  "ExecMainStatus": "i", "ExecMainPID": "u"}


def _open():
    from pystemd.dbuslib import DBus

    bus = DBus()
    bus.open()
    return bus


@contextlib.contextmanager
def _connected():
    """One connection to the system bus for one question or order."""
    bus = _open()
    try:
        yield bus
    finally:
        bus.close()


def _call(bus, method: str, *args, to: tuple[bytes, bytes, bytes] = (_SYSTEMD, _MANAGER_PATH, _MANAGER)):
    from pystemd.dbuslib import apply_signature

    return bus.call_method(*to, method.encode(), apply_signature(_SIGNATURES[method].encode(), list(args))).body


class _Unit:
    """One unit's properties over an open connection, each read by name (no introspection)."""

    def __init__(self, bus, name: str):
        from pystemd.dbuslib import path_encode

        self.bus, self.path = bus, path_encode(b"/org/freedesktop/systemd1/unit", name.encode())

    def __getitem__(self, prop: str):
        iface, kind = ((b"org.freedesktop.systemd1.Unit", _UNIT_PROPS[prop]) if prop in _UNIT_PROPS
                       else (b"org.freedesktop.systemd1.Service", _SERVICE_PROPS[prop]))
        return self.bus.get_property(_SYSTEMD, self.path, iface, prop.encode(), kind.encode())


def _manager_call(method: str, *args, question: bool = False):
    def call():
        with _connected() as bus:
            return _call(bus, method, *args)
    try:
        return _asking(call) if question else call()
    except Exception as e:
        shown = ", ".join(_text(a) if isinstance(a, (bytes, str)) else repr(a) for a in args)
        raise _fail(f"{method}({shown}) failed", e) from None


def start_unit(name: str, mode: str = "replace") -> str:
    """Queue a start job and return at once (like `systemctl start --no-block`); the job's object path."""
    return _text(_manager_call("StartUnit", name.encode(), mode.encode()))


def restart_unit(name: str, mode: str = "replace") -> str:
    """Queue a restart job and return at once (like `systemctl restart --no-block`)."""
    return _text(_manager_call("RestartUnit", name.encode(), mode.encode()))


def stop_unit(name: str, mode: str = "replace") -> str:
    return _text(_manager_call("StopUnit", name.encode(), mode.encode()))


def reset_failed(name: str) -> None:
    """Clear the failed state and the start-limit counter (some SELinux policies deny this)."""
    _manager_call("ResetFailedUnit", name.encode())


def kill_unit(name: str, who: str, signal: int) -> None:
    _manager_call("KillUnit", name.encode(), who.encode(), signal)


def disable_unit_files(names: list[str]) -> None:
    _manager_call("DisableUnitFiles", [n.encode() for n in names], False)


def reload() -> None:
    """daemon-reload; the reply comes once the manager has re-read its units."""
    _manager_call("Reload")


def list_units(patterns: list[str]) -> list[str]:
    """Loaded units (running or not) whose names match any of the glob patterns."""
    found = _manager_call("ListUnitsByPatterns", [], [p.encode() for p in patterns], question=True)
    return sorted({_text(u[0]) for u in found})


def jobs() -> list[dict]:
    """The queued jobs: id, unit, type, state and object path."""
    return [{"id": int(j[0]), "unit": _text(j[1]), "type": _text(j[2]), "state": _text(j[3]), "path": _text(j[4])}
            for j in _manager_call("ListJobs", question=True)]


def unit_file_state(name: str) -> str:
    """UnitFileState (enabled, disabled, static, masked ...): "not-found" only when systemd answers that no
    unit file exists. Any other error raises — above all a bus that cannot be reached, which pystemd reports
    with the same errno as a missing file: a state that cannot be read is never taken for "not enabled"."""
    try:
        bus = _open()
    except Exception as e:
        raise _fail(f"cannot read the unit file state of {name}", e) from None
    try:
        return _text(_call(bus, "GetUnitFileState", name.encode()))
    except Exception as e:
        if _no_such_unit(e):
            return "not-found"
        raise _fail(f"cannot read the unit file state of {name}", e) from None
    finally:
        bus.close()


def _no_such_unit(e: BaseException) -> bool:
    """The answer of a reachable systemd that the unit (file) does not exist."""
    import errno

    name = _text(getattr(e, "err_name", b"") or b"")
    return getattr(e, "errno", None) == -errno.ENOENT or name.endswith((".NoSuchUnit", ".FileNotFound"))


def enabled(file_state: str) -> bool:
    return file_state not in NOT_ENABLED


# -- units -------------------------------------------------------------------------------------------


def unit_state(name: str) -> dict:
    """The unit's load, active and sub state, file state, queued job, and for a loaded service its main
    PID, result and main exit status — as plain Python values."""
    def ask() -> dict:
        with _connected() as bus:
            unit = _Unit(bus, name)
            state = {
                "unit": name,
                "load_state": _text(unit["LoadState"]),
                "active_state": _text(unit["ActiveState"]),
                "sub_state": _text(unit["SubState"]),
                "unit_file_state": _text(unit["UnitFileState"]),
                "job": int(unit["Job"][0]),
            }
            if name.endswith(".service") and state["load_state"] == "loaded":
                state["main_pid"] = int(unit["MainPID"])
                state["result"] = _text(unit["Result"])
                state["exit_status"] = int(unit["ExecMainStatus"])
            return state
    try:
        return _asking(ask)
    except Exception as e:
        raise _fail(f"cannot query {name} over D-Bus", e) from None


def running(state: dict) -> bool:
    return state["active_state"] in RUNNING_STATES


def busy(names: list[str]) -> list[str]:
    """Those of names that are active, activating, deactivating or have a job queued (one question for all)."""
    if not names:
        return []
    try:
        found = _manager_call("ListUnitsByNames", [n.encode() for n in names], question=True)
    except SystemdError as e:
        raise SystemdError(f"cannot query {', '.join(names)} over D-Bus: {e}") from None
    # (name, description, load, active, sub, following, path, job id, job type, job path)
    at_work = {_text(u[0]) for u in found if _text(u[3]) in RUNNING_STATES or int(u[7])}
    return [n for n in names if n in at_work]


def service_snapshot(name: str) -> dict:
    """What probation and recovery watch on a service, as plain values.

    Each property is its own D-Bus call, so the service can move between two of them. The run and its state
    are read first and how it ended after: a snapshot that shows a run ended then also shows its exit (read
    the other way round, a busy host gave "stopped" with no exit code: the code was read while it still ran)."""
    def ask() -> dict:
        with _connected() as bus:
            unit = _Unit(bus, name)
            invocation = bytes(unit["InvocationID"]).hex()
            snap = {
                "invocation": invocation if invocation.strip("0") else "",  # all zeros: never started
                "active_state": _text(unit["ActiveState"]),
                "sub_state": _text(unit["SubState"]),
                "job": int(unit["Job"][0]),
                "main_pid": int(unit["MainPID"]),
                "n_restarts": int(unit["NRestarts"]),
                "status_text": _text(unit["StatusText"]),  # the service's own STATUS= (sd_notify), "" if none
                "load_state": _text(unit["LoadState"]),
                # CLOCK_MONOTONIC seconds when this run left "inactive" (its start), 0 if never started
                "started_monotonic": int(unit["InactiveExitTimestampMonotonic"]) / 1e6,
                "started_realtime": int(unit["InactiveExitTimestamp"]) / 1e6,  # the same, since the epoch
            }
            code = int(unit["ExecMainCode"])
            snap.update(result=_text(unit["Result"]), exec_main_code=_CLD.get(code, str(code) if code else None),
                        exec_main_status=int(unit["ExecMainStatus"]), exec_main_pid=int(unit["ExecMainPID"]))
            return snap
    try:
        return ask()
    except Exception as e:
        raise _fail(f"cannot query {name} over D-Bus", e) from None


def unit_property(name: str, prop: str):
    try:
        with _connected() as bus:
            return _Unit(bus, name)[prop]
    except Exception as e:
        raise _fail(f"cannot query {name} over D-Bus", e) from None


def stop_and_wait(name: str, timeout: float, poll: float = 0.2) -> bool:
    """Stop a unit and wait until it no longer runs; False if it still runs after timeout."""
    stop_unit(name)
    deadline = time.monotonic() + timeout
    while running(unit_state(name)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def wait_jobs_done(job_paths: list[str], poll: float = 0.1, on_poll=None) -> None:
    """Wait until none of the given jobs is queued or running any more (the units then have a result)."""
    pending = set(job_paths)
    while True:
        if on_poll:
            on_poll()
        if not pending & {j["path"] for j in jobs()}:
            return
        time.sleep(poll)


# -- machined ---------------------------------------------------------------------------------------


_MACHINED = (b"org.freedesktop.machine1", b"/org/freedesktop/machine1", b"org.freedesktop.machine1.Manager")


def list_machines() -> set[str]:
    """Names of the machines systemd-machined lists."""
    try:
        with _connected() as bus:
            return {_text(entry[0]) for entry in _call(bus, "ListMachines", to=_MACHINED)}
    except Exception as e:
        raise _fail("cannot list machines through systemd-machined", e) from None


def kill_machine(name: str, who: str, signal: int) -> None:
    try:
        with _connected() as bus:
            _call(bus, "KillMachine", name.encode(), who.encode(), signal, to=_MACHINED)
    except Exception as e:
        raise _fail(f"cannot kill machine {name}", e) from None
