"""Leader election on a Lease (lib/unbounded_agent/fleet/lease.py) against the test API server, with the
controller's own RBAC, on clocks the tests move: never two leaders, whatever order things happen in."""

import pytest
from fleet_fakes import CONTROLLER_USER, LEASE, PRELOAD
from kube_apiserver import start_apiserver

from unbounded_agent.fleet.lease import Elector
from unbounded_agent.kube import client as kubeclient

DURATION, DEADLINE, RETRY = 15, 10.0, 2.0


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


@pytest.fixture
def server():
    s = start_apiserver(preload=PRELOAD)
    yield s
    s.stop()


@pytest.fixture
def make(server, tmp_path):
    kc = server.kubeconfig(tmp_path / "controller.kubeconfig", user=CONTROLLER_USER, groups=())

    def make(identity, clock, kube=None):
        k = kube or kubeclient.build(kc)
        return Elector(lambda: k, "unbounded-system", "unbounded-agent-fleet-controller", identity, DURATION,
                       DEADLINE, RETRY, clock=clock)
    return make


def lease(server) -> dict:
    """The Lease as the server stores it."""
    with server.lock:
        return server.objects["leases"][("unbounded-system", "unbounded-agent-fleet-controller")]


def test_one_holds_the_other_waits_while_it_renews(server, make):
    ca, cb = Clock(), Clock()
    a, b = make("a", ca), make("b", cb)
    assert a.try_acquire_or_renew() and a.held()
    assert lease(server)["spec"]["holderIdentity"] == "a"
    for _ in range(20):  # a renews every retry period; b keeps seeing a change and never takes over
        ca.advance(RETRY)
        cb.advance(RETRY)
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew() and not b.held()
    assert lease(server)["spec"]["leaseTransitions"] == 0


def test_a_silent_leader_stops_acting_before_another_may_take_over(server, make):
    ca, cb = Clock(), Clock()
    a, b = make("a", ca), make("b", cb)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b sees the lease change now
    acquired_at = lease(server)["spec"]["acquireTime"]
    # a is killed: it renews no more. Time passes on both clocks alike.
    steps = 0
    while not b.try_acquire_or_renew():
        assert not (a.held() and b.held())
        ca.advance(0.5)
        cb.advance(0.5)
        steps += 1
    assert steps * 0.5 >= DURATION  # not before leaseDurationSeconds since b last saw it change
    assert b.held() and not a.held()
    spec = lease(server)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("b", 1) and spec["acquireTime"] != acquired_at


def test_a_leader_that_finds_the_lease_taken_stops_at_once(server, make):
    ca, cb = Clock(), Clock()
    a, b = make("a", ca), make("b", cb)
    assert a.try_acquire_or_renew()
    b.try_acquire_or_renew()
    cb.advance(DURATION + 1)  # b's clock runs ahead (a stalled process, a paused VM): b takes over
    assert b.try_acquire_or_renew()
    ca.advance(RETRY)
    assert not a.try_acquire_or_renew() and not a.held()  # its renewal conflicts; the read shows b


def test_releasing_lets_a_standby_take_over_at_once(server, make):
    ca, cb = Clock(), Clock()
    a, b = make("a", ca), make("b", cb)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.held() and lease(server)["spec"]["holderIdentity"] == ""
    assert b.try_acquire_or_renew()  # no waiting for the duration


def test_two_candidates_creating_the_lease_at_once_make_one_leader(server, make, tmp_path):
    ca, cb = Clock(), Clock()
    a = make("a", ca)
    kb = kubeclient.build(server.kubeconfig(tmp_path / "b.kubeconfig", user=CONTROLLER_USER, groups=()))
    real = kb.request

    def request(method, path, *args, **kw):
        if method == "POST":  # a creates it between b's read (404) and b's create
            assert a.try_acquire_or_renew()
        return real(method, path, *args, **kw)

    kb.request = request
    b = make("b", cb, kube=kb)
    assert not b.try_acquire_or_renew() and not b.held()
    assert a.held() and lease(server)["spec"]["holderIdentity"] == "a"


def test_a_leader_renews_with_one_request(server, make):
    ca = Clock()
    a = make("a", ca)
    assert a.try_acquire_or_renew()
    before = server.count(user=CONTROLLER_USER)
    for _ in range(5):
        ca.advance(RETRY)
        assert a.try_acquire_or_renew()
    assert server.count(user=CONTROLLER_USER) - before == 5
    assert server.count(user=CONTROLLER_USER, verb="update", resource="leases") == 5


def test_timing_must_let_a_leader_stop_before_it_can_be_replaced(make):
    with pytest.raises(ValueError):
        Elector(lambda: None, "ns", "n", "a", duration=10, renew_deadline=10, retry_period=2)


def test_the_controllers_role_allows_the_lease_and_nothing_more(server):
    from kube_apiserver import User

    user = User(CONTROLLER_USER, [])
    allowed = [server.authorize(user, verb, "coordination.k8s.io", "leases", "", name, ns)[0] for verb, name, ns in (
        ("get", "unbounded-agent-fleet-controller", "unbounded-system"),
        ("update", "unbounded-agent-fleet-controller", "unbounded-system"),
        ("create", "", "unbounded-system"),
        ("update", "another-lease", "unbounded-system"),
        ("get", "unbounded-agent-fleet-controller", "kube-system"),
        ("delete", "unbounded-agent-fleet-controller", "unbounded-system"))]
    assert allowed == [True, True, True, False, False, False]
    assert LEASE.endswith("/namespaces/unbounded-system/leases/unbounded-agent-fleet-controller")
