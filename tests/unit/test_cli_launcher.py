"""/usr/bin/unbounded-agent: it runs the agent binary the config's binDir selects, and when there is none (after a
reset) the toolset's own CLI, so the command always works; a real launch of the program included."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unbounded_agent import layout
from unbounded_agent.cli import launcher
from unbounded_agent.version import VERSION

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A config naming a bin dir of the test's own."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"binDir: {tmp_path / 'agent-bin'}\nstateDir: {tmp_path / 'state'}\n")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg))
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    return tmp_path


def install_agent(tmp_path: Path, version: str = "7.7.7") -> layout.Layout:
    packaged = tmp_path / "packaged"
    packaged.write_text(f"#!/bin/sh\necho \"unbounded-agent {version} (agent binary) $*\"\n")
    packaged.chmod(0o755)
    lay = layout.Layout(tmp_path / "agent-bin")
    lay.seed(packaged)
    return lay


def launch(tmp_path, *args):
    """bin/unbounded-agent-launcher as /usr/bin/unbounded-agent runs it, with this checkout's library."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"))
    return subprocess.run([sys.executable, str(REPO / "bin" / "unbounded-agent-launcher"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_it_runs_the_agent_binary_of_the_configured_bin_dir(host):
    install_agent(host)
    r = launch(host, "version", "--extra")
    assert r.returncode == 0 and r.stdout == "unbounded-agent 7.7.7 (agent binary) version --extra\n"


def test_without_an_agent_binary_it_is_the_toolsets_own_cli(host):
    r = launch(host, "version")
    assert r.returncode == 0 and r.stdout == f"unbounded-agent {VERSION}\n"
    lay = install_agent(host)
    for name in (layout.CURRENT, layout.BLUE):  # after a reset: the links and the slots are gone
        lay.path(name).unlink()
    r = launch(host, "version")
    assert r.returncode == 0 and r.stdout == f"unbounded-agent {VERSION}\n"


def test_a_current_link_that_leads_back_to_the_launcher_does_not_loop(host, monkeypatch):
    lay = layout.Layout(host / "agent-bin")
    lay.bin_dir.mkdir()
    me = host / "launcher"
    me.write_text("#!/bin/sh\n")
    me.chmod(0o755)
    lay.path(layout.CURRENT).symlink_to(me)
    monkeypatch.setattr(sys, "argv", [str(me)])
    assert launcher.agent_binary() is None


def test_a_broken_config_still_names_the_bin_dir(host):
    install_agent(host)
    (host / "config.yaml").write_text(f"binDir: {host / 'agent-bin'}\nprobationSeconds: -1\n")
    assert launcher.bin_dir() == str(host / "agent-bin")  # the agent reports the config's error itself
    (host / "config.yaml").write_text("binDir: [unclosed\n")
    assert launcher.bin_dir() == "/var/lib/unbounded-agent/bin"


def test_an_agent_that_cannot_be_run_falls_back_to_the_toolset(host, monkeypatch, capsys):
    install_agent(host)

    def refuse(path, args):
        raise OSError(8, "Exec format error")

    monkeypatch.setattr(os, "execv", refuse)
    assert launcher.main(["version"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"unbounded-agent {VERSION}\n" and "Exec format error" in captured.err
