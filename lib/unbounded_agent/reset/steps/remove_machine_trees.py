"""``unbounded-agent-reset-remove-machine-trees.service``, reset step 5: remove /var/lib/machines/kube1 and
kube2, and the disk images kube1.raw and kube2.raw — refuses while a machine runs, unmounts what is mounted
inside first and never deletes through a mount or a symlink.

/var/lib/machines itself may be a symlink (relocated to a bigger disk): it is followed and kept. The
machines' own entries never are: a symlink named kube1 (or kube1.raw) is removed as a link. A ``.raw`` image
named after kube1 or kube2 is what ``systemd-nspawn@kube1.service`` would boot when no directory of that name
exists, so it is the machine's too; only a regular file (or a link) of that name is removed."""

from __future__ import annotations

import stat

from ...reasons import OpsError, Reason
from ..step import MACHINES, Item, Step, lstat

MACHINES_DIR = "/var/lib/machines"


def machine_paths(m: str) -> list[tuple[str, str]]:
    """(what, host path) of everything in /var/lib/machines that is machine m's."""
    return [("machine tree", f"{MACHINES_DIR}/{m}"), ("machine image", f"{MACHINES_DIR}/{m}.raw")]


def _found(ctx, what: str, path: str):
    """The status of path when it is there and is the machine's (an image only as a file or a link)."""
    st = lstat(ctx.p(path))
    if st is None or (what == "machine image" and stat.S_ISDIR(st.st_mode)):
        return None
    return st


class RemoveMachineTrees(Step):
    name, number, phase = "remove-machine-trees", 5, 1
    title = "remove the machines' root trees and images (never through a mount)"

    def plan(self, ctx):
        from .. import treeremove

        items = []
        for m in MACHINES:
            for what, path in machine_paths(m):
                st = _found(ctx, what, path)
                if st is None:
                    continue
                link = stat.S_ISLNK(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    for point in treeremove.mounts_at_or_below(treeremove.locate(ctx.p(path))):
                        items.append(Item(f"mount {point}", "(the mounted data is not touched)", "unmount"))
                items.append(Item(f"{what} {path}", "(a symlink: only the link)" if link else ""))
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
            for what, path in machine_paths(m):
                real = ctx.p(path)
                try:
                    st = _found(ctx, what, path)
                except OpsError as e:
                    rec.fail(f"{what} {path}", e)
                    continue
                if st is None:
                    rec.already_absent(f"{what} {path}")
                    continue
                if m in running:
                    rec.fail(f"{what} {path}", OpsError(
                        Reason.MACHINE_STILL_RUNNING, f"refusing to remove {path}: machine {m} is still running"))
                    continue
                try:
                    if stat.S_ISDIR(st.st_mode):
                        for point in treeremove.unmount_below(real):
                            rec.did(f"mount {point}", "unmounted")
                    treeremove.remove_tree(real)
                except OpsError as e:
                    rec.fail(f"{what} {path}", e)
                    continue
                except OSError as e:
                    rec.fail(f"{what} {path}", OpsError(Reason.EXECUTION_FAILED, f"cannot remove {path}: {e.strerror}"))
                    continue
                rec.did(f"{what} {path}")


STEP = RemoveMachineTrees()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
