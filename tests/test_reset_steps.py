"""The reset's runner, checkpoint and file steps, against a temporary root (no systemd needed)."""

import fcntl
import json
import os

import pytest

from unbounded_agent import reset
from unbounded_agent.reasons import Reason


class FakeUnits:
    """Stands in for SystemdOps: units that run or are enabled until stopped / disabled."""

    def __init__(self, running=(), enabled=()):
        self.running_units, self.enabled_units, self.calls = set(running), set(enabled), []

    def matching(self, pattern):
        return sorted(u for u in self.running_units if u.startswith("unbounded-upgrade"))

    def running(self, name):
        return name in self.running_units

    def enabled(self, name):
        return name in self.enabled_units

    def stop(self, name, timeout):
        self.calls.append(("stop", name))
        self.running_units.discard(name)

    def disable(self, name):
        self.calls.append(("disable", name))
        self.enabled_units.discard(name)

    def reload(self):
        self.calls.append(("reload",))


@pytest.fixture
def env(tmp_path, monkeypatch):
    root = tmp_path / "root"
    cfg = root / "etc/unbounded/agent/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"machineName: node-7\nbinDir: /var/lib/unbounded-agent/bin\n")
    # The config is read from the real path the begin step would use; point it at the temp root.
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg))
    # Steps that need machined or netlink are not under test here: they find nothing.
    for cls in (reset.StopMachines, reset.RemoveLinks, reset.RemoveRouting, reset.RemoveMachineTrees):
        monkeypatch.setattr(cls, "plan", lambda self, ctx: [])
        monkeypatch.setattr(cls, "apply", lambda self, ctx, rec: None)

    class E:
        pass

    e = E()
    e.root, e.reset_dir, e.lock = root, tmp_path / "reset", str(tmp_path / "install.lock")
    e.units = FakeUnits()

    def run(name, **kw):
        return reset.run_step(name, reset_dir=e.reset_dir, lock_path=e.lock, root=str(root), systemd=e.units, **kw)

    e.run = run
    return e


def write(root, path, text="x"):
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_begin_writes_the_checkpoint_with_the_request_and_where_the_agent_is(env):
    run_id = reset.write_request(all_wg=True, requested_by="test", reset_dir=env.reset_dir)
    report = env.run("begin")
    cp = json.loads((env.reset_dir / "checkpoint.json").read_text())
    assert report["result"] == "succeeded" and report["run_id"] == run_id
    assert (cp["checkpoint"], cp["run_id"], cp["all_wg"]) == ("resetting", run_id, True)
    assert cp["recorded"]["machine_name"] == "node-7"
    assert cp["recorded"]["bin_dir"] == "/var/lib/unbounded-agent/bin"


def test_begin_keeps_what_an_interrupted_reset_recorded(env):
    reset.write_request(False, "test", env.reset_dir)
    env.run("begin")
    (env.root / "etc/unbounded/agent/config.yaml").unlink()  # step 7 of the interrupted run removed it
    reset.write_request(False, "test", env.reset_dir)
    report = env.run("begin")
    cp = json.loads((env.reset_dir / "checkpoint.json").read_text())
    assert cp["recorded"]["machine_name"] == "node-7"
    assert any(n.startswith("resuming the interrupted reset") for n in report["notes"])


def test_a_step_without_a_checkpoint_fails_and_still_reports(env):
    report = env.run("remove-wireguard-keys")
    assert report["result"] == "failed" and "no reset in progress" in report["failed"][0]["error"]
    assert json.loads(reset.report_path(reset.BY_NAME["remove-wireguard-keys"], env.reset_dir).read_text()) == report


def test_the_keys_go_and_the_file_next_to_them_stays(env):
    env.run("begin")
    for name in ("server.priv", "server.pub", "wg0.conf"):
        write(env.root, f"/etc/wireguard/{name}")
    report = env.run("remove-wireguard-keys")
    assert report["removed"] == ["file /etc/wireguard/server.priv", "file /etc/wireguard/server.pub"]
    assert sorted(os.listdir(env.root / "etc/wireguard")) == ["wg0.conf"]
    again = env.run("remove-wireguard-keys")
    assert (again["result"], again["removed"], len(again["absent"])) == ("succeeded", [], 2)


def test_nspawn_config_of_kube1_and_kube2_only(env):
    env.run("begin")
    for m in ("kube1", "kube2", "kube10"):
        write(env.root, f"/etc/systemd/nspawn/{m}.nspawn")
        write(env.root, f"/etc/systemd/system/systemd-nspawn@{m}.service.d/override.conf")
    report = env.run("remove-nspawn-config")
    assert report["result"] == "succeeded" and len(report["removed"]) == 4
    assert os.listdir(env.root / "etc/systemd/nspawn") == ["kube10.nspawn"]
    assert os.listdir(env.root / "etc/systemd/system") == ["systemd-nspawn@kube10.service.d"]


