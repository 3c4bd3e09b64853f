"""The watcher against the real test API server: list+watch for its own machine, resume, 410 relist,
field selector fallback, readiness, 409 retry, outages, one operation at a time, kinds it must not
touch, TTL deletion and the Machine annotation. The host side is a fake (tests/watcher_fakes.py)."""

import time

import pytest

from watcher_fakes import MACHINE, Harness, wait_for
from unbounded_agent import kubeclient, mop, watcher
from unbounded_agent.version import VERSION

URL = "https://releases.example.com/agent.tar.gz"
AGENT = f"agent-{MACHINE}"


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def agent_requests(h, **kw):
    return h.server.find_requests(user=AGENT, **kw)


def finish_upgrade(h, name, ok=True):
    wait_for(f"{name} to start", lambda: any(c[0] == "start_upgrade" and c[1] == h.operation(name)
                                             for c in h.ops.calls))
    h.ops.set_upgrade(h.operation(name), "committed" if ok else "rolled-back", ok=ok,
                      reason="" if ok else "DaemonFailed", message="done" if ok else "rolled back")


def test_ready_only_after_the_first_list(h):
    h.server.pause(mode="503")
    w = h.start()
    wait_for("a list attempt", lambda: [r for r in h.server.requests if r.path == kubeclient.MOP_PATH])
    assert h.notified == [] and not w.ready
    h.server.resume()
    wait_for("READY=1", lambda: h.notified)
    assert h.notified[0]["READY"] == 1 and "watching MachineOperations" in h.notified[0]["STATUS"]
    assert [r.code for r in agent_requests(h, verb="list")][-1] == 200


def test_ready_after_a_grace_when_the_api_server_stays_unreachable(h):
    import dataclasses

    h.cfg = dataclasses.replace(h.cfg, ready_without_api_seconds=0.5)
    h.server.pause(mode="refuse")
    w = h.start()
    wait_for("READY=1 without the API server", lambda: h.notified)
    assert "unreachable" in h.notified[0]["STATUS"] and not w.synced
    h.server.resume()
    wait_for("the first list", lambda: w.synced)
    assert len(h.notified) == 1  # READY once


def test_only_this_machines_operations_are_listed_and_watched(h):
    h.create("other", "AgentUpgrade", machine="worker-02", downloadURL=URL)
    h.start()
    h.create("mine", "AgentUpgrade", downloadURL=URL)
    finish_upgrade(h, "mine")
    h.wait_phase("mine", "Complete")
    h.create("other-2", "AgentReset", machine="worker-02")
    h.create("mine-2", "AgentReset")
    h.wait_phase("mine-2", "Complete")
    for name in ("other", "other-2"):
        assert h.get(name).get("status") in (None, {}) and h.events(name) == []
        assert not agent_requests(h, name=name)
    q = [r.query for r in agent_requests(h) if r.verb in ("list", "watch")]
    assert q and all(x.get("fieldSelector") == f"spec.machineRef={MACHINE}" for x in q)


def test_watch_resumes_from_the_last_resource_version_without_relisting(h):
    w = h.start(watch_timeout=(1, 1))  # the server ends each watch after a second
    wait_for("three watches", lambda: len(agent_requests(h, verb="watch")) >= 3)
    h.create("a", "AgentReset")
    h.wait_phase("a", "Complete")
    wait_for("another watch", lambda: len(agent_requests(h, verb="watch")) >= 5)
    watches = agent_requests(h, verb="watch")
    assert len(agent_requests(h, verb="list")) == 1
    rvs = [int(r.query["resourceVersion"]) for r in watches]
    assert rvs == sorted(rvs) and rvs[-1] > rvs[0]  # each watch starts where the last one ended
    assert w.listwatch.relists_410 == 0


def test_410_gone_relists_and_finds_what_it_missed(h):
    w = h.start(watch_timeout=(1, 1))
    wait_for("the first watch", lambda: agent_requests(h, verb="watch"))
    h.create("elsewhere", "AgentReset", machine="worker-02")  # moves the resourceVersion, unseen by the agent
    h.server.compact()  # the agent's resourceVersion has left the window
    wait_for("a relist", lambda: w.listwatch.relists_410 >= 1)
    wait_for("the second list", lambda: len(agent_requests(h, verb="list")) >= 2)
    h.create("after", "AgentReset")
    h.wait_phase("after", "Complete")


