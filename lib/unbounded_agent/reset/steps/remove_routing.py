"""``unbounded-agent-reset-remove-routing.service``, reset step 6: delete the policy rules that use, and
flush, the routing tables 51820-51899 (IPv4 and IPv6), from an inventory of what exists."""

from __future__ import annotations

from ..step import Item, Step


class RemoveRouting(Step):
    name, number, phase = "remove-routing", 6, 1
    title = "remove the agent's policy rules and flush its routing tables (51820-51899, IPv4 and IPv6)"

    def plan(self, ctx):
        from .. import routing

        return [Item(e.describe()) for e in routing.inventory()]

    def apply(self, ctx, rec):
        from ...reasons import OpsError
        from .. import routing

        for entry in routing.inventory():
            try:
                routing.remove(entry)
                rec.did(entry.describe())
            except OpsError as e:
                rec.fail(entry.describe(), e)


STEP = RemoveRouting()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
