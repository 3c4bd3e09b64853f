"""The `unbounded-agent` program (the agent's, and the toolset's own copy in /usr/libexec): its commands,
their exit codes, and `status`, which shows the queue and the last results."""

import json

import pytest

from unbounded_agent import cli
from unbounded_agent.queue.spool import Request, Result, Spool
from unbounded_agent.version import VERSION


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A config and an ops dir of the test's own."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"machineName: worker-01\nstateDir: {tmp_path / 'state'}\nbinDir: {tmp_path / 'bin'}\n")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg))
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    return tmp_path


def test_version(capsys):
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == f"unbounded-agent {VERSION}\n"


def test_every_command_is_offered(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("version", "status", "daemon", "reset", "upgrade", "rollback"):
        assert command in out


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2


def test_a_malformed_config_is_a_clear_error_not_a_traceback(host, capsys):
    (host / "config.yaml").write_text("machineName: [x\n")
    assert cli.main(["status"]) == 3
    assert "InvalidConfig" in capsys.readouterr().err


def test_status_shows_the_queue_and_the_last_results(host, capsys):
    spool = Spool()
    spool.submit(Request(id="upgrade-1", kind="upgrade", operation="up-1", source="machineoperation"))
    spool.submit(Request(id="reset-1", kind="reset"))
    spool.claim_next()
    spool.finish(None, Result(id="rollback-0", kind="rollback", operation="rollback-0", source="cli", succeeded=False,
                              reason="Quarantined", message="m", finished_at="2026-12-01T00:00:00Z"))
    assert cli.main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["machine_name"] == "worker-01"
    assert [(q["id"], q["state"]) for q in st["queue"]] == [("upgrade-1", "running"), ("reset-1", "queued")]
    assert [(r["id"], r["reason"]) for r in st["results"]] == [("rollback-0", "Quarantined")]
    assert "url" not in json.dumps(st["queue"])  # a request's URL may carry a signed query: never shown
    assert st["journal"] == "journalctl UNBOUNDED_OPERATION=up-1"  # the running one's story
    assert cli.main(["status"]) == 0
    text = capsys.readouterr().out
    assert "running: upgrade up-1 (request upgrade-1, from machineoperation)" in text
    assert "rollback rollback-0 failed (Quarantined)" in text
    assert "journal:     journalctl UNBOUNDED_OPERATION=up-1  (one operation, all its units)" in text
    spool.finish(spool.claimed()[0], Result(id="upgrade-1", kind="upgrade", operation="up-1", source="machineoperation",
                                            succeeded=True, reason="Succeeded", message="m"))
    spool.drop(spool.pending()[0][0])
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["journal"] == "journalctl UNBOUNDED_OPERATION=up-1"  # the last ended


def test_status_shows_the_watch_after_a_commit_and_a_rollback_after_it(host, capsys):
    """While a committed upgrade is in its failure-detection window, status counts its crashes; an upgrade
    rolled back after its commit says so in its record and its result."""
    import time

    from unbounded_agent import config, records
    from unbounded_agent.upgrade import crashes, record
    from unbounded_agent.upgrade.record import Binary, PhaseEntry, Store, UpgradeRecord

    store = Store(config.load())
    store.dir.mkdir(parents=True)
    t = time.time() - 60
    rec = UpgradeRecord(id="upgrade-1", operation="up-1", phase=record.COMMITTED, reason="Succeeded", message="upgraded",
                        from_=Binary(version="1.0.0", digest="a" * 64), to=Binary(version="2.0.0", digest="b" * 64),
                        history=[PhaseEntry(record.COMMITTED, records.now(), t)])
    store.write(rec)
    records.save(crashes.DaemonExits([crashes.DaemonExit(at="", t=t + 15, digest="b" * 64)]), store.dir / crashes.EXITS_FILE)
    assert cli.main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["after_commit_watch"]["crashes"] == 1 and st["after_commit_watch"]["rolls_back_at"] == crashes.CRASHES
    assert cli.main(["status"]) == 0
    assert "crash watch: 1 of 3 crashes before " in capsys.readouterr().out
    # rolled back after its commit
    rec.phase, rec.after_commit, rec.reason, rec.message = record.ROLLED_BACK, True, "DaemonFailedAfterCommit", "gone back"
    store.write(rec)
    Spool().finish(None, Result(id="upgrade-1", kind="upgrade", operation="up-1", source="cli", succeeded=True,
                                reason="Succeeded", message="upgraded", finished_at="2026-12-01T00:00:00Z",
                                after_commit={"reason": "DaemonFailedAfterCommit", "message": "gone back"}))
    assert cli.main(["status"]) == 0
    text = capsys.readouterr().out
    assert "upgrade up-1 rolled-back after its commit (1.0.0 → 2.0.0): DaemonFailedAfterCommit: gone back" in text
    assert "succeeded, then rolled back after its commit (DaemonFailedAfterCommit)" in text
    assert "crash watch:" not in text
