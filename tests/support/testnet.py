"""A network of the tests' own: a network namespace with a bridge that test hosts plug into, where the test
servers listen. The machine's own network namespace carries none of this traffic.

    net = TestNet.start()                    # a namespace held by a small process of ours, with bridge br0
    ip = net.plug(host)                      # a veth pair: "kube0" in the host, its peer on the bridge
    server = start_apiserver(host=net.gateway, tls=True, netns=net.ns)
    net.run(["kubectl", ...])                # a command of ours inside the namespace (nsenter --net)
    net.cut(host) / net.mend(host)           # the host's link down / up: a real partition, kubectl unaffected
    net.stop()

The test servers stay in the test process (tests pause them, partition them and read their request logs):
``in_netns`` makes a listening socket inside the namespace from a short-lived thread that entered it
(setns(2) moves one thread only); the socket keeps belonging to that namespace wherever it is served from.

The addresses (SUBNET) exist only inside namespaces the tests made: this one and the hosts'. Each test session
has its own namespace, so sessions running side by side never meet.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import subprocess
import threading
from pathlib import Path

SUBNET = "10.250.0"  # .1 is the namespace's own address (the servers), hosts get .2, .3, ...
PREFIX = 24
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns_path: str, fn):
    """fn() run in a thread that entered the network namespace at ns_path; its result (or its exception)."""
    out: dict = {}

    def run():
        fd = os.open(ns_path, os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({ns_path})")
            out["value"] = fn()
        except BaseException as e:  # handed to the caller
            out["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=run, name="in-netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TestNet:
    __test__ = False  # not a pytest test class

    def __init__(self):
        self.holder: subprocess.Popen | None = None
        self.ns = ""
        self.gateway = f"{SUBNET}.1"
        self.hosts: dict[str, tuple[str, str]] = {}  # host name -> (outer link, address)
        self._numbers = itertools.count(2)

    @classmethod
    def start(cls) -> TestNet:
        net = cls()
        # The namespace lives as long as this process holds it (and dies with the test process).
        net.holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"], preexec_fn=_die_with_parent,
                                      stdin=subprocess.DEVNULL)
        net.ns = f"/proc/{net.holder.pid}/ns/net"
        for _ in range(100):  # until unshare has made the namespace and exec'd sleep
            if os.path.exists(net.ns) and os.readlink(net.ns) != os.readlink("/proc/self/ns/net") and \
                    Path(f"/proc/{net.holder.pid}/comm").read_text().strip() == "sleep":
                break
            threading.Event().wait(0.02)
        else:
            net.stop()
            raise RuntimeError("the test network namespace did not come up")
        net.ip("link", "set", "lo", "up")
        net.ip("link", "add", "br0", "type", "bridge")
        net.ip("addr", "add", f"{net.gateway}/{PREFIX}", "dev", "br0")
        net.ip("link", "set", "br0", "up")
        return net

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        """A command inside the namespace (only its network: files and everything else are this machine's)."""
        return subprocess.run(["nsenter", f"--net={self.ns}", "--", *map(str, args)], **kw)

    def command(self, args: list[str]) -> list[str]:
        """args as a command line that runs inside the namespace (for Popen)."""
        return ["nsenter", f"--net={self.ns}", "--", *map(str, args)]

    def ip(self, *args: str) -> None:
        self.run(["ip", *args], check=True, capture_output=True, text=True)

    def plug(self, host, inner: str = "kube0") -> str:
        """A link from the bridge into host's network namespace (named inner there); the host's address."""
        n = next(self._numbers)
        outer, address = f"vh{n}", f"{SUBNET}.{n}"
        self.ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", str(host.init_pid))
        self.ip("link", "set", outer, "master", "br0")
        self.ip("link", "set", outer, "up")
        host.run(["ip", "addr", "add", f"{address}/{PREFIX}", "dev", inner])
        host.run(["ip", "link", "set", inner, "up"])
        self.hosts[host.name] = (outer, address)
        return address

    def cut(self, host) -> None:
        """The host loses the network (its peer link goes down: no carrier, packets go nowhere)."""
        self.ip("link", "set", self.hosts[host.name][0], "down")

    def mend(self, host) -> None:
        self.ip("link", "set", self.hosts[host.name][0], "up")

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.holder.wait(10)
        self.holder = None
