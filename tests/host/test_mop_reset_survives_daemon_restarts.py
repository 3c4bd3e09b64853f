"""An AgentReset MachineOperation whose daemon is restarted (`systemctl restart`) at any point of the reset
always ends in a terminal phase, and the reset runs once.

- Before the agent's files go (queued, in phase 1): the restarted daemon follows its request to Complete.
- While the agent's files go (its state already gone, its config and binary not yet): the restarted daemon has
  lost its progress, finds the request in the host's queue, and follows it to Complete.
- After they are gone the daemon cannot start again. Complete already published stays; a Complete not yet
  published is published by the reset's reporter, which the dispatcher starts in the daemon's place from the
  copy of the config and credentials the reset kept.
"""

import json

import pytest
from bootstrapped_host import hold_step, release_step, unhold_step
from bootstrapped_host import wait_held as wait_step_held
from mop_host import DAEMON, KubeLink, daemon_state, journal_of, mop, wait_until
from queue_host import DISPATCH, OPS, RESET_DIR, hold, release, unhold
from queue_host import wait_held as wait_point

pytestmark = pytest.mark.testhost

SEED = "/usr/libexec/unbounded-agent/unbounded-agent-seed-slots"
REMOVE_AGENT = "unbounded-agent-reset-remove-agent.service"
REPORTER = "unbounded-agent-reset-reporter.service"


@pytest.fixture(scope="module")
def env(testhost_factory, tmp_path_factory):
    with testhost_factory("mop-reset-restarts", installed=True) as host:
        kube = KubeLink.start(host, tmp_path_factory.mktemp("kube"))
        try:
            yield host, kube
        finally:
            kube.stop()


def install_agent(host, kube) -> None:
    """The agent as bootstrap leaves it (again, after a reset): slots, config and kubeconfig, daemon enabled."""
    kube.configure_agent(host, restart=False)
    host.run([SEED])
    host.run(["systemctl", "reset-failed", DAEMON], check=False)
    host.run(["systemctl", "enable", DAEMON])
    kube.configure_agent(host)  # restarts the daemon: Type=notify, so it is ready when this returns
    assert daemon_state(host)["ActiveState"] == "active"


def phase(kube, name) -> str | None:
    return ((kube.get(name) or {}).get("status") or {}).get("phase")


def restart_daemon(host) -> None:
    # Once the agent's files are gone the start fails (status 203/EXEC): that is the point.
    host.run(["systemctl", "restart", DAEMON], check=False, timeout=120)


def results_of(host, name: str) -> list[dict]:
    docs = [json.loads(p.read_text()) for p in host.path(f"{OPS}/results").glob("*.json")]
    return [d for d in docs if d["operation"].startswith(f"{name}@")]


def at_gate(host, name: str) -> bool:
    """The dispatcher waits at the gate of this operation's reset (the agent's files are gone by then)."""
    return any(f"reset {name}@" in line and "waiting for its requester to report" in line
               for line in journal_of(host, DISPATCH, lines=100000).splitlines())


def first_step_starts(host) -> int:
    """How often systemd has started the reset's first step on this host."""
    log = journal_of(host, "unbounded-agent-reset-stop-machines.service", lines=100000)
    return sum(line.startswith("Starting ") for line in log.splitlines())


def assert_ran_once(host, name: str) -> dict:
    """One request for the operation, run once by the dispatcher (never resumed, never submitted again)."""
    (res,) = wait_until(f"the result of {name}", lambda: results_of(host, name), timeout=300)
    assert res["succeeded"], res
    log = journal_of(host, DISPATCH, lines=100000)
    assert log.count(f"(request {res['id']}, from machineoperation): starting") == 1
    assert f"(request {res['id']}, from machineoperation): going on" not in log
    assert json.loads(host.read(f"{RESET_DIR}/reports/01-stop-machines.json"))["run_id"] == res["id"]
    return res


POINTS = ["queued", "phase 1", "removing the agent's files", "at the gate, Complete unsaid",
          "after Complete", "phase 2"]


@pytest.mark.parametrize("point", POINTS)
def test_a_daemon_restarted_during_a_reset_ends_it_once_and_terminal(env, point):
    host, kube = env
    install_agent(host, kube)
    name = "reset-" + point.replace(" ", "-").replace(",", "").replace("'", "").lower()
    starts_before = first_step_starts(host)
    if point == "queued":
        hold(host, DISPATCH, "dispatch-claimed")
    elif point in ("phase 1", "at the gate, Complete unsaid"):
        hold_step(host, "remove-links")
    elif point == "removing the agent's files":
        hold(host, REMOVE_AGENT, "reset-remove-agent-last")
    elif point == "after Complete":
        hold(host, DISPATCH, "reset-gate-passed")
    elif point == "phase 2":
        hold_step(host, "stop-daemon")
    kube.apply(mop(name, host.name, "AgentReset"))
    try:
        if point == "queued":
            wait_point(host, OPS, "dispatch-claimed")
        elif point == "phase 1":
            wait_step_held(host, "remove-links")
        elif point == "removing the agent's files":
            wait_point(host, RESET_DIR, "reset-remove-agent-last")
            assert not host.path("/var/lib/unbounded-agent/machineoperations").exists()  # its progress is gone
            assert host.path("/etc/unbounded/agent/kubeconfig").exists()
        elif point == "at the gate, Complete unsaid":
            wait_step_held(host, "remove-links")
            kube.server.pause(mode="503")  # Complete cannot be written
            release_step(host, "remove-links")
            wait_until("the gate", lambda: at_gate(host, name))
        elif point == "after Complete":
            wait_point(host, OPS, "reset-gate-passed")
            assert phase(kube, name) == "Complete"
        elif point == "phase 2":
            wait_step_held(host, "stop-daemon")
        if point != "at the gate, Complete unsaid":  # (the server answers 503 there)
            assert phase(kube, name) in ("Pending", "InProgress", "Complete")
        restart_daemon(host)
        if point in ("queued", "phase 1", "removing the agent's files"):
            wait_until("the restarted daemon to run", lambda: daemon_state(host)["ActiveState"] == "active")
    finally:
        for unit in (DISPATCH, REMOVE_AGENT):
            unhold(host, unit)
        for step in ("remove-links", "stop-daemon"):
            unhold_step(host, step)
            release_step(host, step)
        release(host, OPS, "dispatch-claimed")
        release(host, OPS, "reset-gate-passed")
        release(host, RESET_DIR, "reset-remove-agent-last")
        kube.server.resume()
    assert_ran_once(host, name)
    if point == "at the gate, Complete unsaid":
        # The daemon has no files to start from: the reporter says it in its place, from the copy of the config
        # and credentials the reset kept, and goes with that copy when the reset stops the daemon.
        assert "to report in its place" in journal_of(host, DISPATCH)
        assert f"AgentReset {name}: reported; the reset goes on" in journal_of(host, REPORTER)
        assert host.run(["systemctl", "is-active", REPORTER], check=False).stdout.strip() == "inactive"
        assert not host.path(f"{RESET_DIR}/reporter").exists()
    wait_until(f"{name} to end", lambda: phase(kube, name) in ("Complete", "Failed"), timeout=120)
    assert phase(kube, name) == "Complete", kube.condition(name)
    assert first_step_starts(host) == starts_before + 1
    assert not host.path("/var/lib/unbounded-agent").exists()
    if point in ("removing the agent's files",):
        assert "following it" in journal_of(host)  # the restarted daemon had lost its progress
