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
