"""The Events the watcher tells each operation's story with (kube/events.py): written once the server is back,
aggregated into one Event with a count when they repeat, and kept on disk across a restart — through ApiWriter,
against the real test API server."""

import pytest
from watcher_fakes import MACHINE, Harness, wait_for

from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import mop
from unbounded_agent.kube.events import MAX_PENDING
from unbounded_agent.kube.progress import OperationProgress, ProgressStore
from unbounded_agent.kube.status import ApiWriter


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


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


def test_events_wait_out_an_outage_and_a_retried_create_does_not_block_the_rest(h, w):
    op = h.create("x", "AgentReset")
    w.cache[mop.uid(op)] = op
    p = w.progress(op)
    w.api.event(p, "Accepted", "accepted")
    h.server.pause(mode="refuse")
    w.api.flush_events()
    assert len(w.api.events) == 1 and not w.api.api_ok()
    h.server.resume()
    wait_for("the backoff to pass", w.api.api_ok)
    # the create arrived once already (its answer was lost): the retry is a 409, and counts as written
    h.admin.request("POST", "/api/v1/namespaces/default/events", body=w.api.events[0]["event"],
                    content_type="application/json")
    w.api.event(p, "ResetStarted", "queued")
    w.api.flush_events()
    assert w.api.events == []
    assert [e["reason"] for e in h.events("x")] == ["Accepted", "ResetStarted"]
    assert [r.code for r in h.agent_requests(verb="create")] == [409, 201]
    ev = h.events("x")[0]
    assert ev["involvedObject"]["uid"] == p.uid and ev["source"] == {"component": "unbounded-agent", "host": MACHINE}


def test_repeated_events_aggregate_into_one_with_a_count(h, w):
    op = h.create("x", "AgentReset")
    w.cache[mop.uid(op)] = op
    p = w.progress(op)
    w.api.event(p, "StatusRefused", "no")
    w.api.event(p, "StatusRefused", "no")  # still waiting: counted into the same one
    w.api.flush_events()
    w.api.event(p, "StatusRefused", "no")  # already written: its count is bumped (a patch)
    w.api.event(p, "StatusRefused", "other")  # another message is another Event
    w.api.flush_events()
    evs = [e for e in h.events("x") if e["reason"] == "StatusRefused"]
    assert sorted((e["message"], e["count"]) for e in evs) == [("no", 3), ("other", 1)]
    assert [r.verb for r in h.agent_requests(resource="events")] == ["create", "patch", "create"]
    first = next(e for e in evs if e["message"] == "no")
    assert first["lastTimestamp"] >= first["firstTimestamp"]


def test_events_waiting_at_a_restart_are_written_after_it(h, w):
    op = h.create("x", "AgentReset")
    w.cache[mop.uid(op)] = op
    p = w.progress(op)
    w.api.event(p, "Accepted", "accepted")
    w.api.flush_events()
    h.server.pause(mode="503")
    w.api.event(p, "ResetStarted", "queued")
    w.api.event(p, "Accepted", "accepted")
    w.api.flush_events()
    assert len(w.api.events) == 2
    h.server.resume()
    again = Writer(h)  # a new daemon: only the files are left
    again.cache[mop.uid(op)] = op
    assert [i["event"]["reason"] for i in again.api.events] == ["ResetStarted", "Accepted"]
    again.api.flush_events()
    assert sorted((e["reason"], e["count"]) for e in h.events("x")) == [("Accepted", 2), ("ResetStarted", 1)]


def test_events_waiting_are_capped(h, w):
    p = w.progress(h.create("x", "AgentReset"))
    for i in range(MAX_PENDING + 5):
        w.api.event(p, "ResetStep", f"step {i}")
    assert len(w.api.events) == MAX_PENDING
