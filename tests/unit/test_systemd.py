"""The one D-Bus layer: a unit file state is "not-found" only when a reachable systemd says so. pystemd reports
a bus it cannot open with the same errno as a missing unit file, so where the error came from decides."""

import pystemd.systemd1
import pytest
from pystemd.dbusexc import DBusFileNotFoundError

from unbounded_agent import systemd


class FakeManager:
    """pystemd's Manager: connecting (enter) or the call may fail as pystemd fails."""

    connect_error: Exception | None = None
    call_error: Exception | None = None

    def __enter__(self):
        if self.connect_error:
            raise self.connect_error
        return self

    def __exit__(self, *exc):
        pass

    @property
    def Manager(self):
        return self

    def GetUnitFileState(self, name):
        if self.call_error:
            raise self.call_error
        return b"enabled"


def enoent(message: bytes) -> DBusFileNotFoundError:
    """The error pystemd raises for errno -2 (ENOENT), with its message."""
    e = DBusFileNotFoundError(-2)
    e.err_message = message
    return e


@pytest.fixture
def manager(monkeypatch):
    class M(FakeManager):
        pass
    monkeypatch.setattr(pystemd.systemd1, "Manager", M)
    return M


def test_a_unit_systemd_has_no_file_for_is_not_found(manager):
    manager.call_error = enoent(b"No such file or directory")
    assert systemd.unit_file_state("gone.service") == "not-found"


def test_a_bus_that_cannot_be_opened_is_an_error_not_not_found(manager):
    manager.connect_error = enoent(b"Could not open a bus to DBus")
    with pytest.raises(systemd.SystemdError) as e:
        systemd.unit_file_state("unbounded-agent-daemon.service")
    assert "Could not open a bus" in str(e.value)


def test_any_other_answer_is_an_error(manager):
    manager.call_error = PermissionError(13, "Access denied")
    with pytest.raises(systemd.SystemdError):
        systemd.unit_file_state("unbounded-agent-daemon.service")


def test_a_state_is_read(manager):
    assert systemd.unit_file_state("unbounded-agent-daemon.service") == "enabled"


class ReloadingManager(FakeManager):
    """A manager whose first answers a daemon-reload drops (its bus connection closes while it reloads)."""

    dropped = 0
    started: list = []

    def _drop(self):
        if ReloadingManager.dropped:
            ReloadingManager.dropped -= 1
            e = DBusFileNotFoundError(-104)
            e.err_message = b"Message recipient disconnected from message bus without replying"
            raise e

    def ListJobs(self):
        self._drop()
        return [(7, b"a.service", b"start", b"running", b"/org/freedesktop/systemd1/job/7", b"/u")]

    def StartUnit(self, name, mode):
        self._drop()
        ReloadingManager.started.append(name)
        return b"/org/freedesktop/systemd1/job/8"


@pytest.fixture
def reloading(monkeypatch):
    monkeypatch.setattr(pystemd.systemd1, "Manager", ReloadingManager)
    monkeypatch.setattr(systemd, "RELOAD_RETRY_SECONDS", 0)
    ReloadingManager.started = []
    return ReloadingManager


def test_a_question_whose_answer_a_daemon_reload_dropped_is_asked_again(reloading):
    reloading.dropped = 3
    assert [j["unit"] for j in systemd.jobs()] == ["a.service"]
    assert reloading.dropped == 0


def test_a_question_is_not_asked_again_forever(reloading):
    reloading.dropped = systemd.RELOAD_RETRIES + 5
    with pytest.raises(systemd.SystemdError, match="disconnected"):
        systemd.jobs()


def test_an_order_is_never_given_twice(reloading):
    # a start whose answer was lost may have been queued: the caller decides, not the D-Bus layer
    reloading.dropped = 1
    with pytest.raises(systemd.SystemdError, match="disconnected"):
        systemd.start_unit("b.service")
    assert reloading.started == []


class CrashingUnit:
    """A daemon unit that crashes (exit code 3) after the k-th property read of a snapshot: each property is its
    own D-Bus call, so the service may move between any two of them."""

    crash_after = 0

    def __init__(self, name, _autoload=False):
        self.reads = 0
        self.Unit, self.Service = _Props(self), _Props(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def value(self, prop):
        self.reads += 1
        ended = self.reads > CrashingUnit.crash_after
        running = {"ActiveState": b"active", "SubState": b"running", "ExecMainCode": 0, "ExecMainStatus": 0,
                   "Result": b"success", "MainPID": 7}
        crashed = {"ActiveState": b"deactivating", "SubState": b"stop-post", "ExecMainCode": 1, "ExecMainStatus": 3,
                   "Result": b"exit-code", "MainPID": 0}
        other = {"InvocationID": bytes.fromhex("ab" * 16), "Job": (0, b"/"), "NRestarts": 0, "StatusText": b"",
                 "LoadState": b"loaded", "InactiveExitTimestampMonotonic": 1, "InactiveExitTimestamp": 1,
                 "ExecMainPID": 7}
        return (crashed if ended else running).get(prop, other.get(prop))


class _Props:
    def __init__(self, unit):
        self._unit = unit

    def __getattr__(self, prop):
        return self._unit.value(prop)


@pytest.mark.parametrize("crash_after", range(16))
def test_a_snapshot_that_shows_a_run_ended_also_shows_how(monkeypatch, crash_after):
    monkeypatch.setattr(pystemd.systemd1, "Unit", CrashingUnit)
    CrashingUnit.crash_after = crash_after
    snap = systemd.service_snapshot(systemd.DAEMON_UNIT)
    if snap["active_state"] != "active":
        assert (snap["exec_main_code"], snap["exec_main_status"], snap["result"]) == ("exited", 3, "exit-code")
