"""``unbounded-agent-reset-remove-links.service``, reset step 2: remove the agent's links (wg51820-wg51899,
geneve0, vxlan0, ipip0, unbounded0, cbr0; every wg<N> only if the reset was asked for with --all-wg).

Before a link wg<N> goes, the checkpoint records table N as the agent's: the routing step (6) flushes only
the tables of the agent's links, and once the links are gone nothing else would say which those were."""

from __future__ import annotations

from pathlib import Path

from ..step import Item, Step


class RemoveLinks(Step):
    name, number, phase = "remove-links", 2, 1
    title = "remove the agent's network links"

    def plan(self, ctx):
        from .. import netlinks

        return [Item(f"link {l.name}", f"({l.kind})" if l.kind else "") for l in netlinks.agent_links(ctx.all_wg)]

    def apply(self, ctx, rec):
        from ...reasons import OpsError
        from .. import netlinks
        from ..reports import remember_tables

        links = netlinks.agent_links(ctx.all_wg)
        present = {l.name for l in links}
        for name in netlinks.FIXED_LINKS:
            if name not in present:
                rec.already_absent(f"link {name}")
        tables = sorted(t for t in (netlinks.wg_table(l.name) for l in links) if t is not None)
        if tables:
            remember_tables(tables, Path(ctx.directory) if ctx.directory else None)
            rec.note(f"the agent's routing tables (of its wg links): {', '.join(map(str, tables))}")
        for link in links:
            try:
                netlinks.remove(link)
                rec.did(f"link {link.name}")
            except OpsError as e:
                rec.fail(f"link {link.name}", e)


STEP = RemoveLinks()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
