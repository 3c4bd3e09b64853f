"""Probation, recovery and resume in-process against scripted daemon states: when an upgrade is
committed, when it is rolled back (with the real exit detail and a quarantine), and how an
interrupted record converges."""

import json

import pytest

from archives import valid_archive
from upgrade_fakes import agent_body, cfg, fake_download, fake_systemd, seed  # noqa: F401
from unbounded_agent import (layout, upgrade, upgrade_preflight, upgrade_probation, upgrade_recovery,
                             upgrade_resume, upgrade_stage, upgrade_switch)
from unbounded_agent.reasons import OpsError

URL = "https://releases.example/v2.tar.gz"
INST = upgrade.escape(URL)


@pytest.fixture
def switched(cfg, tmp_path, monkeypatch, fake_systemd):
    """v1 in blue → v2 staged in green, preflighted and switched: the record is on probation."""
    lay = seed(cfg, tmp_path)
    fake_download(monkeypatch, {URL: valid_archive(tmp_path / "v2.tar.gz", agent_body("2.0.0"))})
    upgrade_stage.run(cfg, INST)
    upgrade_preflight.run(cfg, INST)
    upgrade_switch.run(cfg, INST)
    fake_systemd.calls.clear()
    return lay


def crashed(status=3, **kw):
    return {"invocation": "inv2", "active_state": "activating", "sub_state": "auto-restart", "result": "exit-code",
            "exec_main_code": "exited", "exec_main_status": status, **kw}


def test_watch_passes_a_daemon_that_gets_ready_and_stays(cfg):
    snaps = iter([{"invocation": "old", "active_state": "active", "job": 1},  # restart queued
                  {"invocation": "new", "active_state": "activating", "sub_state": "start", "job": 1},
                  *[{"invocation": "new", "active_state": "active", "sub_state": "running", "job": 0,
                     "main_pid": 7, "n_restarts": 0}] * 50])
    t = [0.0]
    assert upgrade_probation.watch(cfg, "old", snapshot=lambda: next(snaps), clock=lambda: t[0],
                                   sleep=lambda s: t.__setitem__(0, t[0] + s)) is None


@pytest.mark.parametrize("snaps,expect", [
    ([crashed(3)], {"exit_code": 3}),
    ([crashed(9, exec_main_code="killed", result="signal")], {"signal": "SIGKILL"}),
    ([{"invocation": "new", "active_state": "active", "job": 0, "main_pid": 7, "n_restarts": 0},
      crashed(3, invocation="new")], {"exit_code": 3}),
    ([{"invocation": "new", "active_state": "activating", "sub_state": "start", "job": 1}], {"result": None}),
])
def test_watch_reports_how_the_new_daemon_failed(cfg, snaps, expect):
    base = {"sub_state": "running", "job": 0, "main_pid": 7, "n_restarts": 0, "result": None,
            "exec_main_code": None, "exec_main_status": 0}
    seq = [dict(base, **s) for s in snaps]
    t = [0.0]

    def snapshot():
        return seq.pop(0) if len(seq) > 1 else seq[0]

    failure = upgrade_probation.watch(cfg, "old", snapshot=snapshot, clock=lambda: t[0],
                                      sleep=lambda s: t.__setitem__(0, t[0] + s))
    assert failure is not None
    for k, v in expect.items():
        if v is None:
            assert "did not report ready within 2 s" in failure["detail"]
        else:
            assert failure[k] == v


def test_failed_probation_rolls_back_quarantines_and_signals(cfg, switched, fake_systemd):
    lay = switched
    fake_systemd.daemon.update(crashed(3))
    rec = upgrade_probation.run(cfg)
    assert rec["phase"] == upgrade.RECOVERING and rec["failure"]["exit_code"] == 3
    assert ("start", upgrade.RECOVERY_UNIT) in fake_systemd.calls
    assert lay.link_target(layout.CURRENT) == layout.GREEN  # probation itself changes no link
    fake_systemd.daemon.update(invocation="inv3", active_state="active", sub_state="running")
    rec = upgrade_recovery.run(cfg)
    assert rec["phase"] == upgrade.ROLLED_BACK and rec["reason"] == "DaemonFailed"
    assert "rolled back to 1.0.0" in rec["message"] and "exit code 3" in rec["message"]
    assert lay.link_target(layout.CURRENT) == layout.BLUE and lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert ("restart", "unbounded-agent-daemon.service") in fake_systemd.calls
    signal = json.loads((cfg.state_dir / upgrade.SIGNAL_FILE).read_text())
    assert signal["failed"]["version"] == "2.0.0" and signal["failure"]["exit_code"] == 3
    assert "rolled back" in signal["failureMessage"]
    assert upgrade.Store(cfg).quarantined(rec["to"]["digest"])["version"] == "2.0.0"
    # the next request for the same release is refused
    with pytest.raises(OpsError) as e:
        upgrade_stage.run(cfg, INST)
    assert e.value.reason.value == "Quarantined"


def test_recovery_outside_probation_changes_nothing(cfg, tmp_path, fake_systemd):
    lay = seed(cfg, tmp_path)
    assert upgrade_recovery.run(cfg) is None
    assert lay.link_target(layout.CURRENT) == layout.BLUE and fake_systemd.calls == []


