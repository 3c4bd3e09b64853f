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
