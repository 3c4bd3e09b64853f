"""Step 7's removals: stop the upgrade units, stop and disable the recovery and bootstrap units, remove the
agent's state, config, unit files and (last) binaries — while the daemon keeps running — and nothing outside
the agent's own places (a shared bin dir, a state dir not named for it, an operator's own unbounded-agent).
Nothing is removed unless everything can be."""

import fnmatch
import os

import pytest

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.reset.reports import Checkpoint, Recorded, write_checkpoint
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.step import context_from
from unbounded_agent.reset.steps import remove_agent

RUN = "req-0001"
DAEMON = "unbounded-agent-daemon.service"


class FakeUnits:
    """Stands in for step.AgentUnits: units that run or are enabled until stopped / disabled."""

    def __init__(self, running=(), enabled=(), stuck=(), no_process=()):
        self.running_units, self.enabled_units, self.stuck = set(running), set(enabled), set(stuck)
        self.no_process = set(no_process)  # running units without a main process (waiting to be restarted)
        self.calls = []

    def matching(self, patterns):
        return sorted(u for u in self.running_units if any(fnmatch.fnmatch(u, p) for p in patterns))

    def running(self, name):
        return name in self.running_units

    def reporting(self, name):
        return name in self.running_units and name not in self.no_process

    def enabled(self, name):
        return name in self.enabled_units

    def stop(self, name, timeout):
        self.calls.append(("stop", name))
        if name in self.stuck:
            raise OpsError(Reason.EXECUTION_FAILED, f"{name} did not stop within {timeout:g} s")
        self.running_units.discard(name)

    def disable(self, name):
        self.calls.append(("disable", name))
        self.enabled_units.discard(name)

    def reload(self):
        self.calls.append(("reload",))


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A reset run in progress on a temporary root: the checkpoint names the agent's places, the lock is held."""
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    root = tmp_path / "root"
    root.mkdir()

    class Host:
        def checkpoint(self, **recorded):
            write_checkpoint(Checkpoint(run_id=RUN, recorded=Recorded(**recorded)), tmp_path / "reset")

        def run(self):
            return run_step(remove_agent.STEP, directory=tmp_path / "reset", root=str(root), systemd=self.units)

    h = Host()
    h.root, h.units = root, FakeUnits()
    h.checkpoint(config_path="/etc/unbounded/agent/config.yaml", bin_dir="/var/lib/unbounded-agent/bin",
                 state_dir="/var/lib/unbounded-agent")
    with HostLock(RUN, "reset").acquire():
        yield h


def write(root, path, text="x"):
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_the_agents_files_go_and_the_daemon_keeps_running(host):
    root = host.root
    bin_dir = "/var/lib/unbounded-agent/bin"
    for name in ("unbounded-agent-blue", "unbounded-agent-green", ".unbounded-agent-current.tmp-1a2b"):
        write(root, f"{bin_dir}/{name}")
    os.symlink("unbounded-agent-blue", root / bin_dir.lstrip("/") / "unbounded-agent-current")
    write(root, "/var/lib/unbounded-agent/upgrade.json", "{}")
    write(root, "/usr/local/bin/unbounded-agent-blue")  # the default bin dir of an upstream install
    write(root, "/usr/local/bin/.unbounded-agent-current.tmp-9f9f")  # a temporary a crash left there
    write(root, "/usr/local/bin/kubectl")  # not the agent's: a shared bin dir stays
    write(root, "/etc/unbounded/agent/config.yaml")
    write(root, f"/etc/systemd/system/{DAEMON}")
    write(root, f"/etc/systemd/system/{DAEMON}.d/override.conf")
    write(root, "/etc/systemd/system/other.service")
    host.units.running_units = {DAEMON, "unbounded-upgrade@x.service", "unbounded-upgrade-probation.service", "ssh.service"}
    host.units.enabled_units = {DAEMON, "unbounded-agent-bootstrap.service", "ssh.service"}
    host.checkpoint(config_path="/etc/unbounded/agent/config.yaml", bin_dir="/usr/local/bin",  # as if configured so
                    state_dir="/var/lib/unbounded-agent")

    report = host.run()
    assert report.result == "succeeded", report
    # An upgrade unit at work would put a binary back: it stops first. The daemon is left to stop-daemon.
    assert host.units.calls == [("stop", "unbounded-upgrade-probation.service"), ("stop", "unbounded-upgrade@x.service"),
                                ("disable", "unbounded-agent-bootstrap.service")]
    assert host.units.running_units == {DAEMON, "ssh.service"} and host.units.enabled_units == {DAEMON, "ssh.service"}
    assert not (root / "var/lib/unbounded-agent").exists()
    assert not (root / "etc/unbounded/agent").exists()
    assert os.listdir(root / "usr/local/bin") == ["kubectl"]
    assert os.listdir(root / "etc/systemd/system") == ["other.service"]
    assert "file /usr/local/bin/unbounded-agent-blue" in report.removed
    # state first; the config and the binaries last, so a daemon restarted while the step runs still starts
    files = [r for r in report.removed if r.split()[0] in ("file", "directory", "link")]
    assert files == [
        "file /var/lib/unbounded-agent/upgrade.json",
        f"file /etc/systemd/system/{DAEMON}", f"directory /etc/systemd/system/{DAEMON}.d",
        "directory /etc/unbounded/agent",
        "file /usr/local/bin/unbounded-agent-blue", "file /usr/local/bin/.unbounded-agent-current.tmp-9f9f",
        "link /var/lib/unbounded-agent/bin/unbounded-agent-current", "file /var/lib/unbounded-agent/bin/unbounded-agent-blue",
        "file /var/lib/unbounded-agent/bin/unbounded-agent-green",
        "file /var/lib/unbounded-agent/bin/.unbounded-agent-current.tmp-1a2b",
        "directory /var/lib/unbounded-agent"]  # the state dir that held the default bin dir, once empty of the agent


