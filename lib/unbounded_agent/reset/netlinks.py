"""The agent's network links, through netlink (pyroute2): which exist, which are the agent's, removal.

Ownership is by exact name only, never by pattern guesses: the agent's WireGuard links are
``wg51820``…``wg51899`` (one per owned routing table), plus exactly ``geneve0``, ``vxlan0``,
``ipip0``, ``unbounded0`` and ``cbr0``. An operator's own ``wg0`` survives unless the caller asks for
the broad form (``all_wg``), which takes every ``wg<digits>`` link — still not ``wgx`` or ``wg-office``.
"""

import dataclasses
import re

from ..reasons import OpsError, Reason, describe_error

FIXED_LINKS = ("geneve0", "vxlan0", "ipip0", "unbounded0", "cbr0")
WG_FIRST, WG_LAST = 51820, 51899  # the same range as the agent's routing tables
_WG_NUMBERED = re.compile(r"wg(0|[1-9][0-9]*)")  # no leading zeros: "wg051820" is not wg51820


@dataclasses.dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND (wireguard, bridge, vxlan, ...); None for plain devices

    def describe(self) -> str:
        return f"link {self.name}" + (f" ({self.kind})" if self.kind else "")


def is_agent_link(name: str, all_wg: bool = False) -> bool:
    if name in FIXED_LINKS:
        return True
    m = _WG_NUMBERED.fullmatch(name)
    if not m:
        return False
    return all_wg or WG_FIRST <= int(m.group(1)) <= WG_LAST


def wg_table(name: str) -> int | None:
    """The routing table the agent's WireGuard link of this name goes with (wg51833 -> 51833), else None."""
    m = _WG_NUMBERED.fullmatch(name)
    return int(m.group(1)) if m and WG_FIRST <= int(m.group(1)) <= WG_LAST else None


def rtnetlink():
    """pyroute2's IPRoute class and its netlink and rtnl constant modules, imported without running
    pyroute2/__init__.py where it has not run yet: that reads the entry points of every installed distribution
    and imports each module pyroute2 lists there (NDB, IPDB, nftables, ethtool, ...), twice the modules and
    about half the start of a step that reads the links, none of it used here. A bare package module stands in
    while the three load, then goes: a later ``import pyroute2`` runs it whole. A pyroute2 whose modules need
    it gets it."""
    import importlib
    import importlib.util
    import sys

    names = ("pyroute2.iproute.linux", "pyroute2.netlink", "pyroute2.netlink.rtnl")
    spec = importlib.util.find_spec("pyroute2") if "pyroute2" not in sys.modules else None
    if spec is not None and spec.submodule_search_locations:
        stub = sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
        try:
            linux, netlink, rtnl = (importlib.import_module(n) for n in names)
            return linux.IPRoute, netlink, rtnl
        except ImportError:  # loaded again below, with the package's own code first
            for name in [m for m in sys.modules if m.startswith("pyroute2.")]:
                del sys.modules[name]
        finally:
            if sys.modules.get("pyroute2") is stub:
                del sys.modules["pyroute2"]
    linux, netlink, rtnl = (importlib.import_module(n) for n in names)
    return linux.IPRoute, netlink, rtnl


def _ipr():
    return rtnetlink()[0]()


def list_links() -> list[Link]:
    """Every link in this network namespace. Fails closed: an unreadable inventory raises
    INVENTORY_FAILED rather than returning a partial or empty list."""
    try:
        with _ipr() as ipr:
            msgs = ipr.get_links()
    except Exception as e:  # NetlinkError, OSError (e.g. AF_NETLINK not allowed), pyroute2 parse errors
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot list network links over netlink: {describe_error(e)}") from None
    links = []
    for m in msgs:
        info = m.get_attr("IFLA_LINKINFO")
        links.append(Link(m["index"], m.get_attr("IFLA_IFNAME"), info.get_attr("IFLA_INFO_KIND") if info else None))
    return links


def agent_links(all_wg: bool = False) -> list[Link]:
    return sorted((l for l in list_links() if is_agent_link(l.name, all_wg)), key=lambda l: l.name)


def remove(link: Link) -> None:
    """Delete one link. A delete error counts as success only if the link is verifiably gone
    (e.g. deleting a veth end already took its peer with it)."""
    try:
        with _ipr() as ipr:
            ipr.link("del", index=link.index)
        return
    except Exception as e:
        error = e
    if all(l.name != link.name for l in list_links()):
        return
    raise OpsError(Reason.EXECUTION_FAILED, f"cannot delete link {link.name}: {describe_error(error)}")
