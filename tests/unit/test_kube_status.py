"""Everything the watcher writes to the API server (kube/status.py): status through the status subresource
with 409 retry, writes that wait out an outage, Events, TTL deletions and the Machine annotation —
first through a running watcher, then ApiWriter alone, against the real test API server."""

import pytest
from watcher_fakes import AGENT, MACHINE, Harness, wait_for

from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import mop
from unbounded_agent.kube.progress import DONE, OperationProgress, ProgressStore
from unbounded_agent.kube.status import ApiWriter
from unbounded_agent.version import VERSION

URL = "https://releases.example.com/agent.tar.gz"


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def path(name, sub=""):
    return f"{kubeclient.MOP_PATH}/{name}{sub}"


def create_machine(h):
    h.admin.request("POST", kubeclient.MACHINE_PATH, content_type="application/json",
                    body={"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                          "metadata": {"name": MACHINE}, "spec": {}})


def machine_annotations(h):
    return h.admin.get(f"{kubeclient.MACHINE_PATH}/{MACHINE}")["metadata"].get("annotations") or {}


# -- through the watcher -----------------------------------------------------------------------------


def test_conflict_on_a_status_write_is_retried(h):
    # Another writer changes the object between the agent's read and its first status write: a real 409.
    h.before_agent("PUT", path("c", "/status"), action=lambda: h.admin.request(
        "PATCH", path("c"), body={"metadata": {"labels": {"touched": "yes"}}},
        content_type="application/merge-patch+json"))
    h.start()
    h.create("c", "AgentUpgrade", downloadURL=URL)
    h.finish_upgrade("c")
    h.wait_phase("c", "Complete")
    codes = [r.code for r in h.agent_requests(verb="update", name="c")]
    assert codes[0] == 409 and codes[1:] == [200] * (len(codes) - 1)
    assert h.watcher.stats["conflicts"] == 1
    assert h.get("c")["metadata"]["labels"] == {"touched": "yes"}  # the other writer's change survives
    assert h.phases_written("c") == ["Pending", "InProgress", "Complete"]


def test_status_catches_up_after_the_api_server_was_unavailable(h):
    h.start()
    h.create("up", "AgentUpgrade", downloadURL=URL)
    req = h.dispatcher.wait_request(h.operation("up"))
    h.wait_phase("up", "InProgress")
    uid = h.get("up")["metadata"]["uid"]
    h.server.pause(mode="refuse")
    h.dispatcher.succeed(req, "upgraded")
    wait_for("the result to wait for the server",
             lambda: (p := h.progress_store().load_all()[uid]).step == DONE and not p.written)
    h.server.resume()
    h.wait_phase("up", "Complete")
    assert h.condition("up")["reason"] == "Succeeded"
    wait_for("the Events too", lambda: "Completed" in h.event_reasons("up"))


def test_finished_operations_are_deleted_after_their_ttl(h):
    h.create("keep", "NodeReboot")
    h.create("ttl", "NodeReboot", ttl=0)
    h.create("host-ttl", "HostReboot", ttl=0)
    h.set_status("host-ttl", "Complete", "Succeeded", "rebooted by another controller")
    h.start()
    wait_for("ttl to be deleted", lambda: h.get("ttl") is None)
    h.wait_phase("keep", "Failed")
    h.settle()
    assert h.get("host-ttl") is not None  # another controller's
    (delete,) = h.agent_requests(verb="delete")
    assert delete.name == "ttl" and delete.code == 200


def test_ttl_waits_for_its_time(h):
    h.start()
    h.create("later", "NodeReboot", ttl=3600)
    h.wait_phase("later", "Failed")
    h.settle(4)
    assert h.get("later") is not None and not h.agent_requests(verb="delete")


def test_machine_gets_the_agent_version_annotation(h):
    create_machine(h)
    h.start()
    wait_for("the annotation", lambda: machine_annotations(h).get(mop.AGENT_VERSION_ANNOTATION))
    assert machine_annotations(h) == {mop.AGENT_VERSION_ANNOTATION: VERSION}


def test_a_missing_machine_is_not_an_error(h):
    h.start()
    wait_for("the annotation attempt", lambda: h.agent_requests(verb="patch"))
    h.create("r", "AgentReset")
    h.finish_reset("r")
    h.wait_phase("r", "Complete")
    assert [r.code for r in h.agent_requests(verb="patch")] == [404]


# -- ApiWriter alone -------------------------------------------------------------------------------------


class Writer:
    """An ApiWriter with the agent's credential, a cache the test fills, and a progress store."""

    def __init__(self, h: Harness):
        self.kube = kubeclient.build(h.cfg.kubeconfig)
        self.cache: dict[str, dict] = {}
        self.store = ProgressStore(h.cfg.state_dir)
        self.api = ApiWriter(lambda: self.kube, MACHINE, lambda: self.cache, self.store)

    def progress(self, op: dict, **kw) -> OperationProgress:
        p = OperationProgress(uid=mop.uid(op), name=mop.name(op), kind=mop.kind(op), **kw)
        self.store.save(p)
        return p


@pytest.fixture
def w(h):
    return Writer(h)


def test_a_conflict_is_read_again_and_written_over_the_fresh_copy(h, w):
    stale = h.create("x", "AgentReset")
    h.admin.request("PATCH", path("x"), body={"metadata": {"labels": {"team": "a"}}},
                    content_type="application/merge-patch+json")
    p = w.progress(stale)
    new = w.api.put_status(stale, mop.desired(mop.IN_PROGRESS, "InProgress", "resetting"), p)
    assert new and mop.phase(new) == "InProgress" and new["metadata"]["labels"] == {"team": "a"}
    assert [(r.verb, r.code) for r in h.agent_requests(name="x")] == [("update", 409), ("get", 200), ("update", 200)]
    assert w.api.stats["conflicts"] == 1 and w.api.stats["status_writes"] == 1
    assert w.cache[mop.uid(new)] == new  # the newest copy is kept


def test_nothing_is_written_when_the_server_already_says_it(h, w):
    h.create("x", "NodeReboot")
    op = h.set_status("x", "Failed", "UnsupportedOperation", "no")
    assert w.api.put_status(op, mop.desired(mop.FAILED, "UnsupportedOperation", "no")) == op
    assert h.agent_requests() == []


def test_a_deleted_operation_is_gone_not_an_error(h, w):
    op = h.create("x", "AgentReset")
    p = w.progress(op, want=mop.desired(mop.COMPLETE, "Succeeded", "done"))
    h.delete("x")
    assert w.api.flush_one(p) is False
    assert p.gone and not p.written and w.store.load_all()[p.uid].gone
    n = len(h.agent_requests())
    assert w.api.flush_one(p) is False and len(h.agent_requests()) == n  # gone: not asked again
    w.api.event(p, "Completed", "done")
    assert w.api.events == []  # nothing is said about what is gone


def test_the_same_name_with_another_uid_is_another_operation(h, w):
    old = h.create("x", "AgentReset")
    h.delete("x")
    h.create("x", "AgentReset")
    p = w.progress(old, want=mop.desired(mop.COMPLETE, "Succeeded", "done"))
    assert w.api.get_op(p) is None and p.gone
    assert w.api.flush_one(p) is False and h.get("x")["status"] == {"phase": "Pending"}  # the CRD's default only


def test_a_write_that_cannot_be_done_now_waits_and_is_done_later(h, w):
    op = h.create("x", "AgentReset")
    w.cache[mop.uid(op)] = op
    p = w.progress(op, want=mop.desired(mop.IN_PROGRESS, "InProgress", "resetting"))
    h.server.pause(mode="refuse")
    assert w.api.flush_one(p) is False and not w.api.api_ok()
    w.api.flush_status([p])  # while the backoff runs, nothing is tried
    h.server.resume()
    wait_for("the backoff to pass", w.api.api_ok)
    assert w.api.flush_one(p) is True and w.store.load_all()[p.uid].written
    assert h.phase("x") == "InProgress"


def test_pending_is_written_once_per_message(h, w):
    op = h.create("x", "AgentReset")
    w.api.write_pending(op, "waiting for AgentUpgrade a (in progress on worker-01) to finish")
    w.api.write_pending(op, "waiting for AgentUpgrade a (in progress on worker-01) to finish")
    w.api.write_pending(h.get("x"), "waiting for AgentReset b (in progress on worker-01) to finish")
    assert [r.code for r in h.agent_requests(verb="update")] == [200, 200]
    assert h.get("x")["status"]["message"] == "waiting for AgentReset b (in progress on worker-01) to finish"
    assert h.phase("x") == "Pending"


def test_ttl_deletes_only_finished_agent_operations_past_their_time_and_only_that_object(h, w):
    for name, kind, ttl, phase in (("done", "NodeReboot", 0, "Failed"), ("running", "AgentReset", 0, "InProgress"),
                                   ("later", "AgentReset", 3600, "Complete"), ("host", "HostReboot", 0, "Complete")):
        h.create(name, kind, ttl=ttl)
        op = h.set_status(name, phase, "Succeeded" if phase == "Complete" else phase, "x")
        w.cache[mop.uid(op)] = op
    # a copy of "again" from before it was deleted and created anew: the new one is not the one that expired
    stale = h.create("again", "AgentReset", ttl=0)
    stale = h.set_status("again", "Complete", "Succeeded", "x")
    h.delete("again")
    h.create("again", "AgentReset", ttl=0)
    w.cache[mop.uid(stale)] = stale
    w.api.expire_finished()
    assert sorted((r.name, r.code) for r in h.agent_requests(verb="delete")) == [("again", 409), ("done", 200)]
    assert h.get("done") is None and h.get("again") is not None
    assert all(h.get(n) is not None for n in ("running", "later", "host"))
    w.api.expire_finished()
    assert len(h.agent_requests(verb="delete")) == 2  # each asked once


def test_the_machine_is_annotated_once_and_its_generation_kept(h, w):
    create_machine(h)
    w.api.annotate_machine()
    w.api.annotate_machine()
    assert len(h.agent_requests(verb="patch")) == 1
    assert machine_annotations(h) == {mop.AGENT_VERSION_ANNOTATION: VERSION}
    assert w.api.machine_generation == h.admin.get(f"{kubeclient.MACHINE_PATH}/{MACHINE}")["metadata"]["generation"]


def test_a_missing_machine_is_asked_for_again_only_much_later(h, w):
    w.api.annotate_machine()
    w.api.annotate_machine()
    assert [(r.verb, r.code, r.user) for r in h.agent_requests()] == [("patch", 404, AGENT)]
    assert not w.api.machine_annotated and w.api.api_ok()  # not an outage: other writes go on