def test_field_selector_fallback_filters_here_and_says_so_once(tmp_path, capfd):
    with Harness(tmp_path, version="1.30.2") as h:  # a 1.30 server ignores selectableFields
        h.create("other", "AgentReset", machine="worker-02")
        w = h.start(watch_timeout=(1, 1))
        h.create("mine", "AgentReset")
        h.wait_phase("mine", "Complete")
        wait_for("more watches", lambda: len(agent_requests(h, verb="watch")) >= 3)
        assert w.listwatch.client_side
        lists = agent_requests(h, verb="list")
        assert lists[0].code == 400 and "fieldSelector" in lists[0].query
        assert lists[1].code == 200 and "fieldSelector" not in lists[1].query
        assert h.get("other").get("status") in (None, {})
    err = capfd.readouterr().err
    assert err.count("cannot select MachineOperations by spec.machineRef") == 1


def test_conflict_on_a_status_write_is_retried(h):
    orig = h.server.handle
    bumped = []

    def interleave(hd):
        # Another writer changes the object between the agent's read and its first status write: a real 409.
        if hd.command == "PUT" and hd.path.split("?")[0].endswith("/machineoperations/c/status") and not bumped:
            bumped.append(1)
            h.admin.request("PATCH", f"{kubeclient.MOP_PATH}/c", body={"metadata": {"labels": {"touched": "yes"}}},
                            content_type="application/merge-patch+json")
        return orig(hd)

    h.server.handle = interleave
    h.start()
    h.create("c", "AgentUpgrade", downloadURL=URL)
    finish_upgrade(h, "c")
    h.wait_phase("c", "Complete")
    codes = [r.code for r in agent_requests(h, verb="update", name="c")]
    assert codes[0] == 409 and codes[1:] == [200] * (len(codes) - 1)
    assert h.watcher.stats["conflicts"] == 1
    assert h.get("c")["metadata"]["labels"] == {"touched": "yes"}  # the other writer's change survives


