"""Test traffic stays where it belongs: no socket of the test run in the machine's own network namespace has a
private-range address at either end.

The test servers (the API server, the release server) listen inside network namespaces the tests make
(testnet.py, the test hosts' own); the machine's own namespace talks to them only through `nsenter --net`. A
test that put a server on, or connected to, a private-range address of the machine's own namespace would show
up here: ``OwnNamespaceWatch`` samples, from a thread, every TCP and UDP socket of this process and of its
children (kubectl, openssl, ...) that belongs to the machine's own namespace, and keeps those with a 10/8,
172.16/12, 192.168/16 or fc00::/7 address. conftest.py runs one for the whole session and fails the test during
which one appeared.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]
TABLES = ("tcp", "tcp6", "udp", "udp6")


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6 prints the address as four 32-bit words in host (little-endian) order
    addr = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return addr.ipv4_mapped or addr


def private(addr) -> bool:
    return any(addr in net for net in PRIVATE if net.version == addr.version)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def socket_inodes(pids: list[int]) -> dict[str, int]:
    """inode -> pid of the sockets these processes hold (in whatever network namespace)."""
    found: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found[target[8:-1]] = pid
    return found


def private_sockets(children: bool = True, ns_pid: int | None = None) -> list[str]:
    """The sockets of this process (and of its children) that live in the network namespace of ns_pid (default:
    this process's, the machine's own) and have a private-range address at either end, described. A socket is
    listed in the tables of its own namespace only: one made in a test network, or by kubectl under
    nsenter --net, is not in the machine's."""
    mine = socket_inodes(_descendants(os.getpid()) if children else [os.getpid()])
    found = []
    for table in TABLES:
        try:
            lines = Path(f"/proc/{ns_pid or os.getpid()}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode not in mine:
                continue
            la, lp = local.split(":")
            ra, rp = remote.split(":")
            ends = (_address(la), _address(ra))
            if any(private(a) for a in ends):
                found.append(f"{table} {ends[0]}:{int(lp, 16)} -> {ends[1]}:{int(rp, 16)} "
                             f"(pid {mine[inode]}: {_comm(mine[inode])})")
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class OwnNamespaceWatch(threading.Thread):
    """Samples private_sockets() until stopped — this process every period, its children (a scan of /proc)
    every second time — and take() returns (and forgets) what it saw, after a last sample of both.

    Each sample costs the kernel a walk of its whole socket hash tables (a few ms, whatever the namespace
    holds): at ten a second in every test process that was a seventh of the suite's CPU. Half a second still
    sees every connection a test keeps open for longer, and take() samples once more as each test ends."""

    def __init__(self, period: float = 0.5):
        super().__init__(name="own-namespace-watch", daemon=True)
        self.period = period
        self.stopped = threading.Event()
        self._seen: list[str] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        n = 0
        while not self.stopped.wait(self.period):
            n += 1
            self.sample(children=n % 2 == 0)

    def sample(self, children: bool = True) -> None:
        try:
            found = private_sockets(children)
        except Exception as e:  # /proc changing under us: never let the watch die quietly
            found = [f"(the watch failed: {type(e).__name__}: {e})"]
        if found:
            with self._lock:
                self._seen += [f for f in found if f not in self._seen]

    def take(self) -> list[str]:
        self.sample()
        with self._lock:
            seen, self._seen = self._seen, []
        return seen

    def stop(self) -> None:
        self.stopped.set()
