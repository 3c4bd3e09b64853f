"""``unbounded-agent-reset-remove-machine-trees.service``, reset step 5: remove /var/lib/machines/kube1 and
kube2 — refuses while a machine runs, unmounts what is mounted inside first and never deletes through a
mount or a symlink."""

from __future__ import annotations

import os

from ...reasons import OpsError, Reason
from ..step import MACHINES, Item, Step

MACHINES_DIR = "/var/lib/machines"


class RemoveMachineTrees(Step):
    name, number, phase = "remove-machine-trees", 5, 1
    title = "remove the machines' root trees (never through a mount)"

    def plan(self, ctx):
        from .. import treeremove

        items = []
        for m in MACHINES:
            tree = f"{MACHINES_DIR}/{m}"
            real = ctx.p(tree)
            if not os.path.lexists(real):
                continue
            if not os.path.islink(real):
                for point in treeremove.mounts_at_or_below(real):
                    items.append(Item(f"mount {point}", "(the mounted data is not touched)", "unmount"))
            items.append(Item(f"machine tree {tree}", "(a symlink: only the link)" if os.path.islink(real) else ""))
        return items

    def apply(self, ctx, rec):
        from .. import machines, treeremove

        # Fail closed: never delete the root of a machine that runs, or that we cannot tell about.
        try:
            running = {s.name for s in machines.inspect(MACHINES) if s.running}
        except OpsError as e:
            rec.fail(None, OpsError(e.reason, f"not removing any machine tree: {e.message}"))
            return
        for m in MACHINES:
            tree = f"{MACHINES_DIR}/{m}"
            real = ctx.p(tree)
            if not os.path.lexists(real):
                rec.already_absent(f"machine tree {tree}")
                continue
            if m in running:
                rec.fail(f"machine tree {tree}", OpsError(
                    Reason.MACHINE_STILL_RUNNING, f"refusing to remove {tree}: machine {m} is still running"))
                continue
            try:
                if not os.path.islink(real):
                    for point in treeremove.unmount_below(real):
                        rec.did(f"mount {point}", "unmounted")
                treeremove.remove_tree(real)
            except OpsError as e:
                rec.fail(f"machine tree {tree}", e)
                continue
            except OSError as e:
                rec.fail(f"machine tree {tree}", OpsError(Reason.EXECUTION_FAILED, f"cannot remove {tree}: {e.strerror}"))
                continue
            rec.did(f"machine tree {tree}")


STEP = RemoveMachineTrees()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