def test_status_catches_up_after_the_api_server_was_unavailable(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    wait_for("the upgrade to start", lambda: h.ops.count("start_upgrade"))
    h.wait_phase("up", "InProgress")
    operation = h.operation("up")
    h.server.pause(mode="refuse")
    h.ops.set_upgrade(operation, "committed", ok=True, message="upgraded")
    wait_for("the outcome to wait for the server",
             lambda: (p := next(iter(watcher.ProgressStore(h.cfg.state_dir).load_all().values())))["step"] == "done"
             and not p["written"])
    h.server.resume()
    h.wait_phase("up", "Complete")
    assert h.condition("up")["reason"] == "Succeeded"


def test_no_busy_loop_while_the_api_server_fails(h):
    h.start()
    wait_for("the first list", lambda: h.watcher and h.watcher.synced)
    h.server.clear_requests()
    h.server.pause(mode="503")
    time.sleep(3)
    h.server.resume()
    # exponential backoff from 0.5 s: a handful of attempts in 3 s, not hundreds
    assert len(agent_requests(h)) < 15


def test_two_operations_run_one_after_the_other(h):
    h.start()
    h.create("first", "AgentUpgrade", downloadURL=URL)
    h.wait_phase("first", "InProgress")
    h.create("second", "AgentReset")
    wait_for("second to wait", lambda: "first" in (h.get("second").get("status") or {}).get("message", ""))
    st = h.get("second")["status"]
    assert st["phase"] == "Pending" and st["message"] == f"waiting for AgentUpgrade first (in progress on {MACHINE}) to finish"
    assert h.ops.count("request_reset") == 0
    finish_upgrade(h, "first")
    h.wait_phase("first", "Complete")
    h.wait_phase("second", "Complete")
    wait_for("the reset's final steps", lambda: h.ops.count("start_reset_phase2"))
    assert [c[0] for c in h.ops.calls] == ["start_upgrade", "request_reset", "start_reset_phase1", "start_reset_phase2"]


def test_unsupported_and_invalid_fail_at_once_host_kinds_are_untouched(h):
    h.start()
    h.create("busy", "AgentUpgrade", downloadURL=URL)  # in progress: the failures below do not wait for it
    h.wait_phase("busy", "InProgress")
    h.create("reboot", "NodeReboot")
    h.create("no-url", "AgentUpgrade")
    for kind in ("HostReboot", "HostPowerOff", "HostPowerOn", "HostReplace"):
        h.create(kind.lower(), kind)
    h.wait_phase("reboot", "Failed")
    assert h.condition("reboot")["reason"] == "UnsupportedOperation"
    h.wait_phase("no-url", "Failed")
    assert h.condition("no-url")["reason"] == "InvalidParameters"
    assert 'missing required parameter "downloadURL"' in h.condition("no-url")["message"]
    finish_upgrade(h, "busy")
    h.wait_phase("busy", "Complete")
    for kind in ("HostReboot", "HostPowerOff", "HostPowerOn", "HostReplace"):
        assert h.get(kind.lower()).get("status") in (None, {})
        assert not agent_requests(h, name=kind.lower()) and h.events(kind.lower()) == []
    assert h.ops.count("start_upgrade") == 1


def test_in_progress_without_a_local_record_is_failed_not_run(h):
    h.create("orphan", "AgentReset")
    op = h.get("orphan")
    op["status"] = mop.apply_status(op, mop.desired(mop.IN_PROGRESS, "InProgress", "resetting"))
    h.admin.request("PUT", f"{kubeclient.MOP_PATH}/orphan/status", body=op, content_type="application/json")
    h.start()
    h.wait_phase("orphan", "Failed")
    assert "no record of starting this operation" in h.condition("orphan")["message"]
    assert h.ops.calls == []


def test_finished_operations_are_deleted_after_their_ttl(h):
    h.create("keep", "NodeReboot")
    h.create("ttl", "NodeReboot", ttl=0)
    h.create("host-ttl", "HostReboot", ttl=0)
    h.start()
    wait_for("ttl to be deleted", lambda: h.get("ttl") is None)
    h.wait_phase("keep", "Failed")
    assert h.get("host-ttl") is not None  # another controller's
    (delete,) = agent_requests(h, verb="delete")
    assert delete.name == "ttl" and delete.code == 200


def test_ttl_waits_for_its_time(h):
    h.start()
    h.create("later", "NodeReboot", ttl=3600)
    h.wait_phase("later", "Failed")
    wait_for("a few more passes", lambda: len(agent_requests(h, verb="watch")) >= 1)
    time.sleep(0.5)
    assert h.get("later") is not None and not agent_requests(h, verb="delete")


def test_machine_gets_the_agent_version_annotation(h):
    h.admin.request("POST", kubeclient.MACHINE_PATH, content_type="application/json",
                    body={"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                          "metadata": {"name": MACHINE}, "spec": {}})
    h.start()
    wait_for("the annotation", lambda: (h.admin.get(f"{kubeclient.MACHINE_PATH}/{MACHINE}")["metadata"]
                                        .get("annotations") or {}).get(mop.AGENT_VERSION_ANNOTATION))
    assert h.admin.get(f"{kubeclient.MACHINE_PATH}/{MACHINE}")["metadata"]["annotations"] == {
        mop.AGENT_VERSION_ANNOTATION: VERSION}


def test_a_missing_machine_is_not_an_error(h):
    h.start()
    wait_for("the annotation attempt", lambda: agent_requests(h, verb="patch"))
    h.create("r", "AgentReset")
    h.wait_phase("r", "Complete")
    assert [r.code for r in agent_requests(h, verb="patch")] == [404]


def test_progress_of_deleted_finished_operations_is_forgotten(h):
    h.start()
    h.create("r", "AgentUpgrade", downloadURL=URL)
    finish_upgrade(h, "r")
    h.wait_phase("r", "Complete")
    store = watcher.ProgressStore(h.cfg.state_dir)
    assert len(store.load_all()) == 1
    h.delete("r")
    wait_for("the progress file to go", lambda: store.load_all() == {})


def test_a_broken_kubeconfig_is_retried_until_it_is_fixed(h):
    import dataclasses
    from pathlib import Path

    good = Path(h.cfg.kubeconfig).read_text()
    Path(h.cfg.kubeconfig).write_text("{not: [valid yaml")
    h.cfg = dataclasses.replace(h.cfg, ready_without_api_seconds=0.3)
    w = h.start()
    wait_for("READY=1 without a client", lambda: h.notified)
    assert not w.synced and w.listwatch.is_alive()
    Path(h.cfg.kubeconfig).write_text(good)
    wait_for("the first list", lambda: w.synced)
    h.create("r", "NodeReboot")
    h.wait_phase("r", "Failed")
