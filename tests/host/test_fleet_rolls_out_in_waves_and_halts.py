"""A fleet upgrade, as an operator runs it: three test hosts, each with the .deb and its own agent daemon (its own
identity, unbounded-agent:<host>), one test API server in the test network, and the fan-out controller run by its
systemd unit on worker-01, the management host. With kubectl only:

- the packages install the controller's unit disabled; enabled, it takes the Lease;
- one MachineOperation with machineSelector rolls a release through the hosts in waves: the canary worker-01
  alone, then worker-02 and worker-03 (maxInFlight 2), an Event per wave, counts in the ROLLOUT column;
- a release whose daemon crashes halts after the canary: the canary rolls back (DaemonFailed), the parent ends
  Failed/Halted naming it, and the other hosts keep their version: no child is ever created for them;
- deleting a parent mid-rollout withdraws the children not yet started (their hosts never run them) and lets the
  running one finish;
- the controller killed with SIGKILL mid-rollout: the standby on worker-02 takes the Lease and finishes the
  rollout, and no machine gets a second child.
"""

import contextlib
import json
import re
import time

import pytest
import releases
from fleet_host import (
    CONTROLLER,
    children,
    controller_state,
    install_controller,
    leader,
    lease,
    parent,
    phase,
    start_controller,
    version,
    wait_leader,
    wide,
    wide_cell,
    wide_row,
)
from fleet_host import fleet_link as make_link
from mop_host import DAEMON, wait_until
from upgrade_host import hold, release_hold, unhold, wait_held

pytestmark = pytest.mark.testhost

HOSTS = ("worker-01", "worker-02", "worker-03")
RESULTS = "/var/lib/unbounded-agent-ops/results"
ROLLOUT = 420  # a bound on a whole rollout's wait, never an assertion


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("fleet-releases")
    return {
        "2.0.0": releases.real_release(repo_root, "2.0.0", out / "2.0.0"),
        "3.0.0": releases.real_release(repo_root, "3.0.0", out / "3.0.0"),
        "4.0.0": releases.real_release(repo_root, "4.0.0", out / "4.0.0"),
        "crash": releases.script_release(out / "crash.tar.gz", version="9.0.0", daemon="crash"),
    }


@pytest.fixture(scope="module")
def fleet(testhost_factory, deb_path, built, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        hosts = [stack.enter_context(testhost_factory(name)) for name in HOSTS]
        for h in hosts:
            h.install_deb(deb_path)
        link = make_link(hosts, tmp_path_factory.mktemp("kube"))
        stack.callback(link.stop)
        urls = {}
        for h in hosts:  # the same URL on every host: https://localhost:8443/agent-<v>.tar.gz, each its own copy
            urls = {v: h.serve(path, f"agent-{v}.tar.gz") for v, path in built.items()}
        for h in hosts[:2]:
            install_controller(link, h)
        yield hosts, link, urls


def results(host) -> set[str]:
    return {p.name for p in host.path(RESULTS).glob("*.json")}


def wait_phase(link, name, *phases, timeout=ROLLOUT) -> str:
    return wait_until(f"{name} to be {' or '.join(phases)}", lambda: (p := phase(link, name)) in phases and p,
                      timeout=timeout)


def events(link, name: str) -> list[tuple[str, str]]:
    out = link.kubectl("get", "events", "-n", "default", "--field-selector", f"involvedObject.name={name}",
                       "-o", "json").stdout
    items = sorted(json.loads(out)["items"], key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))
    return [(e["reason"], e["message"]) for e in items]


def test_the_package_installs_the_controller_disabled_and_enabled_it_leads(fleet):
    hosts, link, _ = fleet
    for h in hosts:
        st = controller_state(h)
        assert (st["UnitFileState"], st["ActiveState"]) == ("disabled", "inactive"), h.name
    start_controller(hosts[0])
    assert wait_leader(link, hosts[0]).startswith("worker-01_")
    assert controller_state(hosts[0])["ActiveState"] == "active"
    security = hosts[0].run(["systemd-analyze", "security", "--no-pager", CONTROLLER]).stdout
    exposure = float(re.search(rf"Overall exposure level for {re.escape(CONTROLLER)}: ([0-9.]+)", security)[1])
    assert exposure <= 2.0, security  # sandboxed as the daemon is (1.5): it only talks to the API server