def test_running_it_again_changes_nothing_and_succeeds(host):
    write(host.root, "/var/lib/unbounded-agent/bin/unbounded-agent-blue")
    assert host.run().succeeded
    again = host.run()
    assert (again.result, again.removed, again.failed) == ("succeeded", [], [])
    assert host.units.calls == []


def test_a_state_dir_that_is_not_the_agents_by_name_is_never_removed_whole(host):
    write(host.root, "/var/lib/dpkg/status")
    write(host.root, "/var/lib/unbounded-agent/upgrade.json")
    host.checkpoint(state_dir="/var/lib", bin_dir="/var/lib/bin")  # a stateDir set to /var/lib by mistake
    paths = remove_agent.agent_file_paths(context_from(Recorded(state_dir="/var/lib", bin_dir="/var/lib/bin"),
                                                            root=str(host.root)))
    assert "/var/lib" not in paths and "/var/lib/unbounded-agent" in paths  # the default still goes
    assert host.run().succeeded
    assert (host.root / "var/lib/dpkg/status").exists()
    assert not (host.root / "var/lib/unbounded-agent").exists()


def test_a_config_kept_elsewhere_goes_too(host):
    write(host.root, "/srv/agent/config.yaml")
    write(host.root, "/srv/agent/keep")
    host.checkpoint(config_path="/srv/agent/config.yaml")
    report = host.run()
    assert report.succeeded and "file /srv/agent/config.yaml" in report.removed
    assert os.listdir(host.root / "srv/agent") == ["keep"]


def test_an_upgrade_unit_that_does_not_stop_fails_the_step_and_nothing_goes(host):
    write(host.root, "/var/lib/unbounded-agent/bin/unbounded-agent-blue")
    host.units.running_units = {DAEMON, "unbounded-upgrade-probation.service"}
    host.units.stuck = {"unbounded-upgrade-probation.service"}
    report = host.run()
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    first = report.failed[0]
    assert (first.item, first.error) == ("running unit unbounded-upgrade-probation.service",
                                         "unbounded-upgrade-probation.service did not stop within 120 s")
    assert (host.root / "var/lib/unbounded-agent/bin/unbounded-agent-blue").exists()


def test_a_daemon_without_a_process_is_stopped_so_systemd_does_not_start_it_again(host):
    host.units.running_units = {DAEMON}
    host.units.no_process = {DAEMON}  # activating (auto-restart): it cannot report anything
    assert host.run().succeeded
    assert host.units.calls == [("stop", DAEMON)]


def test_a_systemd_error_while_disabling_is_reported_on_its_unit(host):
    class Refusing(FakeUnits):
        def disable(self, name):
            raise RuntimeError("Access denied")

    recovery = "unbounded-agent-daemon-recovery.service"
    host.units = Refusing(enabled={DAEMON, recovery})
    report = host.run()
    assert (report.result, report.reason) == ("failed", "ExecutionFailed")
    assert (report.failed[0].item, report.failed[0].error) == (
        f"enabled unit {recovery}", f"cannot disable {recovery}: Access denied")


def test_the_plan_lists_units_to_stop_and_disable_and_the_files(host):
    write(host.root, "/var/lib/unbounded-agent/bin/unbounded-agent-blue")
    host.units.running_units = {DAEMON, "unbounded-upgrade-stage@r1.service"}
    host.units.enabled_units = {DAEMON, "unbounded-agent-daemon-recovery.service"}
    ctx = context_from(Recorded(bin_dir="/var/lib/unbounded-agent/bin", state_dir="/var/lib/unbounded-agent"),
                       root=str(host.root), systemd=host.units)
    plan = [(i.what, i.action) for i in remove_agent.STEP.plan(ctx)]
    assert plan == [("running unit unbounded-upgrade-stage@r1.service", "stop"),
                    ("enabled unit unbounded-agent-daemon-recovery.service", "disable"),
                    ("file /var/lib/unbounded-agent/bin/unbounded-agent-blue", "remove"),
                    ("directory /var/lib/unbounded-agent", "remove")]
    assert host.units.calls == [] and (host.root / "var/lib/unbounded-agent/bin/unbounded-agent-blue").exists()


