"""List and watch (kube/listwatch.py) against the real test API server, with the agent's own credential:
its machine only, resuming watches where they ended, relisting on 410 Gone, the field selector fallback
of servers before 1.31, backoff that never busy-loops, and a thread that never dies."""

import queue
import threading
import time

import pytest
from watcher_fakes import AGENT, MACHINE, Harness, wait_for

from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import mop
from unbounded_agent.kube.client import Unavailable
from unbounded_agent.kube.listwatch import BACKOFF_MAX, Backoff, ListWatch, rv_newer


class Feed:
    """A ListWatch for MACHINE with the agent's credential, and everything it fed."""

    def __init__(self, h: Harness, client=None, watch_timeout=(1, 1)):
        self.h = h
        self.out: queue.Queue = queue.Queue()
        self.items: list[tuple] = []
        self.stop = threading.Event()
        kube = kubeclient.build(h.cfg.kubeconfig)
        self.lw = ListWatch(client or (lambda: kube), MACHINE, self.out, self.stop, watch_timeout)

    def __enter__(self):
        self.lw.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.lw.join(10)
        assert not self.lw.is_alive()

    def fed(self) -> list[tuple]:
        while True:
            try:
                self.items.append(self.out.get_nowait())
            except queue.Empty:
                return self.items

    def syncs(self) -> list[list[str]]:
        return [sorted(mop.name(o) for o in item[1]) for item in self.fed() if item[0] == "sync"]

    def events(self) -> list[tuple[str, str]]:
        return [(item[1], mop.name(item[2])) for item in self.fed() if item[0] == "event"]

    def wait_event(self, kind: str, name: str) -> None:
        wait_for(f"{kind} {name}", lambda: (kind, name) in self.events())


@pytest.fixture
def h(tmp_path):
    with Harness(tmp_path) as h:
        yield h


def agent_requests(h, **kw):
    return h.server.find_requests(user=AGENT, **kw)


# -- pure ------------------------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_is_capped_and_resets():
    b = Backoff()
    delays = [b.next() for _ in range(12)]
    for n, d in enumerate(delays[:6]):
        assert 0.5 * 2 ** n * 0.8 <= d <= 0.5 * 2 ** n * 1.2
    assert all(d <= BACKOFF_MAX * 1.2 for d in delays) and delays[-1] >= BACKOFF_MAX * 0.8
    b.reset()
    assert b.next() <= 0.5 * 1.2


def test_resource_versions_compare_as_numbers_when_they_are():
    def at(rv):
        return {"metadata": {"resourceVersion": rv}}

    assert rv_newer(at("10"), at("9")) and rv_newer(at("9"), at("9")) and not rv_newer(at("9"), at("10"))
    assert rv_newer(at("10"), None)
    assert rv_newer(at("abc"), at("10"))  # opaque: the newest seen wins


# -- against the server ----------------------------------------------------------------------------------


def test_lists_and_watches_only_this_machines_operations(h):
    h.create("mine", "AgentReset")
    h.create("other", "AgentReset", machine="worker-02")
    with Feed(h) as f:
        wait_for("the list", f.syncs)
        assert f.syncs()[0] == ["mine"]
        h.create("mine-2", "AgentUpgrade", downloadURL="https://h.example.com/a.tar.gz")
        h.create("other-2", "AgentReset", machine="worker-02")
        f.wait_event("ADDED", "mine-2")
        h.set_status("mine-2", "Pending", "Pending", "waiting")
        f.wait_event("MODIFIED", "mine-2")
        h.delete("mine-2")
        f.wait_event("DELETED", "mine-2")
    assert all(name.startswith("mine") for _, name in f.events())
    q = [r.query for r in agent_requests(h) if r.verb in ("list", "watch")]
    assert q and all(x.get("fieldSelector") == f"spec.machineRef={MACHINE}" for x in q)


def test_watch_resumes_from_the_last_resource_version_without_relisting(h):
    with Feed(h) as f:  # the server ends each watch after a second
        wait_for("three watches", lambda: len(agent_requests(h, verb="watch")) >= 3)
        h.create("a", "AgentReset")
        f.wait_event("ADDED", "a")
        wait_for("two more watches", lambda: len(agent_requests(h, verb="watch")) >= 5)
    watches = agent_requests(h, verb="watch")
    assert len(agent_requests(h, verb="list")) == 1 and len(f.syncs()) == 1
    rvs = [int(r.query["resourceVersion"]) for r in watches]
    assert rvs == sorted(rvs) and rvs[-1] > rvs[0]  # each watch starts where the last one ended
    assert all(r.query.get("allowWatchBookmarks") == "true" for r in watches)
    assert f.lw.relists_410 == 0


def test_410_gone_relists_and_finds_what_it_missed(h):
    with Feed(h) as f:
        wait_for("the first watch", lambda: agent_requests(h, verb="watch"))
        h.create("elsewhere", "AgentReset", machine="worker-02")  # moves the resourceVersion, unseen by the agent
        h.server.compact()  # the agent's resourceVersion has left the window
        wait_for("a relist", lambda: f.lw.relists_410 >= 1)
        wait_for("the second list", lambda: len(f.syncs()) >= 2)
        h.create("after", "AgentReset")
        f.wait_event("ADDED", "after")


def test_field_selector_fallback_filters_here_and_says_so_once(tmp_path, capfd):
    with Harness(tmp_path, version="1.30.2") as h:  # a 1.30 server ignores selectableFields
        h.create("other", "AgentReset", machine="worker-02")
        h.create("mine", "AgentReset")
        with Feed(h) as f:
            wait_for("the list", f.syncs)
            assert f.syncs()[0] == ["mine"]  # filtered here
            h.create("mine-2", "AgentReset")
            f.wait_event("ADDED", "mine-2")
            wait_for("more watches", lambda: len(agent_requests(h, verb="watch")) >= 3)
        assert f.lw.client_side
        lists = agent_requests(h, verb="list")
        assert lists[0].code == 400 and "fieldSelector" in lists[0].query
        assert lists[1].code == 200 and "fieldSelector" not in lists[1].query
        assert all("fieldSelector" not in r.query for r in agent_requests(h, verb="watch"))
    err = capfd.readouterr().err
    assert err.count("cannot select MachineOperations by spec.machineRef") == 1


def test_no_busy_loop_while_the_api_server_fails(h):
    with Feed(h) as f:
        wait_for("the first list", f.syncs)
        h.server.clear_requests()
        h.server.pause(mode="503")
        time.sleep(3)
        h.server.resume()
        # exponential backoff from 0.5 s: a handful of attempts in 3 s, not hundreds
        assert len(agent_requests(h)) < 15
        assert any(item[0] == "unavailable" and "503" in item[1] for item in f.fed())


def test_an_unreachable_server_is_said_and_retried(h):
    h.server.pause(mode="refuse")
    with Feed(h) as f:
        wait_for("unavailable", lambda: any(item[0] == "unavailable" for item in f.fed()))
        assert not f.syncs()
        h.server.resume()
        wait_for("the list", f.syncs)


def test_the_thread_survives_a_client_that_cannot_be_built_or_fails_unexpectedly(h):
    kube = kubeclient.build(h.cfg.kubeconfig)
    calls = []

    def client():
        calls.append(1)
        if len(calls) == 1:
            raise Unavailable("cannot load the kubeconfig")
        if len(calls) == 2:
            raise RuntimeError("a surprise of the client library")
        return kube

    with Feed(h, client=client) as f:
        wait_for("the list", f.syncs)
    assert len(calls) >= 3
