"""The check that test traffic stays in the namespaces the tests make (tests/support/netwatch.py) sees what it
must: a socket of the test run with a private-range address in the namespace it examines — shown here on a
test network's namespace, so that this test itself never puts such an address in the machine's own — and
nothing on loopback."""

import os
import socket

import pytest
from netwatch import private_sockets
from testnet import TestNet, in_netns


def test_loopback_is_not_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert private_sockets() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_a_socket_on_a_private_address_is_reported_in_its_own_namespace_only():
    net = TestNet.start()
    try:
        inside = in_netns(net.ns, socket.socket)
        with inside:
            inside.bind((net.gateway, 0))
            inside.listen()
            found = private_sockets(ns_pid=net.holder.pid)
            assert len(found) == 1 and f"{net.gateway}:{inside.getsockname()[1]}" in found[0]
            assert f"pid {os.getpid()}" in found[0]
            assert private_sockets() == []  # not in the machine's own namespace: where it belongs
    finally:
        net.stop()
