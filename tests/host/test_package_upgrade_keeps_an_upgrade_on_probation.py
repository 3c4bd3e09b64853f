"""Installing a newer .deb over an older one while an agent upgrade is on probation: the package reloads
systemd's units and takes nothing from the agent or from the operation in flight. The daemon the switch
started keeps running (same invocation), the dispatcher that runs the operation keeps running (same
process) and writes its result, probation goes on and commits, the slots and links stay as the agent
upgrade left them, and the queue stays armed. (`dpkg -r` and `-P`: test_package_install_and_purge.py.)"""

import json
import subprocess

import pytest
import releases
from upgrade_host import (
    BIN,
    DAEMON,
    DISPATCH,
    daemon,
    hold,
    look,
    prepare,
    release_hold,
    request_id,
    result,
    settle,
    sha256,
    unhold,
    upgrade,
    wait_held,
    wait_until,
)

pytestmark = pytest.mark.testhost

PROBATION = "unbounded-upgrade-probation.service"
PATH_UNIT = "unbounded-agent-requests.path"
OUR_UNITS = (DAEMON, DISPATCH, PATH_UNIT, "unbounded-agent-metrics.service", PROBATION)
NEWER_DISPATCH_DESCRIPTION = "Unbounded agent: run the queued host operations, one at a time (newer package)"


@pytest.fixture(scope="module")
def newer_deb(repo_root, version, tmp_path_factory):
    """(version, path) of a .deb of this tree with a higher version, whose dispatcher unit reads differently
    (so the test sees which unit file systemd has loaded)."""
    newer = f"{version}.1"
    out = tmp_path_factory.mktemp("newer-deb")
    r = subprocess.run(["make", "-s", "deb", f"VERSION={newer}", f"DIST={out / 'dist'}", f"DEB_BUILD={out / 'build'}"],
                       cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    built, tree = out / "dist" / f"unbounded-agent_{newer}_all.deb", out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(built), str(tree)], check=True)
    unit = tree / "lib/systemd/system" / DISPATCH
    text = unit.read_text()
    assert "\nDescription=Unbounded agent: run the queued host operations, one at a time\n" in text
    unit.write_text(text.replace("one at a time\n", "one at a time (newer package)\n", 1))
    deb = out / f"unbounded-agent_{newer}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True, capture_output=True)
    return newer, deb


@pytest.fixture(scope="module")
def host(testhost_factory, deb_path, tmp_path_factory, repo_root):
    release = releases.real_release(repo_root, "2.0.0", tmp_path_factory.mktemp("release"))
    with testhost_factory("pkgupgrade") as h:
        h.install_deb(deb_path)  # the older package: the tree under test at its own version
        prepare(h)
        h.url = h.serve(release, "agent-2.0.0.tar.gz")
        yield h


def show(host, unit: str, *props: str) -> dict:
    out = host.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def units(host) -> dict:
    """What must not change: each unit's process and invocation, and whether it runs."""
    return {u: show(host, u, "ActiveState", "SubState", "MainPID", "InvocationID") for u in (DAEMON, DISPATCH, PROBATION)}


def agent(host) -> dict:
    slots = {s: sha256(host, f"{BIN}/{s}") for s in ("unbounded-agent-blue", "unbounded-agent-green")}
    seen = look(host)
    return {"slots": slots, "current": seen["current"], "last_good": seen["last_good"]}


def test_a_newer_package_keeps_the_agent_and_an_upgrade_on_probation(host, newer_deb, version):
    newer, deb = newer_deb
    hold(host, PROBATION, "probation-watching")
    try:
        r = upgrade(host, host.url)  # queued; the dispatcher runs it and follows it to its end
        assert r.returncode == 0, r.stdout + r.stderr
        id = request_id(r)
        wait_held(host, "probation-watching")
        # the new daemon the switch started reports ready: on probation, which waits at its hold point
        wait_until("the new daemon to be ready", lambda: daemon(host)["ActiveState"] == "active", timeout=60)
        before, agent_before = units(host), agent(host)
        rec = look(host)["record"]
        assert (rec["id"], rec["phase"]) == (id, "probation")
        assert agent_before["current"] == "unbounded-agent-green" and agent_before["last_good"] == "unbounded-agent-blue"
        assert all(before[u]["ActiveState"] == "active" for u in (DAEMON, DISPATCH)), before
        assert before[PROBATION]["SubState"] == "start"  # at work, waiting at its hold point

        installed = host.install_deb(deb)  # dpkg -i of the newer package, as an operator upgrades it
        assert installed.returncode == 0, installed.stdout + installed.stderr

        assert host.run(["dpkg-query", "-W", "-f", "${Version}", "unbounded-agent"]).stdout == newer
        # nothing that runs was stopped or restarted: not the daemon on probation, not the dispatcher running
        # the operation, not the probation unit watching
        assert units(host) == before
        assert agent(host) == agent_before  # the agent's slots and links as the agent upgrade left them
        assert look(host)["record"]["phase"] == "probation"
        # systemd has the newer unit files loaded, and the queue is armed
        assert show(host, DISPATCH, "Description")["Description"] == NEWER_DISPATCH_DESCRIPTION
        assert {u: show(host, u, "NeedDaemonReload")["NeedDaemonReload"] for u in OUR_UNITS} == {u: "no" for u in OUR_UNITS}
        assert show(host, PATH_UNIT, "ActiveState")["ActiveState"] == "active"
        assert host.run(["unbounded-agent", "version"]).stdout.strip() == "unbounded-agent 2.0.0"
    finally:
        unhold(host, PROBATION)
        release_hold(host, "probation-watching")

    res = wait_until(f"the result of {id}", lambda: result(host, id))
    settle(host)
    assert (res["succeeded"], res["reason"], res["to_version"]) == (True, "Succeeded", "2.0.0"), res
    rec = look(host)["record"]
    assert (rec["phase"], rec["probation"]["attempts"]) == ("committed", 1)
    # probation committed the daemon the switch started: the same invocation all along
    assert daemon(host)["InvocationID"] == before[DAEMON]["InvocationID"]
    # and the result came from the dispatcher that was running the operation when the package changed
    out = host.run(["journalctl", "--no-pager", "-o", "json", f"_SYSTEMD_UNIT={DISPATCH}", f"UNBOUNDED_REQUEST={id}",
                    "UNBOUNDED_RESULT=succeeded"]).stdout
    said = [json.loads(line) for line in out.splitlines()]
    assert [e["_PID"] for e in said] == [before[DISPATCH]["MainPID"]]
    assert agent(host) == agent_before
    # the slots are the agent's: the older package's agent stays in blue, not the newer package's
    assert host.run([f"{BIN}/unbounded-agent-blue", "version"]).stdout.strip() == f"unbounded-agent {version}"
    assert host.run(["/usr/lib/unbounded-agent/unbounded-agent", "version"]).stdout.strip() == f"unbounded-agent {newer}"
