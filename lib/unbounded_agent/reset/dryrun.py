"""``unbounded-agent reset --dry-run``: every step's plan, in order, changing nothing.

Routes through a link that remove-links deletes disappear with that link (the kernel drops them), so the
routing step lists them as ``goes_with`` rather than as its own removals. A step whose inventory fails
shows its error: the real step would fail closed.
"""

from __future__ import annotations

from ..reasons import OpsError, Reason, describe_error
from .step import Context, Item


def dry_run(ctx: Context) -> list[dict]:
    from .steps import work_steps

    out: list[dict] = []
    links_removed: set[str] = set()
    for step in work_steps():
        entry = {"step": step.name, "number": step.number, "phase": step.phase, "title": step.title}
        try:
            items = _plan_routing_after_links(ctx, links_removed) if step.name == "remove-routing" else step.plan(ctx)
        except OpsError as e:
            entry.update(items=[], goes_with=[], error=str(e), reason=e.reason.value)
            out.append(entry)
            continue
        except Exception as e:  # e.g. systemd unreachable: report, do not crash the dry run
            entry.update(items=[], goes_with=[], error=f"cannot inventory: {describe_error(e)}",
                         reason=Reason.INVENTORY_FAILED.value)
            out.append(entry)
            continue
        if step.name == "remove-links":
            links_removed = {i.what.split(" ", 1)[1] for i in items}
        entry["items"] = [{"what": i.what, "note": i.note, "action": i.action} for i in items if not i.goes_with]
        entry["goes_with"] = [{"what": i.what, "note": i.note, "goes_with": i.goes_with} for i in items if i.goes_with]
        out.append(entry)
    return out


def _plan_routing_after_links(ctx: Context, links_removed: set[str]) -> list[Item]:
    from . import netlinks, routing
    from .steps.remove_routing import agent_tables

    names = {l.index: l.name for l in netlinks.list_links()}
    items = []
    for e in routing.inventory(names, tables=agent_tables(ctx)):
        dev = names.get(e.oif) if e.oif is not None else None
        items.append(Item(e.describe(), goes_with=f"link {dev}" if dev in links_removed else None))
    return items
