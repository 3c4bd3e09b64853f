"""The units of an upgrade: named by the request id (used as it is, unlike the URLs the units were once
named by), and which of them count as still at work on a record."""

import re

import pytest
import upgrade_fakes

from unbounded_agent.queue.spool import new_id
from unbounded_agent.upgrade import units
from unbounded_agent.upgrade.record import UpgradeRecord

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
fake_systemd = upgrade_fakes.fake_systemd

LONGEST_ID = "upgrade-" + "a" * 55  # the spool accepts ids of up to 63 characters


def test_the_chain_is_named_by_the_id_and_started_from_its_last_step():
    assert units.chain_units("upgrade-1") == ["unbounded-upgrade-stage@upgrade-1.service",
                                               "unbounded-upgrade-preflight@upgrade-1.service",
                                               "unbounded-upgrade-switch@upgrade-1.service"]
    assert units.chain_start("upgrade-1") == "unbounded-upgrade-switch@upgrade-1.service"


# Named ids: new_id() differs per process, and parallel workers must collect the same test names.
@pytest.mark.parametrize("id", [new_id("upgrade"), new_id("rollback"), LONGEST_ID], ids=["upgrade", "rollback", "longest"])
def test_a_request_id_is_a_valid_unit_instance_as_it_is(id):
    """The units pass %i (the instance as written) to their steps: an id made only of characters a unit
    name may hold reaches the step unchanged, whatever its length within the spool's bound."""
    for name in units.chain_units(id):
        assert re.fullmatch(r"unbounded-upgrade-[a-z]+@[A-Za-z0-9:_.\\-]+\.service", name)
        assert name.split("@", 1)[1].removesuffix(".service") == id
        assert len(name) <= units.MAX_UNIT_NAME


def test_busy_units_asks_for_the_chain_probation_and_recovery(fake_systemd):
    fake_systemd.busy_units |= {"unbounded-upgrade-preflight@upgrade-1.service", units.RECOVERY_UNIT,
                                "unbounded-upgrade-stage@upgrade-2.service"}
    asked = []
    fake_systemd.on_busy = lambda names: asked.extend(names) or [n for n in names if n in fake_systemd.busy_units]
    busy = units.busy_units(UpgradeRecord(id="upgrade-1", operation="op"))
    assert busy == ["unbounded-upgrade-preflight@upgrade-1.service", units.RECOVERY_UNIT]
    assert asked == units.chain_units("upgrade-1") + [units.PROBATION_UNIT, units.RECOVERY_UNIT]


def test_the_callers_own_unit_does_not_count(fake_systemd, monkeypatch):
    monkeypatch.setattr(units, "own_unit", lambda: units.PROBATION_UNIT)
    fake_systemd.busy_units |= {units.PROBATION_UNIT}
    assert units.busy_units(UpgradeRecord(id="upgrade-1", operation="op")) == []


UNIT_DIR = __import__("pathlib").Path(__file__).resolve().parents[2] / "units"


def test_no_unit_shows_the_instance_it_runs_for_in_its_description():
    """The unit name of unbounded-upgrade@<URL> is visible to every local user (README): the URL must not be
    repeated in Description=, and only the chain's units, keyed by request ids, name their instance."""
    for unit in sorted(UNIT_DIR.glob("*.service")):
        description = re.search(r"^Description=(.*)$", unit.read_text(), re.M)[1]
        assert "%I" not in description, unit.name
        if unit.name == "unbounded-upgrade@.service":
            assert "%i" not in description


def test_the_unit_bounds_follow_the_config(tmp_path):
    from unbounded_agent import config

    cfg = config.load(str(tmp_path / "absent.yaml"))
    assert units.stage_seconds(cfg) == cfg.download_deadline_seconds + units.STAGE_MARGIN_SECONDS
    assert units.preflight_seconds(cfg) == cfg.preflight_timeout_seconds + units.PREFLIGHT_MARGIN_SECONDS
    # probation waits out the old daemon's stop, then every watch it may make; recovery one start-limit wait
    assert units.probation_seconds(cfg) > units.STOP_BOUND_SECONDS + (units.MAX_REWATCH + 1) * (
        cfg.ready_timeout_seconds + cfg.probation_seconds)
    assert units.recovery_seconds(cfg) > units.START_LIMIT_WAIT_MAX + units.STOP_BOUND_SECONDS + cfg.ready_timeout_seconds
    assert units.STOP_BOUND_SECONDS >= 2 * units.DAEMON_STOP_SECONDS
    daemon = (UNIT_DIR / "unbounded-agent-daemon.service").read_text()
    assert f"\nTimeoutStopSec={units.DAEMON_STOP_SECONDS}\n" in daemon


def test_forget_waits_for_the_chain_to_go_idle_then_clears_its_failed_steps(monkeypatch):
    calls, busy = [], [["unbounded-upgrade-preflight@upgrade-1.service"]] * 2 + [[]]

    def reset_failed(name):
        calls.append(("reset-failed", name))
        if "stage@" in name:  # collected already: systemd no longer knows it
            raise units.systemd.SystemdError("Unit unbounded-upgrade-stage@upgrade-1.service not loaded.")

    monkeypatch.setattr(units.systemd, "busy", lambda names: calls.append(("busy", len(names))) or busy.pop(0))
    monkeypatch.setattr(units.systemd, "reset_failed", reset_failed)
    monkeypatch.setattr(units.time, "sleep", lambda s: None)
    units.forget("upgrade-1")
    assert calls == [("busy", 3)] * 3 + [("reset-failed", u) for u in units.chain_units("upgrade-1")]


def test_forget_gives_up_waiting_after_its_bound(monkeypatch):
    cleared, now = [], [0.0]

    def sleep(s):
        now[0] += s

    monkeypatch.setattr(units.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(units.time, "sleep", sleep)
    monkeypatch.setattr(units.systemd, "busy", lambda names: names)  # a step that never ends
    monkeypatch.setattr(units.systemd, "reset_failed", cleared.append)
    units.forget("upgrade-1", wait=2.0)
    assert 2.0 <= now[0] < 2.2 and cleared == units.chain_units("upgrade-1")
