"""`unbounded-agent upgrade|rollback` and `unbounded-upgrade@<URL>.service` (cli/upgrade.py): what is
refused before anything is queued, what is queued, how a request is followed to its result, and the
progress line.

Where the CLI waits, its sleep is the test's dispatcher: each poll moves the queue one step, so what the
CLI sees does not depend on timing."""

import io
import json
import os
import types

import pytest
import upgrade_fakes
from upgrade_fakes import SECRET_URL, URL

from unbounded_agent import cli, config
from unbounded_agent.cli import upgrade as cli_upgrade
from unbounded_agent.cli.upgrade import ProgressLine
from unbounded_agent.queue.spool import Request, Result, Spool
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade.record import Download, PhaseEntry, Store, UpgradeRecord

# the fixtures of upgrade_fakes this module uses, under the names pytest finds them by
cfg = upgrade_fakes.cfg


@pytest.fixture
def env(cfg, tmp_path, monkeypatch):
    """An empty queue, the test's config file (absent: defaults, but the state dir of cfg), root."""
    path = tmp_path / "config.yaml"
    path.write_text(f"stateDir: {cfg.state_dir}\nbinDir: {cfg.bin_dir}\n")
    monkeypatch.setenv(config.ENV_CONFIG, str(path))
    monkeypatch.setattr(cli_upgrade.os, "geteuid", lambda: 0)
    return types.SimpleNamespace(spool=Spool(), config=path, cfg=config.load())


def queued(spool: Spool) -> list[Request]:
    return [r for _, r in spool.queue()]


def requests_on_disk(spool: Spool) -> list:
    return sorted(spool.requests.iterdir()) if spool.requests.exists() else []


# -- refused before anything is queued ----------------------------------------------------------------------


@pytest.mark.parametrize("argv,words", [
    (["upgrade", "ftp://releases.example/a.tar.gz"], "scheme"),
    (["upgrade", "http://releases.example/a.tar.gz"], "plain http is refused"),
    (["upgrade", "https://user:token@releases.example/a.tar.gz"], "user info"),
    (["upgrade", URL, "--sha256", "xyz"], "64 hexadecimal"),
    (["upgrade", " "], "downloadURL"),
])
def test_a_bad_request_is_refused_and_nothing_is_queued(env, capsys, argv, words):
    assert cli.main(argv) == Reason.INVALID_PARAMETERS.exit_code == 4
    err = capsys.readouterr().err
    assert "InvalidParameters" in err and words in err and "token" not in err
    assert requests_on_disk(env.spool) == []


def test_not_root_is_refused_and_nothing_is_queued(env, monkeypatch, capsys):
    monkeypatch.setattr(cli_upgrade.os, "geteuid", lambda: 1000)
    assert cli.main(["upgrade", URL]) == 4
    assert cli.main(["rollback"]) == 4
    assert "run it as root" in capsys.readouterr().err
    assert requests_on_disk(env.spool) == []


def test_a_broken_config_is_refused_and_nothing_is_queued(env, capsys):
    env.config.write_text("probationSecondz: 3\n")
    assert cli.main(["upgrade", URL]) == Reason.INVALID_CONFIG.exit_code
    assert "probationSecondz" in capsys.readouterr().err and requests_on_disk(env.spool) == []


def test_an_upgrade_is_refused_while_a_reset_is_queued(env, capsys):
    env.spool.submit(Request(id="reset-1", kind="reset"))
    assert cli.main(["upgrade", URL]) == Reason.SUPERSEDED.exit_code
    assert "reset reset-1" in capsys.readouterr().err
    assert [r.kind for r in queued(env.spool)] == ["reset"]


# -- queued ---------------------------------------------------------------------------------------------------


def test_an_upgrade_is_queued_with_its_full_url_in_a_private_file(env, capsys):
    assert cli.main(["upgrade", f" {SECRET_URL} ", "--sha256", "sha256:" + "AB" * 32, "--force"]) == 0
    (path, req), = env.spool.queue()
    assert req.kind == "upgrade" and req.source == "cli" and req.id.startswith("upgrade-")
    assert (req.url, req.sha256, req.force) == (SECRET_URL, "ab" * 32, True)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    out = capsys.readouterr().out
    assert f"upgrade {req.id} queued" in out and "unbounded-agent status" in out
    assert "sig=" not in out


def test_a_rollback_is_queued(env, capsys):
    assert cli.main(["rollback"]) == 0
    (req,) = queued(env.spool)
    assert (req.kind, req.url, req.force, req.source) == ("rollback", "", False, "cli")


# -- waiting for the result -----------------------------------------------------------------------------------


