"""Step 3: the WireGuard server keys go, and nothing else in /etc/wireguard; a symlinked key goes, not its target."""

import os

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reset.reports import Checkpoint, write_checkpoint
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.step import Context
from unbounded_agent.reset.steps import remove_wireguard_keys

RUN = "req-0001"


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A reset run in progress (checkpoint written, lock held for it) on a temporary root."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    write_checkpoint(Checkpoint(run_id=RUN), tmp_path / "reset")
    (tmp_path / "root/etc/wireguard").mkdir(parents=True)
    with HostLock(RUN, "reset").acquire():
        yield tmp_path / "root"


def run(root):
    return run_step(remove_wireguard_keys.STEP, directory=root.parent / "reset", root=str(root))


def test_the_keys_go_and_the_file_next_to_them_stays(root):
    for name in ("server.priv", "server.pub", "wg0.conf"):
        (root / "etc/wireguard" / name).write_text("x")
    report = run(root)
    assert report.result == "succeeded", report
    assert report.removed == ["file /etc/wireguard/server.priv", "file /etc/wireguard/server.pub"]
    assert sorted(os.listdir(root / "etc/wireguard")) == ["wg0.conf"]


def test_running_it_again_changes_nothing_and_succeeds(root):
    (root / "etc/wireguard/server.priv").write_text("x")
    assert run(root).succeeded
    again = run(root)
    assert (again.result, again.removed) == ("succeeded", [])
    assert again.absent == ["path /etc/wireguard/server.priv", "path /etc/wireguard/server.pub"]


def test_a_symlinked_key_is_removed_not_followed(root):
    elsewhere = root / "srv/keys/server.priv"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("not the reset's")
    (root / "etc/wireguard/server.priv").symlink_to(elsewhere)
    report = run(root)
    assert report.succeeded and report.removed == ["link /etc/wireguard/server.priv"]
    assert elsewhere.read_text() == "not the reset's"


def test_the_plan_lists_what_is_there(root):
    (root / "etc/wireguard/server.pub").write_text("x")
    ctx = Context(machine_name="m", bin_dirs=(), state_dirs=(), root=str(root))
    assert [i.what for i in remove_wireguard_keys.STEP.plan(ctx)] == ["file /etc/wireguard/server.pub"]
    assert (root / "etc/wireguard/server.pub").exists()  # planning changes nothing