def test_recovery_via_onfailure_records_the_start_limit(cfg, switched, fake_systemd):
    fake_systemd.daemon.update(crashed(3, active_state="failed", sub_state="failed", result="start-limit-hit"))
    rec = upgrade_recovery.run(cfg)
    assert rec["phase"] == upgrade.ROLLED_BACK and rec["failure"]["result"] == "start-limit-hit"
    assert rec["failure"]["exit_code"] == 3


def test_recovery_waits_out_the_start_limit_when_restart_is_refused(cfg, switched, fake_systemd, monkeypatch):
    slept = []
    monkeypatch.setattr(upgrade_recovery.time, "sleep", lambda s: slept.append(s))
    fake_systemd.fail_restart = True
    upgrade.Store(cfg).advance(upgrade.Store(cfg).read(), upgrade.RECOVERING, failure={"detail": "x"})
    rec = upgrade_recovery.run(cfg)
    assert rec["phase"] == upgrade.ROLLED_BACK
    assert slept[0] == 65.0 and ("start", "unbounded-agent-daemon.service") in fake_systemd.calls


@pytest.mark.parametrize("phase", [upgrade.REQUESTED, upgrade.STAGING, upgrade.STAGED, upgrade.PREFLIGHTED])
def test_resume_fails_an_upgrade_interrupted_before_the_switch(cfg, switched, fake_systemd, phase):
    lay = switched
    store = upgrade.Store(cfg)
    # pretend the switch never happened
    from unbounded_agent import fsutil
    fsutil.atomic_symlink(layout.BLUE, lay.path(layout.CURRENT))
    store.advance(store.read(), phase)
    rec = upgrade_resume.run(cfg)
    assert rec["phase"] == upgrade.FAILED and "interrupted" in rec["message"]
    assert lay.link_target(layout.CURRENT) == layout.BLUE


def test_resume_after_the_switch_goes_back_on_probation(cfg, switched, fake_systemd):
    store = upgrade.Store(cfg)
    store.advance(store.read(), upgrade.SWITCHING)
    rec = upgrade_resume.run(cfg)
    assert rec["phase"] == upgrade.PROBATION
    assert ("restart", "unbounded-agent-daemon.service") in fake_systemd.calls
    assert ("start", upgrade.PROBATION_UNIT) in fake_systemd.calls


def test_resume_at_boot_does_not_restart_the_starting_daemon(cfg, switched, fake_systemd):
    store = upgrade.Store(cfg)
    store.advance(store.read(), upgrade.SWITCHING)
    fake_systemd.daemon.update(active_state="inactive", job=5)
    rec = upgrade_resume.run(cfg)
    assert rec["phase"] == upgrade.PROBATION
    assert fake_systemd.calls == [("start", upgrade.PROBATION_UNIT)]


def test_resume_switch_before_links_moved_fails_cleanly(cfg, switched, fake_systemd):
    lay = switched
    store = upgrade.Store(cfg)
    from unbounded_agent import fsutil
    fsutil.atomic_symlink(layout.BLUE, lay.path(layout.CURRENT))
    store.advance(store.read(), upgrade.SWITCHING)
    rec = upgrade_resume.run(cfg)
    assert rec["phase"] == upgrade.FAILED and "before the switch" in rec["message"]


def test_resume_leaves_an_upgrade_whose_units_are_at_work(cfg, switched, fake_systemd):
    fake_systemd.busy_units.add(upgrade.PROBATION_UNIT)
    assert upgrade_resume.run(cfg)["phase"] == upgrade.PROBATION
    assert fake_systemd.calls == []


def test_probation_gives_up_after_repeated_interruptions(cfg, switched, fake_systemd):
    store = upgrade.Store(cfg)
    rec = store.read()
    rec["probation"]["attempts"] = upgrade_probation.MAX_ATTEMPTS
    store.write(rec)
    rec = upgrade_probation.run(cfg)
    assert rec["phase"] == upgrade.RECOVERING and "interrupted" in rec["failure"]["detail"]


def test_resume_after_a_failure_waits_for_finishing_units_then_resolves(cfg, switched, fake_systemd):
    """A step's OnFailure= resume may start while units of the same chain are still finishing: it
    waits (bounded) for them instead of deciding on a stale view."""
    import threading

    fake_systemd.busy_units.add(upgrade.PROBATION_UNIT)
    threading.Timer(0.6, fake_systemd.busy_units.clear).start()
    rec = upgrade_resume.run(cfg, "unbounded-upgrade-probation", wait=10)
    assert rec["phase"] == upgrade.PROBATION and ("start", upgrade.PROBATION_UNIT) in fake_systemd.calls


def test_resume_after_a_failure_gives_up_when_units_stay_at_work(cfg, switched, fake_systemd):
    fake_systemd.busy_units.add(upgrade.PROBATION_UNIT)
    rec = upgrade_resume.run(cfg, "unbounded-upgrade-stage", wait=0.5)
    assert rec["phase"] == upgrade.PROBATION and fake_systemd.calls == []