class Dispatcher:
    """The test's stand-in for the dispatcher, one step per poll of the CLI: claim the request, write the
    upgrade record's phases one by one, then the result."""

    def __init__(self, cfg, spool: Spool, result: dict | None = None, phases=("staging", "staged", "probation")):
        self.store = Store(cfg)
        self.spool = spool
        self.result = result or {}
        self.phases = list(phases)
        self.rec: UpgradeRecord | None = None
        self.polls = 0

    def step(self, _seconds=None):
        self.polls += 1
        claimed = self.spool.claimed()
        if claimed is None:
            path, req = self.spool.claim_next()
            self.rec = UpgradeRecord(id=req.id, operation=req.name, kind=req.kind)
            self.store.advance(self.rec, "requested")
        elif self.phases:
            self.store.advance(self.rec, self.phases.pop(0))
        else:
            path, req = claimed
            done = self.result.get("phase", "committed")
            self.store.advance(self.rec, done)
            self.spool.finish(path, Result(id=req.id, kind=req.kind, operation=req.name, source=req.source,
                                           **{"succeeded": True, "reason": "Succeeded", "message": "upgraded",
                                              **{k: v for k, v in self.result.items() if k != "phase"}}))


@pytest.fixture
def dispatcher(env, monkeypatch):
    def make(**kw):
        d = Dispatcher(env.cfg, env.spool, **kw)
        monkeypatch.setattr(cli_upgrade, "time", types.SimpleNamespace(sleep=d.step, monotonic=lambda: float(d.polls)))
        return d

    return make


def test_wait_follows_every_phase_to_the_result(env, dispatcher, capsys):
    dispatcher()
    assert cli.main(["upgrade", URL, "--wait"]) == 0
    out = capsys.readouterr().out.splitlines()
    req_id = out[0].split()[1]
    assert out == [f"upgrade {req_id} queued", f"upgrade {req_id}: requested", f"upgrade {req_id}: staging",
                   f"upgrade {req_id}: staged", f"upgrade {req_id}: probation (daemon restarted; watching it)",
                   f"upgrade {req_id}: committed", f"upgrade {req_id} succeeded: upgraded"]


def test_wait_exits_with_the_failures_code(env, dispatcher, capsys):
    dispatcher(result={"phase": "rolled-back", "succeeded": False, "reason": "DaemonFailed",
                       "message": "version 2.0.0 failed on probation"})
    assert cli.main(["upgrade", URL, "--wait"]) == Reason.DAEMON_FAILED.exit_code == 15
    assert "failed (DaemonFailed): version 2.0.0 failed on probation" in capsys.readouterr().err


@pytest.mark.parametrize("target,kind", [(SECRET_URL, "upgrade"), ("rollback", "rollback")])
def test_the_unit_queues_and_waits(env, dispatcher, capsys, target, kind):
    d = dispatcher(phases=())
    submitted = []
    submit = env.spool.submit

    def spy(self, req):
        submitted.append(req)
        return submit(req)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Spool, "submit", spy)
        assert cli_upgrade.unit_main([target]) == 0
    (req,) = submitted
    assert (req.kind, req.source, req.url) == (kind, "systemctl", SECRET_URL if kind == "upgrade" else "")
    assert d.polls == 2 and "sig=" not in capsys.readouterr().out  # claimed, then its result


def test_follow_names_what_the_request_waits_behind(env, dispatcher):
    spool = env.spool
    first = spool.submit(Request(id="upgrade-first", kind="upgrade", operation="mop-first", url=URL))
    mine = spool.submit(Request(id="upgrade-mine", kind="upgrade", url=URL))
    dispatcher(phases=())
    waits, records = [], []

    def on_waiting(ahead, seconds):
        waits.append(ahead.id if ahead else None)
        path, req = spool.claim_next()  # the dispatcher runs the first one to its end
        spool.finish(path, Result(id=req.id, kind=req.kind, operation=req.name, source="cli", succeeded=True,
                                  reason="Succeeded", message="ok"))

    result = cli_upgrade.follow(env.cfg, spool, mine.id, on_record=records.append, on_waiting=on_waiting)
    assert waits == [first.id]
    assert result.id == mine.id and result.succeeded
    assert [r.phase for r in records] == ["requested", "committed"] and all(r.id == mine.id for r in records)


