"""``unbounded-agent-reset-remove-routing.service``, reset step 6: delete the policy rules that use, and
flush, the agent's routing tables (IPv4 and IPv6), from an inventory of what exists.

The agent's tables are those its WireGuard links go with: table N for link wg<N> (51820-51899) — the
links there now, and those remove-links recorded in the checkpoint before deleting them. A table of the
range without such a link is left alone: wg-quick numbers its tables (and fwmarks) from 51820 upward, so
an operator's ``wg0`` may own table 51820, and its rules and routes must survive a reset. With --all-wg
(the docs' broad form, which also removes every wg<N> link) the whole range is the agent's."""

from __future__ import annotations

from ..step import Item, Step


def agent_tables(ctx) -> set[int] | None:
    """The tables this reset flushes; None means the whole range 51820-51899."""
    from .. import netlinks

    if ctx.all_wg:
        return None
    return set(ctx.tables) | {t for t in (netlinks.wg_table(l.name) for l in netlinks.list_links()) if t is not None}


class RemoveRouting(Step):
    name, number, phase = "remove-routing", 6, 1
    title = "remove the agent's policy rules and flush its routing tables (those of its wg links; IPv4 and IPv6)"

    def plan(self, ctx):
        from .. import routing

        return [Item(e.describe()) for e in routing.inventory(tables=agent_tables(ctx))]

    def apply(self, ctx, rec):
        from ...reasons import OpsError
        from .. import routing

        tables = agent_tables(ctx)
        everything = routing.inventory()
        for entry in everything:
            if tables is not None and entry.table not in tables:
                continue
            try:
                routing.remove(entry)
                rec.did(entry.describe())
            except OpsError as e:
                rec.fail(entry.describe(), e)
        kept = sorted({e.table for e in everything if tables is not None and e.table not in tables})
        for table in kept:
            rec.note(f"left table {table} alone: the agent has no link wg{table} (an operator's wg-quick tunnel "
                     "may own it); `unbounded-agent reset --all-wg` takes the whole range")


STEP = RemoveRouting()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