def test_nothing_goes_when_a_tree_cannot_be_removed(host, monkeypatch):
    from unbounded_agent.reset import treeremove

    write(host.root, "/var/lib/unbounded-agent/bin/unbounded-agent-blue")
    write(host.root, "/etc/unbounded/agent/config.yaml")
    real_prepare = treeremove.prepare

    def prepare(path):
        if path.endswith("/var/lib/unbounded-agent"):
            raise OpsError(Reason.UNSAFE_REMOVAL, f"refusing to remove {path}: .../locked is immutable (see lsattr)")
        return real_prepare(path)
    monkeypatch.setattr(treeremove, "prepare", prepare)
    report = host.run()
    assert (report.result, report.reason, report.removed) == ("failed", "UnsafeRemoval", [])
    assert (host.root / "etc/unbounded/agent/config.yaml").exists()
    assert (host.root / "var/lib/unbounded-agent/bin/unbounded-agent-blue").exists()


BIN = "/usr/local/bin"


@pytest.mark.parametrize("compat, ours", [
    ("link to current", True), ("absolute link to a slot", True), ("our zipapp", True), ("a copy of a slot", True),
    ("an operator's file", False), ("an operator's link", False)])
def test_bin_dir_unbounded_agent_goes_only_when_it_is_the_agents(host, compat, ours):
    import zipfile

    root = host.root
    write(root, f"{BIN}/unbounded-agent-blue", "agent v1")
    os.symlink("unbounded-agent-blue", root / BIN.lstrip("/") / "unbounded-agent-current")
    path = root / BIN.lstrip("/") / "unbounded-agent"
    if compat == "link to current":
        os.symlink("unbounded-agent-current", path)
    elif compat == "absolute link to a slot":
        os.symlink(f"{BIN}/unbounded-agent-blue", path)
    elif compat == "our zipapp":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("__main__.py", "")
            z.writestr("unbounded_agent/version.py", "VERSION = '0.9'")
    elif compat == "a copy of a slot":
        write(root, f"{BIN}/unbounded-agent", "agent v1")
    elif compat == "an operator's file":
        write(root, f"{BIN}/unbounded-agent", "#!/bin/sh\nexec /opt/vendor/agent \"$@\"\n")
    else:
        os.symlink("/opt/vendor/agent", path)
    host.checkpoint(bin_dir=BIN, state_dir="/var/lib/unbounded-agent")
    report = host.run()
    assert report.succeeded, report
    assert os.path.lexists(path) is not ours
    assert os.listdir(root / BIN.lstrip("/")) == ([] if ours else ["unbounded-agent"])


def agent_with_kubeconfig(root):
    """The agent's config naming a kubeconfig whose CA, client key and token are files beside it."""
    write(root, "/etc/unbounded/agent/config.yaml", "machineName: node-7\nkubeconfig: /etc/unbounded/agent/kubeconfig\n")
    write(root, "/etc/unbounded/agent/ca.crt", "CA")
    write(root, "/etc/unbounded/agent/client.key", "KEY")
    write(root, "/etc/unbounded/agent/token", "s3cret\n")
    write(root, "/etc/unbounded/agent/kubeconfig",
          "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
          "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', certificate-authority: ca.crt}}]\n"
          "users: [{name: u, user: {client-key: client.key, tokenFile: token}}]\n")


def test_a_copy_of_the_config_and_credentials_is_kept_for_the_report(host, tmp_path):
    import base64

    import yaml

    agent_with_kubeconfig(host.root)
    report = host.run()
    assert report.succeeded, report
    assert not (host.root / "etc/unbounded/agent").exists()  # the originals are gone
    kit = tmp_path / "reset" / "reporter"
    held = yaml.safe_load((kit / "config.yaml").read_text())
    assert held == {"machineName": "node-7", "kubeconfig": str(kit / "kubeconfig"), "stateDir": str(kit / "state")}
    flat = yaml.safe_load((kit / "kubeconfig").read_text())
    assert flat["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:6443",
                                              "certificate-authority-data": base64.b64encode(b"CA").decode()}
    assert flat["users"][0]["user"] == {"client-key-data": base64.b64encode(b"KEY").decode(), "token": "s3cret"}
    assert {oct(p.stat().st_mode & 0o777) for p in kit.iterdir()} == {"0o600"} and (kit.stat().st_mode & 0o777) == 0o700
    assert any("kept the config and the credentials" in n for n in report.notes)
    again = host.run()  # resumed: the originals are gone, the copy stays as it was
    assert again.succeeded and yaml.safe_load((kit / "kubeconfig").read_text()) == flat


def test_no_copy_without_a_kubeconfig_and_a_copy_that_cannot_be_made_stops_nothing(host, tmp_path):
    write(host.root, "/etc/unbounded/agent/config.yaml", "machineName: node-7\n")
    report = host.run()
    assert report.succeeded and not (tmp_path / "reset" / "reporter").exists()
    agent_with_kubeconfig(host.root)
    (host.root / "etc/unbounded/agent/ca.crt").unlink()  # names a file that is not there
    report = host.run()
    assert report.succeeded and not (host.root / "etc/unbounded/agent").exists()
    assert not (tmp_path / "reset" / "reporter").exists()
    assert any("cannot keep the config and credentials for the report" in n for n in report.notes)