def test_a_selector_upgrade_rolls_through_the_hosts_in_waves(fleet, capsys):
    hosts, link, urls = fleet
    wait_leader(link, hosts[0])
    before = {h.name: results(h) for h in hosts}
    watches = link.count_watches()
    with link.watch() as w:  # `kubectl get mop -w`, from before the apply
        wait_until("kubectl to watch", lambda: link.watching(watches), timeout=30)
        link.apply(parent("upgrade-pool-blue", urls["2.0.0"], canaryCount="1", maxInFlight="2"))
        wait_until("wave 2 in flight", lambda: "wave 2 of 2" in ((link.get("upgrade-pool-blue") or {}).get("status")
                                                                  or {}).get("message", ""), timeout=ROLLOUT)
        snapshot = wide(link)  # what an operator sees mid-rollout
        wait_phase(link, "upgrade-pool-blue", "Complete", "Failed")
        w.wait_phase("upgrade-pool-blue", "Complete", "Failed")
    assert phase(link, "upgrade-pool-blue") == "Complete", link.get("upgrade-pool-blue")["status"]
    assert w.phases("upgrade-pool-blue") == ["Pending", "InProgress", "Complete"]
    with capsys.disabled():
        print("\n$ kubectl get mop -o wide   # during wave 2\n" + snapshot.rstrip())
        print("$ kubectl get mop -o wide\n" + wide(link).rstrip())
    # the ROLLOUT column mid-rollout; MACHINE empty for the parent
    row = wide_row(snapshot, "upgrade-pool-blue")
    assert row[:3] == ["upgrade-pool-blue", "AgentUpgrade", "InProgress"]
    assert row[-1] == "3 matched: 1 complete, 0 failed, 2 in flight, 0 not started"
    assert wide_cell(snapshot, "upgrade-pool-blue", "MACHINE") == ""
    assert wide_cell(snapshot, "upgrade-pool-blue-worker-02", "MACHINE") == "worker-02"
    assert wide_cell(snapshot, "upgrade-pool-blue-worker-02", "ROLLOUT") == ""  # counts are a parent's
    kids = children(link, "upgrade-pool-blue")
    assert {m: k["metadata"]["labels"]["unbounded-cloud.io/fleet-wave"] for m, k in kids.items()} == {
        "worker-01": "1", "worker-02": "2", "worker-03": "2"}
    assert all(k["status"]["phase"] == "Complete" for k in kids.values())
    # wave 2 started only once the canary's Complete was on the server
    with link.server.lock:
        history = [(e.rv, e.type, e.obj["metadata"]["name"], (e.obj.get("status") or {}).get("phase"))
                   for e in link.server.history if e.store.endswith("machineoperations")]
    canary_done = min(rv for rv, _, name, ph in history if name == "upgrade-pool-blue-worker-01" and ph == "Complete")
    wave2_created = [rv for rv, kind, name, _ in history if kind == "ADDED" and name in
                     ("upgrade-pool-blue-worker-02", "upgrade-pool-blue-worker-03")]
    assert len(wave2_created) == 2 and min(wave2_created) > canary_done
    assert [r for r, _ in events(link, "upgrade-pool-blue")] == ["WaveStarted", "WaveStarted", "Completed"]
    for h in hosts:
        assert version(h) == "2.0.0", h.name
        assert len(results(h) - before[h.name]) == 1, h.name  # one host operation each
    print(link.kubectl("describe", "mop", "upgrade-pool-blue").stdout)


def test_a_crashing_release_halts_after_the_canary_and_leaves_the_other_hosts_alone(fleet, capsys):
    hosts, link, urls = fleet
    wait_leader(link, hosts[0])
    before = {h.name: (version(h), results(h)) for h in hosts}
    assert {v for v, _ in before.values()} == {"2.0.0"}
    started = time.time()
    link.apply(parent("upgrade-pool-crash", urls["crash"], canaryCount="1", maxInFlight="2", failureBudget="0"))
    wait_phase(link, "upgrade-pool-crash", "Failed", "Complete")
    op = link.get("upgrade-pool-crash")
    cond = link.condition("upgrade-pool-crash")
    assert (op["status"]["phase"], cond["reason"]) == ("Failed", "Halted")
    assert op["status"]["message"].startswith("halted: worker-01 (DaemonFailed) failed in the canary wave; no "
                                              "further MachineOperations are created (failure budget 0)")
    kids = children(link, "upgrade-pool-crash")
    assert list(kids) == ["worker-01"]  # no child for the others, ever
    canary = link.condition("upgrade-pool-crash-worker-01")
    assert (kids["worker-01"]["status"]["phase"], canary["reason"]) == ("Failed", "DaemonFailed")
    wait_until("worker-01's daemon back", lambda: version(hosts[0]) == "2.0.0", timeout=120)
    time.sleep(3)  # the controller's passes go on: still nothing for the others
    assert list(children(link, "upgrade-pool-crash")) == ["worker-01"]
    for h in hosts[1:]:
        assert (version(h), results(h)) == before[h.name], h.name  # untouched: not even a request
    # not even an attempt: the controller's only create since the apply was the canary's
    creates = [r for r in link.server.find_requests(verb="create", resource="machineoperations")
               if "unbounded-agent-fleet-controller/" in r.user_agent and r.time >= started]
    assert [r.code for r in creates] == [201]
    assert hosts[0].run(["systemctl", "is-active", DAEMON]).stdout.strip() == "active"
    reasons = [r for r, _ in events(link, "upgrade-pool-crash")]
    assert reasons == ["WaveStarted", "Halted"]
    with capsys.disabled():
        print("\n$ kubectl get mop -o wide\n" + wide(link).rstrip())


