"""The agent's policy routing, through netlink (pyroute2): rules that look up, and routes in, the
agent's tables (within 51820–51899), for IPv4 and IPv6.

Everything works from an inventory of what exists: each rule or route found in an owned table is
deleted by sending its own dumped message back as a delete request, so exactly that entry goes
(rules that differ only in fwmark or priority are not confused). ``main``, ``local``, ``default``
and every other table are never touched. An inventory that cannot be read is an error
(INVENTORY_FAILED), never "nothing to do".

Which tables of the range are the agent's is the caller's to say (``tables``): wg-quick numbers its
tables from 51820 upward too, so an operator's ``wg0`` may own table 51820 (remove_routing.py decides).
A kernel booted with ``ipv6.disable=1`` has no IPv6 at all (no ``/proc/sys/net/ipv6``): its IPv6
inventory is empty, not an error. Such a kernel answers a dump for IPv6 with the entries of every family
it has, so every dumped entry is checked to be of the family asked for.
"""

import dataclasses
import os
import socket

from ..reasons import OpsError, Reason, describe_error
from .netlinks import rtnetlink

TABLE_FIRST, TABLE_LAST = 51820, 51899
FAMILIES: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
# rtm_type values worth naming in a description (linux/rtnetlink.h)
_ROUTE_TYPES = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
# Attributes the kernel reports but refuses (or ignores) in a request.
_READ_ONLY_ATTRS = {"RTA_CACHEINFO", "FRA_PROTOCOL_UNSPEC"}


def owned_table(table: int | None) -> bool:
    return table is not None and TABLE_FIRST <= table <= TABLE_LAST


IPV6_PROC = "/proc/sys/net/ipv6"


def families() -> dict[int, str]:
    """The address families this kernel routes: IPv4, and IPv6 unless it was disabled at boot (its sysctl
    directory is then missing, beside IPv4's). Where neither can be seen, nothing can be told: an error."""
    if os.path.isdir(IPV6_PROC):
        return dict(FAMILIES)
    if not os.path.isdir(os.path.join(os.path.dirname(IPV6_PROC), "ipv4")):
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot tell whether this kernel has IPv6: neither {IPV6_PROC} "
                                                "nor its IPv4 sibling can be seen")
    return {f: n for f, n in FAMILIES.items() if f != socket.AF_INET6}


@dataclasses.dataclass
class Entry:
    kind: str  # "rule" or "route"
    family: int
    table: int
    text: str  # human description, also the item name in reports
    oif: int | None = None  # output link index of a route, to tell which routes go with a removed link
    msg: object = dataclasses.field(default=None, repr=False, compare=False)  # the dumped netlink message

    def describe(self) -> str:
        return f"{self.kind} {self.text}"


def _table_of(msg, attr: str) -> int:
    # The header field holds only 8 bits (252 = "see the attribute") for tables above 255.
    t = msg.get_attr(attr)
    return t if t is not None else msg["table"]


def _ipr():
    return rtnetlink()[0]()


def inventory(link_names: dict[int, str] | None = None, tables=None) -> list[Entry]:
    """Rules pointing at, and routes inside, the given tables of the range (None: all of it), both families,
    in deletion order: rules first, so no packet is steered into a table while it is being emptied."""
    rules, routes = [], []

    def wanted(table: int | None) -> bool:
        return owned_table(table) and (tables is None or table in tables)

    try:
        with _ipr() as ipr:
            if link_names is None:
                link_names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
            for fam, fname in families().items():
                for m in ipr.get_rules(family=fam):
                    table = _table_of(m, "FRA_TABLE")
                    if m["family"] == fam and wanted(table):
                        rules.append(Entry("rule", fam, table, _rule_text(fname, table, m), msg=m))
                for m in ipr.route("dump", family=fam):
                    table = _table_of(m, "RTA_TABLE")
                    if m["family"] == fam and wanted(table):
                        oif = m.get_attr("RTA_OIF")
                        routes.append(Entry("route", fam, table, _route_text(fname, table, m, link_names), oif=oif, msg=m))
    except OpsError:
        raise
    except Exception as e:
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot list policy rules and routes over netlink: {describe_error(e)}") from None
    return rules + routes


def _rule_text(fname: str, table: int, m) -> str:
    parts = [fname]
    prio = m.get_attr("FRA_PRIORITY")
    parts.append(f"pref {prio if prio is not None else 0}")
    src, dst = m.get_attr("FRA_SRC"), m.get_attr("FRA_DST")
    parts.append(f"from {src}/{m['src_len']}" if src else "from all")
    if dst:
        parts.append(f"to {dst}/{m['dst_len']}")
    fwmark = m.get_attr("FRA_FWMARK")
    if fwmark:
        parts.append(f"fwmark {fwmark:#x}")
    for attr, word in (("FRA_IIFNAME", "iif"), ("FRA_OIFNAME", "oif")):
        if m.get_attr(attr):
            parts.append(f"{word} {m.get_attr(attr)}")
    parts.append(f"lookup {table}")
    return " ".join(parts)


def _route_text(fname: str, table: int, m, link_names: dict[int, str]) -> str:
    parts = [fname, f"table {table}"]
    rtype = _ROUTE_TYPES.get(m["type"])
    if rtype:
        parts.append(rtype)
    dst = m.get_attr("RTA_DST")
    parts.append(f"{dst}/{m['dst_len']}" if dst else "default")
    gw = m.get_attr("RTA_GATEWAY")
    if gw:
        parts.append(f"via {gw}")
    oif = m.get_attr("RTA_OIF")
    if oif is not None:
        parts.append(f"dev {link_names.get(oif, f'#{oif}')}")
    prio = m.get_attr("RTA_PRIORITY")
    if prio:
        parts.append(f"metric {prio}")
    return " ".join(parts)


def _clone(msg):
    """A fresh request message with the dumped message's header fields and attributes."""
    new = type(msg)()
    for name, *_ in type(msg).fields:
        new[name] = msg[name]
    new["attrs"] = [[a[0], a[1]] for a in msg["attrs"] if a[0] not in _READ_ONLY_ATTRS]
    return new


def remove(entry: Entry) -> None:
    """Delete one rule or route. An error counts as success only if a new inventory shows it gone."""
    _, netlink, rtnl = rtnetlink()
    msg_type = rtnl.RTM_DELRULE if entry.kind == "rule" else rtnl.RTM_DELROUTE
    try:
        with _ipr() as ipr:
            ipr.nlm_request(_clone(entry.msg), msg_type=msg_type, msg_flags=netlink.NLM_F_REQUEST | netlink.NLM_F_ACK)
        return
    except Exception as e:
        error = e
    if all(e.describe() != entry.describe() for e in inventory()):
        return
    raise OpsError(Reason.EXECUTION_FAILED, f"cannot delete {entry.describe()}: {describe_error(error)}")
