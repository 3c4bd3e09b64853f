"""What the steps share: the real systemd calls of AgentUnits (systemd faked at its module) fail closed, and
a run's Context comes from what its checkpoint recorded."""

import pytest

from unbounded_agent import systemd
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset.reports import Recorded
from unbounded_agent.reset.step import AgentUnits, context_from

DAEMON = "unbounded-agent-daemon.service"


@pytest.fixture
def calls(monkeypatch):
    calls = []
    states = {DAEMON: "enabled"}

    def unit_file_state(name):
        if name == "unreadable.service":
            raise systemd.SystemdError(f"cannot read the unit file state of {name}: Access denied")
        return states.get(name, "not-found")

    monkeypatch.setattr(systemd, "unit_file_state", unit_file_state)
    monkeypatch.setattr(systemd, "disable_unit_files", lambda names: calls.append(("disable", *names)))
    monkeypatch.setattr(systemd, "stop_and_wait", lambda name, timeout: calls.append(("stop", name, timeout)) or False)
    monkeypatch.setattr(systemd, "list_units", lambda patterns: calls.append(("list", *patterns)) or ["u@1.service"])
    monkeypatch.setattr(systemd, "unit_state", lambda name: {"active_state": "deactivating"})
    return calls


def test_an_unreadable_unit_file_state_is_an_error_not_disabled(calls):
    with pytest.raises(OpsError) as e:
        AgentUnits().enabled("unreadable.service")
    assert e.value.reason is Reason.INVENTORY_FAILED and "Access denied" in e.value.message
    assert AgentUnits().enabled(DAEMON) and not AgentUnits().enabled("gone.service")


def test_an_unreadable_unit_state_is_an_error_not_stopped(calls, monkeypatch):
    def unreachable(name):
        raise systemd.SystemdError(f"cannot query {name} over D-Bus: Could not open a bus to DBus")
    monkeypatch.setattr(systemd, "unit_state", unreachable)
    monkeypatch.setattr(systemd, "list_units", lambda patterns: unreachable("*"))
    for call in (lambda: AgentUnits().running(DAEMON), lambda: AgentUnits().reporting(DAEMON),
                 lambda: AgentUnits().matching(("u@*.service",))):
        with pytest.raises(OpsError) as e:
            call()
        assert e.value.reason is Reason.INVENTORY_FAILED


def test_a_daemon_reports_only_while_its_process_runs(calls, monkeypatch):
    monkeypatch.setattr(systemd, "unit_state", lambda name: {"active_state": "activating", "main_pid": 0})
    assert AgentUnits().running(DAEMON) and not AgentUnits().reporting(DAEMON)  # waiting to be restarted
    monkeypatch.setattr(systemd, "unit_state", lambda name: {"active_state": "active", "main_pid": 77})
    assert AgentUnits().reporting(DAEMON)


def test_a_path_that_cannot_be_looked_at_is_not_taken_for_absent(tmp_path, monkeypatch):
    from unbounded_agent.reset import step

    assert step.exists(str(tmp_path)) and not step.exists(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    assert not step.exists(str(tmp_path / "file" / "below"))  # under a file: cannot exist

    def eio(path):
        raise OSError(5, "Input/output error", path)
    monkeypatch.setattr(step.os, "lstat", eio)
    with pytest.raises(OpsError) as e:
        step.exists(str(tmp_path))
    assert e.value.reason is Reason.INVENTORY_FAILED and "Input/output error" in e.value.message


def test_a_unit_still_enabled_after_disabling_is_an_error(calls):
    with pytest.raises(OpsError) as e:
        AgentUnits().disable(DAEMON)
    assert e.value.reason is Reason.EXECUTION_FAILED and "still enabled after disabling it" in e.value.message
    assert calls == [("disable", DAEMON)]


def test_a_unit_that_does_not_stop_in_time_is_an_error(calls):
    with pytest.raises(OpsError) as e:
        AgentUnits().stop(DAEMON, 2.5)
    assert (e.value.reason, e.value.message) == (Reason.EXECUTION_FAILED, f"{DAEMON} did not stop within 2.5 s")
    assert calls == [("stop", DAEMON, 2.5)]


def test_matching_and_running(calls):
    assert AgentUnits().matching(("u@*.service", "v-*.service")) == ["u@1.service"]
    assert calls == [("list", "u@*.service", "v-*.service")]
    assert AgentUnits().running(DAEMON)  # deactivating still runs


def test_the_context_takes_the_recorded_places_first_then_the_defaults():
    ctx = context_from(Recorded(config_path="/srv/agent.yaml", machine_name="node-7", bin_dir="/opt/bin",
                                state_dir="/srv/unbounded"), all_wg=True, root="/tmp/x")
    assert (ctx.machine_name, ctx.all_wg, ctx.root) == ("node-7", True, "/tmp/x")
    assert ctx.bin_dirs == ("/opt/bin", "/var/lib/unbounded-agent/bin")
    assert ctx.state_dirs == ("/srv/unbounded", "/var/lib/unbounded-agent")
    assert ctx.config_files == ("/srv/agent.yaml",)
    assert ctx.p("/etc/wireguard") == "/tmp/x/etc/wireguard"
    empty = context_from(Recorded())  # a checkpoint that recorded nothing: the defaults
    assert (empty.bin_dirs, empty.state_dirs, empty.config_files) == (
        ("/var/lib/unbounded-agent/bin",), ("/var/lib/unbounded-agent",), ())
    assert empty.p("/etc/wireguard") == "/etc/wireguard"