def test_follow_ignores_a_record_of_another_operation(env):
    spool = env.spool
    Store(env.cfg).advance(UpgradeRecord(id="upgrade-older", operation="older"), "probation")
    mine = spool.submit(Request(id="upgrade-mine", kind="upgrade", url=URL))
    path, _ = spool.claim_next()
    records = []
    polls = []

    def finish_after_a_look(rec):
        records.append(rec)

    def sleep(_):
        polls.append(1)
        spool.finish(path, Result(id=mine.id, kind="upgrade", operation=mine.id, source="cli", succeeded=False,
                                  reason="UpgradeInProgress", message="older in flight"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_upgrade, "time", types.SimpleNamespace(sleep=sleep, monotonic=lambda: 0.0))
        result = cli_upgrade.follow(env.cfg, spool, mine.id, on_record=finish_after_a_look)
    assert polls == [1] and records == [] and result.exit_code() == Reason.UPGRADE_IN_PROGRESS.exit_code


def test_follow_fails_when_the_request_leaves_the_queue_without_a_result(env):
    spool = env.spool
    mine = spool.submit(Request(id="upgrade-mine", kind="upgrade", url=URL))
    (path, _), = spool.queue()
    spool.drop(path)
    with pytest.raises(OpsError) as e:
        cli_upgrade.follow(env.cfg, spool, mine.id, poll=0)
    assert e.value.reason == Reason.EXECUTION_FAILED and "without a result" in e.value.message


# -- the progress line -----------------------------------------------------------------------------------------


def rec(phase, history, progress=None):
    return UpgradeRecord(id="upgrade-1", operation="op", phase=phase, progress=progress,
                         history=[PhaseEntry(p, "t", 0.0) for p in history])


def test_phases_missed_between_polls_are_still_shown():
    out = io.StringIO()
    line = ProgressLine(out)
    line.update(rec("requested", ["requested"]))
    line.update(rec("staging", ["requested", "staging"], Download(10_000_000, 50_000_000)))
    line.update(rec("staging", ["requested", "staging"], Download(12_000_000, 50_000_000)))  # same tenth: no line
    line.update(rec("staging", ["requested", "staging"], Download(30_000_000, 50_000_000)))
    # staged, preflighted and switching all happened between two polls
    line.update(rec("probation", ["requested", "staging", "staged", "preflighted", "switching", "probation"],
                    Download(50_000_000, 50_000_000)))
    line.update(rec("probation", ["requested", "staging", "staged", "preflighted", "switching", "probation"]))
    line.done()
    assert out.getvalue().splitlines() == [
        "upgrade op: requested",
        "upgrade op: staging, 10.0 MB / 50.0 MB downloaded",
        "upgrade op: staging, 30.0 MB / 50.0 MB downloaded",
        "upgrade op: staged",
        "upgrade op: preflighted",
        "upgrade op: switching",
        "upgrade op: probation (daemon restarted; watching it)",
    ]


def test_a_download_of_unknown_size_shows_every_ten_megabytes():
    out = io.StringIO()
    line = ProgressLine(out)
    for got in (0, 5 << 20, 11 << 20, 12 << 20, 25 << 20):
        line.update(rec("staging", ["requested", "staging"], Download(got, None)))
    assert out.getvalue().splitlines()[1:] == [
        "upgrade op: staging",
        "upgrade op: staging, 11.5 MB / ? downloaded",
        "upgrade op: staging, 26.2 MB / ? downloaded",
    ]


def test_waiting_in_the_queue_and_the_hint_when_nothing_runs_it(capsys):
    out = io.StringIO()
    line = ProgressLine(out)
    ahead = Request(id="reset-1", kind="reset", operation="mop-reset")
    line.waiting(ahead, 1.0)
    line.waiting(ahead, 20.0)  # still the same: no new line, and no hint while something runs ahead
    line.waiting(None, 2.0)
    line.waiting(None, cli_upgrade.QUEUE_HINT_SECONDS)
    line.waiting(None, cli_upgrade.QUEUE_HINT_SECONDS + 5)
    assert out.getvalue().splitlines() == ["queued behind reset mop-reset"]  # nothing ahead: it is about to run
    assert capsys.readouterr().err.count("is unbounded-agent-requests.path active?") == 1


def test_on_a_terminal_the_line_is_rewritten_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    line = ProgressLine(out)
    line.update(rec("requested", ["requested"]))
    line.update(rec("staged", ["requested", "staging", "staged"]))
    line.done()
    assert out.getvalue() == ("\r\033[Kupgrade op: requested\r\033[Kupgrade op: staging\r\033[Kupgrade op: staged\n")


def test_done_without_output_writes_nothing():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    ProgressLine(out).done()
    assert out.getvalue() == ""


def test_the_queued_request_is_json_a_dispatcher_can_read(env):
    assert cli.main(["upgrade", URL]) == 0
    (path, req), = env.spool.queue()
    doc = json.loads(path.read_text())
    assert doc["id"] == req.id and doc["kind"] == "upgrade" and doc["url"] == URL


def test_an_entry_unit_whose_name_the_journal_refuses_queues_nothing_and_says_why(env, monkeypatch):
    """A unit name of 255 characters (the most systemd allows) is one the journal refuses as a stream's unit: the
    unit refuses at once, through syslog, instead of queueing an upgrade and dying unheard."""
    import syslog

    from unbounded_agent.upgrade import units

    said = []
    monkeypatch.setattr(units, "own_unit", lambda: "unbounded-upgrade@" + "a" * 229 + ".service")
    monkeypatch.setattr(syslog, "syslog", lambda priority, message: said.append((priority, message)))
    assert cli_upgrade.unit_main([URL]) == Reason.INVALID_PARAMETERS.exit_code
    assert env.spool.queue() == []
    ((priority, message),) = said
    assert priority == syslog.LOG_ERR and "255 characters long" in message and "unbounded-agent upgrade URL" in message
    monkeypatch.setattr(units, "own_unit", lambda: "unbounded-upgrade@" + "a" * 228 + ".service")
    assert cli_upgrade._unit_name_refused() == 0
