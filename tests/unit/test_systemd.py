"""The one D-Bus layer: a unit file state is "not-found" only when a reachable systemd says so. pystemd reports
a bus it cannot open with the same errno as a missing unit file, so where the error came from decides. Questions
a daemon-reload drops are asked again; orders never twice. A snapshot never shows a run ended without its exit."""

import pystemd.dbuslib
import pytest
from pystemd.dbusexc import DBusFileNotFoundError

from unbounded_agent import systemd


class Reply:
    def __init__(self, body):
        self.body = body


class FakeBus:
    """pystemd's DBus: opening it or a call may fail as pystemd fails; manager methods answer from `answers`,
    unit properties from `props` (a callable given the property's name)."""

    connect_error: Exception | None = None
    call_error: Exception | None = None
    answers: dict = {"GetUnitFileState": b"enabled"}
    props = None
    calls: list = []

    def open(self):
        if FakeBus.connect_error:
            raise FakeBus.connect_error

    def close(self):
        pass

    def call_method(self, destination, path, interface, method, args):
        FakeBus.calls.append(method.decode())
        if FakeBus.call_error:
            raise FakeBus.call_error
        answer = FakeBus.answers[method.decode()]
        return Reply(answer() if callable(answer) else answer)

    def get_property(self, destination, path, interface, prop, kind):
        return FakeBus.props(prop.decode())


@pytest.fixture
def manager(monkeypatch):
    class M(FakeBus):
        pass
    monkeypatch.setattr(pystemd.dbuslib, "DBus", M)
    monkeypatch.setattr(FakeBus, "connect_error", None)
    monkeypatch.setattr(FakeBus, "call_error", None)
    monkeypatch.setattr(FakeBus, "answers", dict(FakeBus.answers))
    monkeypatch.setattr(FakeBus, "calls", [])
    return FakeBus


def enoent(message: bytes) -> DBusFileNotFoundError:
    """The error pystemd raises for errno -2 (ENOENT), with its message."""
    e = DBusFileNotFoundError(-2)
    e.err_message = message
    return e


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


def dropped():
    e = DBusFileNotFoundError(-104)
    e.err_message = b"Message recipient disconnected from message bus without replying"
    return e


@pytest.fixture
def reloading(manager, monkeypatch):
    """A manager whose first answers a daemon-reload drops (its bus connection closes while it reloads)."""
    monkeypatch.setattr(systemd, "RELOAD_RETRY_SECONDS", 0)

    class Reloading:
        dropped = 0
        started: list = []

        @staticmethod
        def answer(value):
            def reply():
                if Reloading.dropped:
                    Reloading.dropped -= 1
                    raise dropped()
                return value() if callable(value) else value
            return reply

    manager.answers["ListJobs"] = Reloading.answer(
        [(7, b"a.service", b"start", b"running", b"/org/freedesktop/systemd1/job/7", b"/u")])
    manager.answers["StartUnit"] = Reloading.answer(
        lambda: Reloading.started.append(b"a.service") or b"/org/freedesktop/systemd1/job/8")
    return Reloading


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


def crashing_after(k: int):
    """A daemon unit that crashes (exit code 3) after the k-th property read of a snapshot: each property is its
    own D-Bus call, so the service may move between any two of them."""
    reads = [0]
    running = {"ActiveState": b"active", "SubState": b"running", "ExecMainCode": 0, "ExecMainStatus": 0,
               "Result": b"success", "MainPID": 7}
    crashed = {"ActiveState": b"deactivating", "SubState": b"stop-post", "ExecMainCode": 1, "ExecMainStatus": 3,
               "Result": b"exit-code", "MainPID": 0}
    other = {"InvocationID": bytes.fromhex("ab" * 16), "Job": (0, b"/"), "NRestarts": 0, "StatusText": b"",
             "LoadState": b"loaded", "InactiveExitTimestampMonotonic": 1, "InactiveExitTimestamp": 1,
             "ExecMainPID": 7}

    def read(prop):
        reads[0] += 1
        return (crashed if reads[0] > k else running).get(prop, other.get(prop))
    return read


@pytest.mark.parametrize("crash_after", range(16))
def test_a_snapshot_that_shows_a_run_ended_also_shows_how(manager, crash_after):
    manager.props = crashing_after(crash_after)
    snap = systemd.service_snapshot(systemd.DAEMON_UNIT)
    if snap["active_state"] != "active":
        assert (snap["exec_main_code"], snap["exec_main_status"], snap["result"]) == ("exited", 3, "exit-code")


def test_busy_asks_once_for_all_the_units_and_keeps_their_order(manager):
    def unit(name, active, job):  # as ListUnitsByNames answers: (name, description, load, active, sub, following,
        return (name, b"", b"loaded", active, b"", b"", b"/", job, b"", b"/")  # path, job id, job type, job path)
    manager.answers["ListUnitsByNames"] = [unit(b"b.service", b"inactive", 0), unit(b"a.service", b"activating", 0),
                                           unit(b"c.service", b"inactive", 5), unit(b"d.service", b"failed", 0)]
    assert systemd.busy(["c.service", "b.service", "a.service", "d.service"]) == ["c.service", "a.service"]
    assert manager.calls == ["ListUnitsByNames"]
    assert systemd.busy([]) == [] and manager.calls == ["ListUnitsByNames"]
