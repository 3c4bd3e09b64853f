"""`unbounded-agent reset` on a bootstrapped host: everything `start` left is gone, every decoy
survives, exit 0; run again (with the toolset's own CLI, the agent's being gone), it succeeds and removes
nothing. Each run is one request in the operation queue, with its own result."""

import pytest
from bootstrapped_host import bootstrap, checkpoint_exists, removed_items, result_of, run_reset, snapshot, spool_is_empty, step

pytestmark = pytest.mark.testhost

ALL_STEPS = ["begin", "stop-machines", "remove-links", "remove-wireguard-keys", "remove-nspawn-config",
             "remove-machine-trees", "remove-routing", "remove-agent", "verify", "stop-daemon", "reload-systemd",
             "finish"]


@pytest.fixture(scope="module")
def first_run(agent_host):
    fx = bootstrap(agent_host)
    code, report, stderr = run_reset(agent_host)
    return fx, code, report, snapshot(agent_host)


def test_every_step_succeeds_and_the_reset_exits_0(first_run):
    _, code, report, _ = first_run
    assert [(s["step"], s["result"]) for s in report["steps"]] == [(name, "succeeded") for name in ALL_STEPS]
    assert (code, report["result"], report["reason"]) == (0, "succeeded", "Succeeded")


def test_everything_the_bootstrap_left_is_gone(first_run):
    fx, _, _, snap = first_run
    assert fx.items - fx.gone(snap) == set()


def test_every_decoy_survives(first_run):
    fx, _, _, snap = first_run
    assert fx.decoys - fx.kept(snap) == set()


def test_the_report_names_what_each_step_removed(first_run):
    _, _, report, _ = first_run
    assert set(step(report, "stop-machines")["removed"]) == {
        "machine kube1", "machine kube2",
        "enabled unit systemd-nspawn@kube1.service", "enabled unit systemd-nspawn@kube2.service"}
    assert set(step(report, "remove-links")["removed"]) == {
        f"link {n}" for n in ("wg51820", "wg51833", "wg51899", "geneve0", "vxlan0", "ipip0", "unbounded0", "cbr0")}
    assert "mount /var/lib/machines/kube2/data" in step(report, "remove-machine-trees")["removed"]
    assert "directory /var/lib/unbounded-agent" in step(report, "remove-agent")["removed"]
    # systemd makes the daemon's StateDirectory= again to run its ExecStopPost= hook: the step removes it after
    # the stop, so nothing of the agent is left
    assert step(report, "stop-daemon")["removed"] == ["running unit unbounded-agent-daemon.service",
                                                      "enabled unit unbounded-agent-daemon.service",
                                                      "directory /var/lib/unbounded-agent"]


def test_the_follow_up_names_the_node_to_delete(first_run, agent_host):
    _, _, report, _ = first_run
    assert report["follow_up"][0] == f"kubectl delete node {agent_host.name}"


def test_the_checkpoint_is_gone_and_the_toolset_stays(first_run, agent_host):
    assert not checkpoint_exists(agent_host)
    assert agent_host.run(["dpkg-query", "-W", "-f", "${Status}", "unbounded-agent"]).stdout == "install ok installed"
    props = agent_host.run(["systemctl", "show", "unbounded-agent-daemon.service",
                            "-p", "ActiveState,UnitFileState"]).stdout.split()
    assert props == ["ActiveState=inactive", "UnitFileState=disabled"]


def test_the_reset_ran_as_one_request_of_the_queue(first_run, agent_host):
    _, _, report, _ = first_run
    res = result_of(agent_host, report["run_id"])
    assert (res["kind"], res["source"], res["succeeded"], res["reason"]) == ("reset", "cli", True, "Succeeded")
    assert {s["run_id"] for s in report["steps"]} == {report["run_id"]}  # every step ran for that request
    assert spool_is_empty(agent_host)
    # phase 1 (which removes the agent's files) finished before phase 2 (which stops its daemon) was started
    log = agent_host.run(["journalctl", "--no-pager", "-o", "cat", "-u", "unbounded-agent-dispatch.service"]).stdout
    run = report["run_id"]
    assert log.index(f"reset {run}: starting unbounded-agent-reset-phase1.target") < log.index(
        f"reset {run}: starting unbounded-agent-reset-phase2.target")


def test_a_second_run_succeeds_and_changes_nothing(first_run, agent_host):
    # the agent binary went with the reset: /usr/bin/unbounded-agent falls back to the toolset's own CLI, which
    # runs the same reset
    assert agent_host.run(["unbounded-agent", "version"], check=False).returncode == 0
    before = snapshot(agent_host)
    code, report, _ = run_reset(agent_host)  # as the user types it: /usr/bin/unbounded-agent reset
    assert (code, report["result"]) == (0, "succeeded")
    assert removed_items(report) == set()
    assert snapshot(agent_host) == before
    assert [s["step"] for s in report["steps"] if s["result"] != "succeeded"] == []
    assert report["run_id"] != first_run[2]["run_id"] and result_of(agent_host, report["run_id"])["succeeded"]
