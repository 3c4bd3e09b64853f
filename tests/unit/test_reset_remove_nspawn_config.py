"""Step 4: the .nspawn files and the systemd-nspawn@ overrides of kube1 and kube2 go; kube10's stay."""

import os

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reset.reports import Checkpoint, write_checkpoint
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.step import Context
from unbounded_agent.reset.steps import remove_nspawn_config

RUN = "req-0001"


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A reset run in progress (checkpoint written, lock held for it) on a temporary root, with the nspawn
    configuration of kube1, kube2 and someone else's kube10."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    write_checkpoint(Checkpoint(run_id=RUN), tmp_path / "reset")
    root = tmp_path / "root"
    for m in ("kube1", "kube2", "kube10"):
        for path in (f"etc/systemd/nspawn/{m}.nspawn", f"etc/systemd/system/systemd-nspawn@{m}.service.d/override.conf"):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text("x")
    with HostLock(RUN, "reset").acquire():
        yield root


def run(root):
    return run_step(remove_nspawn_config.STEP, directory=root.parent / "reset", root=str(root))


def test_nspawn_config_of_kube1_and_kube2_only(root):
    report = run(root)
    assert report.result == "succeeded", report
    assert report.removed == [
        "file /etc/systemd/nspawn/kube1.nspawn", "directory /etc/systemd/system/systemd-nspawn@kube1.service.d",
        "file /etc/systemd/nspawn/kube2.nspawn", "directory /etc/systemd/system/systemd-nspawn@kube2.service.d"]
    assert os.listdir(root / "etc/systemd/nspawn") == ["kube10.nspawn"]
    assert os.listdir(root / "etc/systemd/system") == ["systemd-nspawn@kube10.service.d"]


def test_running_it_again_changes_nothing_and_succeeds(root):
    run(root)
    again = run(root)
    assert (again.result, again.removed, len(again.absent)) == ("succeeded", [], 4)
    assert sorted(os.listdir(root / "etc/systemd/nspawn")) == ["kube10.nspawn"]


def test_the_plan_lists_what_is_there_and_changes_nothing(root):
    (root / "etc/systemd/nspawn/kube2.nspawn").unlink()
    ctx = Context(machine_name="m", bin_dirs=(), state_dirs=(), root=str(root))
    assert [i.what for i in remove_nspawn_config.STEP.plan(ctx)] == [
        "file /etc/systemd/nspawn/kube1.nspawn", "directory /etc/systemd/system/systemd-nspawn@kube1.service.d",
        "directory /etc/systemd/system/systemd-nspawn@kube2.service.d"]
    assert (root / "etc/systemd/nspawn/kube1.nspawn").exists()