def test_deleting_the_parent_withdraws_what_has_not_started_and_lets_the_running_one_finish(fleet):
    hosts, link, urls = fleet
    wait_leader(link, hosts[0])
    for h in hosts[1:]:  # their agents are away: their children stay Pending, not started
        h.run(["systemctl", "stop", DAEMON])
    hold(hosts[0], "unbounded-upgrade-preflight@.service", "preflight-before-run")
    before = {h.name: (version(h), results(h)) for h in hosts}
    try:
        link.apply(parent("upgrade-pool-cancel", urls["3.0.0"], canaryCount="0", maxInFlight="3"))
        wait_held(hosts[0], "preflight-before-run")
        assert phase(link, "upgrade-pool-cancel-worker-01") == "InProgress"
        assert {m: k["status"]["phase"] for m, k in children(link, "upgrade-pool-cancel").items()} == {
            "worker-01": "InProgress", "worker-02": "Pending", "worker-03": "Pending"}
        link.kubectl("delete", "mop", "upgrade-pool-cancel", "--wait=false")
        wait_until("the unstarted children to be withdrawn",
                   lambda: list(children(link, "upgrade-pool-cancel")) == ["worker-01"], timeout=60)
        assert link.get("upgrade-pool-cancel")["metadata"]["deletionTimestamp"]  # held while worker-01 runs
        assert link.condition("upgrade-pool-cancel")["reason"] == "Cancelled"
    finally:
        unhold(hosts[0], "unbounded-upgrade-preflight@.service")
        release_hold(hosts[0], "preflight-before-run")
        for h in hosts[1:]:
            h.run(["systemctl", "start", DAEMON])
    wait_until("the running child to finish", lambda: phase(link, "upgrade-pool-cancel-worker-01") in
               ("Complete", "Failed") or link.get("upgrade-pool-cancel") is None, timeout=ROLLOUT)
    wait_until("the parent and its children to go", lambda: link.get("upgrade-pool-cancel") is None
               and not children(link, "upgrade-pool-cancel"), timeout=120)
    assert version(hosts[0]) == "3.0.0"  # the running one finished
    for h in hosts[1:]:
        wait_until(f"{h.name}'s agent to list again", lambda h=h: h.run(
            ["systemctl", "is-active", DAEMON], check=False).stdout.strip() == "active", timeout=60)
    time.sleep(5)  # the agents are back: had they anything to run, it would be queued by now
    for h in hosts[1:]:
        assert (version(h), results(h)) == before[h.name], h.name


def test_killed_mid_rollout_the_standby_takes_the_lease_and_no_machine_gets_a_second_child(fleet):
    hosts, link, urls = fleet
    killed_identity = wait_leader(link, hosts[0])
    start_controller(hosts[1])  # the standby
    assert leader(link) == killed_identity
    hold(hosts[1], "unbounded-upgrade-preflight@.service", "preflight-before-run")
    started = time.time()
    try:
        link.apply(parent("upgrade-pool-failover", urls["4.0.0"], canaryCount="1", maxInFlight="1"))
        wait_held(hosts[1], "preflight-before-run", timeout=ROLLOUT)  # wave 2 (worker-02) runs, held
        assert list(children(link, "upgrade-pool-failover")) == ["worker-01", "worker-02"]
        pid = controller_state(hosts[0])["MainPID"]
        assert int(pid) > 0
        hosts[0].run(["kill", "-9", pid])  # the process itself (a cgroup-wide kill trips the nested host's cgroups)
        hosts[0].run(["systemctl", "stop", CONTROLLER])  # no restart: the standby is the one to take over
        successor = wait_until("the standby to take the Lease",
                               lambda: (h := leader(link)).startswith("worker-02_") and h, timeout=60)
    finally:
        unhold(hosts[1], "unbounded-upgrade-preflight@.service")
        release_hold(hosts[1], "preflight-before-run")
    wait_phase(link, "upgrade-pool-failover", "Complete", "Failed")
    assert phase(link, "upgrade-pool-failover") == "Complete"
    assert [version(h) for h in hosts] == ["4.0.0"] * 3
    kids = children(link, "upgrade-pool-failover")
    assert sorted(kids) == list(HOSTS)
    # one create per machine, ever: the killed leader's and its successor's, none twice
    creates = [r for r in link.server.find_requests(verb="create", resource="machineoperations")
               if "unbounded-agent-fleet-controller/" in r.user_agent and r.code == 201 and r.time >= started]
    by = {}
    for r in creates:
        by.setdefault(r.user_agent.split("(")[-1].rstrip(")"), []).append(r)
    assert {who: len(rs) for who, rs in by.items()} == {killed_identity: 2, successor: 1}
    writes = lambda who: [r for r in link.server.find_requests(user_agent=f"({who})")  # noqa: E731
                          if r.verb in ("create", "update", "patch", "delete")]
    # never both acting: in the server's log (the order it handled them), every write of the killed leader
    # comes before the successor's first (not clock stamps against the test's: a write sent just before the
    # kill may be handled after it)
    order = {id(r): i for i, r in enumerate(link.server.find_requests())}
    assert max(order[id(r)] for r in writes(killed_identity)) < min(order[id(r)] for r in writes(successor))
    assert lease(link)["spec"]["leaseTransitions"] >= 1
