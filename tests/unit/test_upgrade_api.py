"""What the dispatcher calls (upgrade.api): begin records the request and starts the chain — or refuses
with nothing recorded —, follow waits for a terminal record and decides one whose units are all gone,
run does both and goes on with an operation it began before a restart.

follow runs on a fake clock (time only moves when it sleeps), and the "units" are scripted through
the fake systemd: no assertion depends on how fast anything ran."""

import os
import types

import pytest
import upgrade_fakes
from upgrade_fakes import (
    ID,
    SECRET,
    SECRET_URL,
    URL,
    agent_body,
    links,
    make_cfg,
    read,
    run_chain,
    seed,
    sha,
    state_files,
    upgrade_to,
)

from unbounded_agent import fsutil, layout, systemd
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import api, crashes, preflight, probation, record, recovery, stage, switch, units
from unbounded_agent.upgrade.record import QuarantineEntry, Store

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock
release = upgrade_fakes.release
switched = upgrade_fakes.switched

CHAIN = f"unbounded-upgrade-switch@{ID}.service"
DAEMON = systemd.DAEMON_UNIT


@pytest.fixture
def clock(monkeypatch):
    """api's clock: moves only when follow sleeps."""
    t = [0.0]
    monkeypatch.setattr(api, "time", types.SimpleNamespace(monotonic=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s)))
    return t


def spec(id=ID, url=URL, **kw):
    return api.Spec(id=id, operation=f"op-{id}", url=url, **kw)


# -- begin and check ------------------------------------------------------------------------------------


