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


@pytest.mark.parametrize("id", [new_id("upgrade"), new_id("rollback"), LONGEST_ID])
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
