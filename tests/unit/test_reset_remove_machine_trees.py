"""Step 5: the root trees and .raw images of kube1 and kube2 go — never while the machine runs or while that
cannot be told, never through a symlink; kube10's stay; a symlinked /var/lib/machines is followed and kept.
(Mounts inside a tree, deep trees and btrfs: see test_reset_treeremove.py.)"""

import os

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset import machines
from unbounded_agent.reset.reports import Checkpoint, write_checkpoint
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.step import Context
from unbounded_agent.reset.steps import remove_machine_trees

RUN = "req-0001"


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A reset run in progress on a temporary root with the trees of kube1, kube2 and kube10; set
    host.running (or host.inventory_error) to say what machined and systemd report."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    write_checkpoint(Checkpoint(run_id=RUN), tmp_path / "reset")
    root = tmp_path / "root"
    for m in ("kube1", "kube2", "kube10"):
        (root / f"var/lib/machines/{m}/etc").mkdir(parents=True)
        (root / f"var/lib/machines/{m}/etc/hostname").write_text(m)

    class Host:
        def inspect(self, names=machines.AGENT_MACHINES):
            if self.inventory_error:
                raise self.inventory_error
            return [machines.MachineState(m, m in self.running, "inactive", "disabled") for m in names]

        def run(self):
            return run_step(remove_machine_trees.STEP, directory=tmp_path / "reset", root=str(root))

    h = Host()
    h.root, h.running, h.inventory_error = root, set(), None
    monkeypatch.setattr(machines, "inspect", h.inspect)
    with HostLock(RUN, "reset").acquire():
        yield h


def test_the_trees_of_kube1_and_kube2_go_and_kube10_stays(host):
    report = host.run()
    assert report.result == "succeeded", report
    assert report.removed == ["machine tree /var/lib/machines/kube1", "machine tree /var/lib/machines/kube2"]
    assert os.listdir(host.root / "var/lib/machines") == ["kube10"]
    again = host.run()
    assert (again.result, again.removed, len(again.absent)) == ("succeeded", [], 4)  # two trees, two images


def test_the_tree_of_a_running_machine_is_refused(host):
    host.running = {"kube2"}
    report = host.run()
    assert (report.result, report.reason) == ("failed", "MachineStillRunning")
    assert (report.failed[0].item, report.failed[0].error) == (
        "machine tree /var/lib/machines/kube2", "refusing to remove /var/lib/machines/kube2: machine kube2 is still running")
    assert (host.root / "var/lib/machines/kube2/etc/hostname").read_text() == "kube2"
    assert report.removed == ["machine tree /var/lib/machines/kube1"]  # the other one still goes


def test_no_tree_is_removed_when_the_machines_cannot_be_inspected(host):
    host.inventory_error = OpsError(Reason.INVENTORY_FAILED, "cannot list machines through systemd-machined: timeout")
    report = host.run()
    assert (report.result, report.reason) == ("failed", "InventoryFailed")
    assert report.failed[0].error.startswith("not removing any machine tree: cannot list machines")
    assert sorted(os.listdir(host.root / "var/lib/machines")) == ["kube1", "kube10", "kube2"]


def test_a_symlinked_tree_is_unlinked_not_followed(host):
    elsewhere = host.root / "srv/kube1"
    elsewhere.parent.mkdir(parents=True)
    os.rename(host.root / "var/lib/machines/kube1", elsewhere)
    (host.root / "var/lib/machines/kube1").symlink_to(elsewhere)
    ctx = Context(machine_name="m", bin_dirs=(), state_dirs=(), root=str(host.root))
    assert [str(i) for i in remove_machine_trees.STEP.plan(ctx)] == [
        "machine tree /var/lib/machines/kube1 (a symlink: only the link)", "machine tree /var/lib/machines/kube2"]
    assert host.run().succeeded
    assert (elsewhere / "etc/hostname").read_text() == "kube1"
    assert os.listdir(host.root / "var/lib/machines") == ["kube10"]


def test_raw_images_named_after_the_machines_go_and_others_stay(host):
    machines_dir = host.root / "var/lib/machines"
    for name in ("kube1.raw", "kube10.raw", "kube2.raw.bak"):
        (machines_dir / name).write_bytes(b"\0" * 512)
    (host.root / "srv").mkdir()
    (host.root / "srv/image.raw").write_bytes(b"image")
    (machines_dir / "kube2.raw").symlink_to(host.root / "srv/image.raw")
    report = host.run()
    assert report.succeeded, report
    assert "machine image /var/lib/machines/kube1.raw" in report.removed
    assert "machine image /var/lib/machines/kube2.raw" in report.removed
    assert sorted(os.listdir(machines_dir)) == ["kube10", "kube10.raw", "kube2.raw.bak"]
    assert (host.root / "srv/image.raw").read_bytes() == b"image"  # a linked image: only the link goes


def test_the_image_of_a_running_machine_is_refused(host):
    (host.root / "var/lib/machines/kube2.raw").write_bytes(b"\0")
    host.running = {"kube2"}
    report = host.run()
    assert [f.item for f in report.failed] == ["machine tree /var/lib/machines/kube2",
                                                "machine image /var/lib/machines/kube2.raw"]
    assert (host.root / "var/lib/machines/kube2.raw").exists()


def test_a_symlinked_machines_dir_is_followed_and_kept(host):
    srv = host.root / "srv/machines"
    srv.parent.mkdir(parents=True)
    os.rename(host.root / "var/lib/machines", srv)
    (srv / "other").mkdir()
    (host.root / "var/lib/machines").symlink_to(srv)
    report = host.run()
    assert report.succeeded, report
    assert sorted(os.listdir(srv)) == ["kube10", "other"]
    assert (host.root / "var/lib/machines").is_symlink()


def test_an_unreadable_machines_dir_fails_closed(host, monkeypatch):
    from unbounded_agent.reset import step

    def denied(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(step.os, "lstat", denied)
    report = host.run()
    assert (report.result, report.reason) == ("failed", "InventoryFailed")
    assert "cannot tell whether" in report.failed[0].error and report.removed == []