def test_begin_records_the_request_and_starts_the_chain_by_id(cfg, tmp_path, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    host_lock.hold(ID)
    rec = api.begin(cfg, spec(url=f"  {SECRET_URL}  ", sha256="SHA256:" + "AB" * 32))
    assert rec.phase == record.REQUESTED and read(cfg) == rec
    assert rec.id == ID and rec.operation == f"op-{ID}" and rec.kind == "upgrade"
    assert rec.url == URL and rec.expected_sha256 == "ab" * 32 and rec.requested_at
    assert [h.phase for h in rec.history] == ["requested"]
    assert fake_systemd.calls == [("start", CHAIN)]
    store = Store(cfg)
    assert oct(os.stat(store.request_path).st_mode & 0o777) == "0o600"
    req = store.read_request(ID)
    assert (req.url, req.sha256, req.force) == (SECRET_URL, "ab" * 32, False)
    assert SECRET not in store.record_path.read_text()
    assert store.read_request("upgrade-other") is None  # the secret is only for its own operation


def test_begin_a_rollback_needs_no_url(cfg, tmp_path, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    host_lock.hold("rollback-1", "rollback")
    rec = api.begin(cfg, api.Spec(id="rollback-1", operation="rb", kind="rollback", force=True))
    assert (rec.kind, rec.url, rec.force, rec.phase) == ("rollback", "", True, record.REQUESTED)
    assert not Store(cfg).request_path.exists()
    assert fake_systemd.calls == [("start", "unbounded-upgrade-switch@rollback-1.service")]


@pytest.mark.parametrize("url,sha256,words", [
    ("", None, "downloadURL"),
    ("   ", None, "downloadURL"),
    ("ftp://releases.example/a.tar.gz", None, "scheme"),
    ("http://releases.example/a.tar.gz", None, "plain http is refused"),
    ("https://user:token@releases.example/a.tar.gz", None, "user info"),
    ("releases.example/a.tar.gz", None, "absolute"),
    (URL, "not-a-digest", "64 hexadecimal"),
    (URL, "ab" * 31, "64 hexadecimal"),
])
def test_check_refuses_a_bad_request_with_nothing_recorded(cfg, tmp_path, host_lock, fake_systemd, url, sha256, words):
    lay = seed(cfg, tmp_path)
    host_lock.hold(ID)
    before = state_files(cfg), links(lay)
    with pytest.raises(OpsError) as e:
        api.begin(cfg, spec(url=url, sha256=sha256))
    assert e.value.reason == Reason.INVALID_PARAMETERS and words in e.value.message
    assert "token" not in e.value.message
    assert (state_files(cfg), links(lay)) == before and fake_systemd.calls == []
    assert Store(cfg).read() is None


def test_plain_http_is_accepted_when_the_config_allows_it(tmp_path, host_lock, fake_systemd):
    cfg = make_cfg(tmp_path, allow_insecure_http=True)
    seed(cfg, tmp_path)
    host_lock.hold(ID)
    assert api.begin(cfg, spec(url="http://releases.example/a.tar.gz")).url == "http://releases.example/a.tar.gz"


@pytest.mark.parametrize("kind", ["upgrade", "rollback"])
def test_a_host_without_an_agent_is_refused_and_nothing_is_made(cfg, host_lock, fake_systemd, kind):
    """After a reset: an upgrade must not bring the agent's directories back."""
    host_lock.hold(ID, kind)
    with pytest.raises(OpsError) as e:
        api.begin(cfg, spec(kind=kind, url=URL if kind == "upgrade" else ""))
    assert e.value.reason == Reason.EXECUTION_FAILED and "no agent is installed" in e.value.message
    assert not cfg.state_dir.exists() and not cfg.bin_dir.exists() and fake_systemd.calls == []


def test_a_quarantined_archive_digest_is_refused_at_once_unless_forced(cfg, tmp_path, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    store = Store(cfg)
    store.quarantine_add(QuarantineEntry(digest="0" * 64, archive_sha256="ab" * 32, version="2.0.0", operation="op-0",
                                         at="yesterday", failure="exit code 3"))
    host_lock.hold(ID)
    before = state_files(cfg)
    with pytest.raises(OpsError) as e:
        api.begin(cfg, spec(sha256="ab" * 32))
    assert e.value.reason == Reason.QUARANTINED and "--force" in e.value.message and "exit code 3" in e.value.message
    assert state_files(cfg) == before and fake_systemd.calls == []
    rec = api.begin(cfg, spec(sha256="ab" * 32, force=True))
    assert rec.phase == record.REQUESTED and rec.force and fake_systemd.calls == [("start", CHAIN)]


def test_a_chain_that_cannot_be_started_fails_the_operation(cfg, tmp_path, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    host_lock.hold(ID)
    fake_systemd.fail_start.add(CHAIN)
    rec = api.begin(cfg, spec(url=SECRET_URL))
    assert rec.phase == record.FAILED == read(cfg).phase and rec.reason == "ExecutionFailed"
    assert f"cannot start {CHAIN}" in rec.message and "NoSuchUnit" in rec.message
    assert not Store(cfg).request_path.exists()  # the secret does not outlive the operation


def test_begin_refuses_while_another_operations_record_is_in_flight(cfg, tmp_path, host_lock, fake_systemd):
    """One record per host: an upgrade still in flight (its convergence failed, or it was given up)
    must end before the next one begins — overwriting it would stage over the binary its rollback needs."""
    seed(cfg, tmp_path)
    host_lock.hold("upgrade-first")
    api.begin(cfg, spec("upgrade-first"))
    host_lock.hold(ID)
    before = state_files(cfg)
    with pytest.raises(OpsError) as e:
        api.begin(cfg, spec())
    assert e.value.reason == Reason.UPGRADE_IN_PROGRESS and "op-upgrade-first" in e.value.message
    assert state_files(cfg) == before and fake_systemd.calls == [("start", "unbounded-upgrade-switch@upgrade-first.service")]


# -- run: the whole operation -------------------------------------------------------------------------------


def test_run_takes_an_upgrade_to_its_commit(cfg, tmp_path, release, host_lock, fake_systemd, clock):
    lay = seed(cfg, tmp_path)
    release(url=SECRET_URL)
    host_lock.hold(ID)
    fake_systemd.run_units(cfg)
    seen = []
    rec = api.run(cfg, spec(url=SECRET_URL), on_change=lambda r: seen.append(r.phase))
    assert rec.committed and rec.to.version == "2.0.0" and fake_systemd.unit_errors == []
    assert seen == [record.COMMITTED]  # the units ran before follow first looked
    assert [h.phase for h in rec.history] == ["requested", "staging", "staged", "preflighted", "switching",
                                              "probation", "committed"]
    assert lay.link_target(layout.CURRENT) == layout.GREEN and lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert fake_systemd.calls == [("start", CHAIN), ("reset-failed", DAEMON), ("restart", DAEMON),
                                  ("start", units.PROBATION_UNIT)]
    assert all(SECRET not in text.decode(errors="replace") for text in state_files(cfg).values())


def test_run_rolls_back_an_upgrade_whose_daemon_crashes(cfg, tmp_path, release, host_lock, fake_systemd, clock):
    lay = seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    fake_systemd.run_units(cfg)
    restarts = []

    def crash_the_first(name):
        restarts.append(name)
        if len(restarts) == 1:
            fake_systemd.daemon_crashed(3)

    fake_systemd.after_restart = crash_the_first
    rec = api.run(cfg, spec())
    assert rec.phase == record.ROLLED_BACK and rec.reason_enum() is Reason.DAEMON_FAILED
    assert rec.failure.exit_code == 3 and rec.restored_daemon == "active"
    assert lay.link_target(layout.CURRENT) == layout.BLUE == lay.link_target(layout.LAST_GOOD)
    assert ("start", units.RECOVERY_UNIT) in fake_systemd.calls and len(restarts) == 2
    assert Store(cfg).quarantined(sha(agent_body("2.0.0"))) is not None


def test_run_of_a_finished_operation_returns_its_record_and_starts_nothing(cfg, tmp_path, release, host_lock,
                                                                          fake_systemd, clock):
    """The dispatcher restarted after the record became terminal, before it wrote the result."""
    seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    fake_systemd.run_units(cfg)
    first = api.run(cfg, spec())
    fake_systemd.calls.clear()
    assert api.run(cfg, spec()) == first and fake_systemd.calls == []


def test_run_goes_on_with_an_operation_in_flight_without_beginning_it_again(cfg, switched, fake_systemd, clock):
    fake_systemd.run_units(cfg)
    fake_systemd.busy_units.add(units.PROBATION_UNIT)
    ran = []

    def probation_finishes(names):
        if not ran:
            ran.append(probation.run(cfg))  # the probation unit at work while the dispatcher was down
        return []

    fake_systemd.on_busy = probation_finishes
    rec = api.run(cfg, spec())
    assert rec.committed and ran[0].committed
    assert ("start", CHAIN) not in fake_systemd.calls


def test_run_after_a_refusal_raises_and_records_nothing(cfg, tmp_path, host_lock, fake_systemd, clock):
    seed(cfg, tmp_path)
    host_lock.hold(ID)
    with pytest.raises(OpsError) as e:
        api.run(cfg, spec(url="ftp://releases.example/a.tar.gz"))
    assert e.value.reason == Reason.INVALID_PARAMETERS and Store(cfg).read() is None


# -- follow -------------------------------------------------------------------------------------------------


def test_follow_decides_an_operation_whose_units_are_all_gone(cfg, tmp_path, host_lock, fake_systemd, clock):
    seed(cfg, tmp_path)
    host_lock.hold(ID)
    api.begin(cfg, spec())  # its units died before they wrote anything: nothing is busy
    rec = api.follow(Store(cfg), ID)
    assert rec.phase == record.FAILED and "interrupted while requested" in rec.message
    assert clock[0] >= api.IDLE_SECONDS  # it waited the idle time first (on the fake clock)


def test_follow_never_decides_while_a_unit_of_the_operation_is_at_work(cfg, tmp_path, release, host_lock,
                                                                       fake_systemd, clock):
    seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    api.begin(cfg, spec())
    asked = []

    def chain_at_work(names):
        asked.append(list(names))
        if len(asked) < 20:  # far past IDLE_SECONDS of polling
            return [CHAIN]
        run_chain(cfg)  # the chain ends, then probation commits
        probation.run(cfg)
        return []

    fake_systemd.on_busy = chain_at_work
    rec = api.follow(Store(cfg), ID)
    assert rec.committed and clock[0] > 2 * api.IDLE_SECONDS
    assert set(units.chain_units(ID)) < set(asked[0])
    assert {units.PROBATION_UNIT, units.RECOVERY_UNIT} < set(asked[0])


def test_follow_takes_an_unreachable_systemd_for_units_at_work(cfg, tmp_path, release, host_lock, fake_systemd, clock):
    seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    api.begin(cfg, spec())
    calls = []

    def unreachable(names):
        calls.append(1)
        if len(calls) < 20:
            raise systemd.SystemdError("cannot query units over D-Bus: Connection refused")
        run_chain(cfg)
        probation.run(cfg)
        return []

    fake_systemd.on_busy = unreachable
    assert api.follow(Store(cfg), ID).committed


def test_follow_reports_every_change_of_the_record(cfg, tmp_path, release, host_lock, fake_systemd, clock):
    seed(cfg, tmp_path)
    release()
    host_lock.hold(ID)
    api.begin(cfg, spec())
    steps = [lambda: stage.run(cfg, ID), lambda: preflight.run(cfg, ID), lambda: switch.run(cfg, ID),
             lambda: probation.run(cfg)]

    def one_step_per_look(names):
        steps.pop(0)()
        return ["busy"]

    fake_systemd.on_busy = one_step_per_look
    seen = []
    rec = api.follow(Store(cfg), ID, on_change=lambda r: seen.append(r.phase))
    assert rec.committed
    assert seen == ["requested", "staged", "preflighted", "probation", "committed"]


def test_follow_after_an_interrupted_switch_at_boot_leaves_the_starting_daemon_alone(cfg, switched, fake_systemd, clock):
    store = Store(cfg)
    store.advance(store.read(), record.SWITCHING)  # the host stopped right after the links moved
    fake_systemd.run_units(cfg)
    fake_systemd.snapshots = [{"active_state": "inactive", "sub_state": "dead", "job": 7},  # its start job queued
                              {"active_state": "active", "invocation": "inv-boot", "main_pid": 42, "job": 0}]
    rec = api.follow(store, ID)
    assert rec.committed
    assert fake_systemd.calls == [("start", units.PROBATION_UNIT)]


def test_follow_goes_on_when_it_cannot_start_the_unit_that_would_decide(cfg, switched, fake_systemd, clock,
                                                                        monkeypatch):
    """The probation unit cannot start (masked): follow keeps waiting instead of failing the dispatcher,
    and the daemon's OnFailure= recovery, acting under the operation's hold, ends the record."""
    refused = []
    fake_systemd.fail_start.add(units.PROBATION_UNIT)
    real_start = fake_systemd.start_unit

    def start_unit(name, mode="replace"):
        if name in fake_systemd.fail_start:
            refused.append(name)
        return real_start(name, mode)

    recovered = []

    def on_busy(names):
        if len(refused) == 2 and not recovered:  # follow tried twice to decide; the daemon fails: OnFailure=
            recovered.append(True)
            fake_systemd.daemon_crashed(3, active_state="failed", sub_state="failed")
            recovery.run(cfg)
        return []

    monkeypatch.setattr(systemd, "start_unit", start_unit)
    fake_systemd.on_busy = on_busy
    rec = api.follow(Store(cfg), ID)
    assert refused == [units.PROBATION_UNIT] * 2
    assert rec.phase == record.ROLLED_BACK and rec.failure.exit_code == 3


def test_follow_stops_when_the_record_describes_another_operation(cfg, tmp_path, host_lock, fake_systemd, clock):
    seed(cfg, tmp_path)
    host_lock.hold("upgrade-other")
    api.begin(cfg, spec("upgrade-other"))
    with pytest.raises(OpsError) as e:
        api.follow(Store(cfg), ID)
    assert e.value.reason == Reason.EXECUTION_FAILED and ID in e.value.message


def test_orphan_is_a_record_still_in_flight(cfg, tmp_path, release, host_lock, fake_systemd):
    seed(cfg, tmp_path)
    assert api.orphan(cfg) is None
    release()
    host_lock.hold(ID)
    api.begin(cfg, spec())
    assert api.orphan(cfg).id == ID
    run_chain(cfg)
    probation.run(cfg)
    assert api.orphan(cfg) is None


def test_follow_gives_up_on_a_record_nothing_can_bring_to_an_end(cfg, switched, fake_systemd, clock):
    """Deciding is retried with a growing pause, a bounded number of times; then the operation ends (the host is
    released by the dispatcher) instead of holding it for ever, naming the record it leaves."""
    fake_systemd.fail_start.add(units.PROBATION_UNIT)
    started = clock[0]
    with pytest.raises(OpsError) as e:
        api.follow(Store(cfg), ID)
    assert e.value.reason is Reason.EXECUTION_FAILED
    assert f"still not ended after deciding it {api.MAX_DECISIONS} times" in e.value.message
    assert "in phase probation" in e.value.message and "not found" in e.value.message
    assert clock[0] - started >= api.DECIDE_BACKOFF_MAX  # the pauses grew (on the fake clock)
    assert read(cfg).phase == record.PROBATION


# -- recover: a committed upgrade whose daemon keeps failing ----------------------------------------------------


def committed_with_crashes(cfg, tmp_path, release, host_lock, fake_systemd, n=crashes.CRASHES):
    """v2 committed over v1; then n crashes of v2 kept by the daemon's ExecStopPost=."""
    lay = seed(cfg, tmp_path)
    release()
    rec = upgrade_to(cfg, host_lock, fake_systemd, ID)
    store = Store(cfg)
    t = rec.phase_time(record.COMMITTED)
    env = {"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "1"}
    for i in range(n):
        crashes.record_exit(store, dict(env, INVOCATION_ID=f"crash{i}"), t + 15 + 20 * i)
    fake_systemd.journal(unit_lines=["ready, will crash", "fatal: crashed after ready (simulated)"])
    fake_systemd.calls.clear()
    host_lock.hold(ID, "recover")  # as the dispatcher holds it for a recover request
    return lay


def test_recover_rolls_a_committed_upgrade_back_after_its_commit(cfg, tmp_path, release, host_lock, fake_systemd,
                                                                 clock):
    lay = committed_with_crashes(cfg, tmp_path, release, host_lock, fake_systemd)
    fake_systemd.run_units(cfg)
    rec, note = api.recover(cfg, "recover-1", ID, "the committed daemon crashed 3 times within 600 s of its commit")
    assert note == "" and rec.phase == record.ROLLED_BACK and rec.after_commit and rec.reopened_by == "recover-1"
    assert rec.reason == "DaemonFailedAfterCommit" and "failed after its commit" in rec.message
    assert rec.failure.exit_code == 1 and "crashed 3 times" in rec.failure.detail
    assert "fatal: crashed after ready (simulated)" in rec.failure.journal
    assert [h.phase for h in rec.history][-3:] == ["committed", "recovering", "rolled-back"]
    assert lay.link_target(layout.CURRENT) == layout.BLUE == lay.link_target(layout.LAST_GOOD)
    assert Store(cfg).quarantined(sha(agent_body("2.0.0"))) is not None
    assert fake_systemd.calls[:1] == [("start", units.RECOVERY_UNIT)]


@pytest.mark.parametrize("change, words", [
    ("moved on", "nothing to recover: "),
    ("other binary", "no longer selects the binary"),
    ("no last-good", "nothing to roll back to"),
])
def test_recover_with_nothing_to_recover_changes_nothing(cfg, tmp_path, release, host_lock, fake_systemd, clock,
                                                         change, words):
    lay = committed_with_crashes(cfg, tmp_path, release, host_lock, fake_systemd)
    target = ID
    if change == "moved on":
        target = "upgrade-older"
    elif change == "other binary":
        fsutil.atomic_symlink(layout.BLUE, lay.path(layout.CURRENT))
    else:
        fsutil.atomic_symlink(layout.GREEN, lay.path(layout.LAST_GOOD))
    before = state_files(cfg), links(lay)
    rec, note = api.recover(cfg, "recover-1", target, "x")
    assert rec is None and words in note
    assert (state_files(cfg), links(lay)) == before and fake_systemd.calls == []


def test_recover_goes_on_with_the_record_it_reopened_before_a_restart(cfg, tmp_path, release, host_lock,
                                                                     fake_systemd, clock):
    committed_with_crashes(cfg, tmp_path, release, host_lock, fake_systemd)
    store = Store(cfg)
    store.advance(read(cfg), record.RECOVERING, after_commit=True, reopened_by="recover-1")
    fake_systemd.run_units(cfg)
    rec, _ = api.recover(cfg, "recover-1", ID, "x")
    assert rec.phase == record.ROLLED_BACK and rec.after_commit


def test_follow_ends_sooner_while_the_state_dir_refuses_writes(cfg, switched, fake_systemd, clock, monkeypatch):
    """Each decision is still made (recovery rolls back from the links without writing), but after a few made
    while the state dir refuses writes the operation ends with StateUnwritable."""
    fake_systemd.fail_start.add(units.PROBATION_UNIT)
    monkeypatch.setattr(api, "_unwritable", lambda directory: "No space left on device")
    with pytest.raises(OpsError) as e:
        api.follow(Store(cfg), ID)
    assert e.value.reason is Reason.STATE_UNWRITABLE and "No space left on device" in e.value.message
    assert f"after deciding it {api.MAX_REFUSALS} times" in e.value.message