def test_remove_agent_stops_disables_and_removes_but_not_outside_its_own_dirs(env):
    bin_dir = "/var/lib/unbounded-agent/bin"
    for name in ("unbounded-agent-blue", "unbounded-agent-green", ".unbounded-agent-current.tmp-1a2b"):
        write(env.root, f"{bin_dir}/{name}")
    os.symlink("unbounded-agent-blue", env.root / bin_dir.lstrip("/") / "unbounded-agent-current")
    write(env.root, "/var/lib/unbounded-agent/upgrade.json", "{}")
    write(env.root, "/usr/local/bin/unbounded-agent-blue")  # the default bin dir of an upstream install
    write(env.root, "/usr/local/bin/kubectl")  # not the agent's: a shared bin dir stays
    env.units.running_units = {"unbounded-agent-daemon.service", "unbounded-upgrade@x.service"}
    env.units.enabled_units = {"unbounded-agent-daemon.service"}
    env.run("begin")
    cp_path = env.reset_dir / "checkpoint.json"
    cp = json.loads(cp_path.read_text())
    cp["recorded"]["bin_dir"] = "/usr/local/bin"  # as if configured so
    cp_path.write_text(json.dumps(cp))

    report = env.run("remove-agent")
    assert report["result"] == "succeeded", report
    assert env.units.calls[:3] == [("stop", "unbounded-upgrade@x.service"), ("stop", "unbounded-agent-daemon.service"),
                                   ("disable", "unbounded-agent-daemon.service")]
    assert not (env.root / "var/lib/unbounded-agent").exists()
    assert not (env.root / "etc/unbounded/agent").exists()
    assert os.listdir(env.root / "usr/local/bin") == ["kubectl"]


def test_a_state_dir_that_is_not_the_agents_by_name_is_never_removed_whole(env):
    ctx = reset.context_from({"state_dir": "/var/lib", "bin_dir": "/var/lib/bin"}, root=str(env.root))
    assert "/var/lib" not in reset._agent_file_paths(ctx)


def test_verify_removes_the_checkpoint_only_after_a_clean_run(env):
    reset.write_request(False, "test", env.reset_dir)
    for s in reset.STEPS:
        if s.name != "verify":
            assert env.run(s.name)["result"] == "succeeded", s.name
    assert env.units.calls[-1] == ("reload",)
    report = env.run("verify")
    assert report["result"] == "succeeded"
    assert not (env.reset_dir / "checkpoint.json").exists()


def test_verify_keeps_the_checkpoint_when_a_step_failed_or_something_is_left(env):
    reset.write_request(False, "test", env.reset_dir)
    for s in reset.STEPS:
        if s.name != "verify":
            env.run(s.name)
    write(env.root, "/etc/wireguard/server.priv")  # came back (or was never removed)
    report = env.run("verify")
    assert (report["result"], report["reason"]) == ("failed", "ResetIncomplete")
    assert "file /etc/wireguard/server.priv is still there" in report["failed"][0]["error"]
    assert (env.reset_dir / "checkpoint.json").exists()


def test_a_held_host_lock_fails_the_step_without_touching_anything(env):
    env.run("begin")
    write(env.root, "/etc/wireguard/server.priv")
    fd = os.open(env.lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a bootstrap is running
    try:
        report = env.run("remove-wireguard-keys")
    finally:
        os.close(fd)
    assert (report["result"], report["reason"]) == ("failed", Reason.HOST_LOCKED.value)
    assert (env.root / "etc/wireguard/server.priv").exists()
    assert reset.exit_code(report) == 20


def test_dry_run_puts_routes_through_removed_links_under_goes_with(monkeypatch, env):
    from unbounded_agent import netlinks, routing

    links = [netlinks.Link(5, "wg51820", "wireguard"), netlinks.Link(6, "eth0", None)]
    monkeypatch.setattr(reset.RemoveLinks, "plan", lambda self, ctx: [reset.Item("link wg51820")])
    monkeypatch.setattr(netlinks, "list_links", lambda: links)
    monkeypatch.setattr(routing, "inventory", lambda names=None: [
        routing.Entry("route", 2, 51820, "ipv4 table 51820 10.1.0.0/24 dev wg51820", oif=5),
        routing.Entry("route", 2, 51820, "ipv4 table 51820 10.2.0.0/24 dev eth0", oif=6)])
    ctx = reset.context_from({}, root=str(env.root), systemd=env.units)
    plan = {s["step"]: s for s in reset.dry_run(ctx)}
    assert [i["what"] for i in plan["remove-routing"]["items"]] == ["route ipv4 table 51820 10.2.0.0/24 dev eth0"]
    assert plan["remove-routing"]["goes_with"][0]["goes_with"] == "link wg51820"
