"""``unbounded-agent-reset-remove-agent.service``, reset step 7 (its removals): stop the agent's other units
(recovery, bootstrap, any upgrade unit still at work) and remove the agent's files — its state, config, unit
files and, last, its binaries and links. The daemon keeps running (the ``unbounded-agent-reset-stop-daemon``
step stops it after the requester has reported): it runs from memory, and needs none of these files.

It runs only when steps 1–6 succeeded (its unit ``Requires=`` them). It checks everything it is to remove
before it removes anything (mounts inside, immutable files): a tree it cannot remove leaves the agent
whole. The config (with the kubeconfig) and the binaries go last: a daemon restarted meanwhile still starts
and reports (it follows the reset from the host's queue: kube/adoption.py). The toolset package
itself stays. ``<binDir>/unbounded-agent`` goes only when it is the agent's: a link to its slots, or the
agent's own binary — never an operator's own file of that name (binDir may be /usr/local/bin)."""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile

from ... import holdpoint
from ...reasons import OpsError, Reason, describe_error
from ..step import DEFAULT_CONFIG_DIR, UNIT_DIR, Item, Step, disable_unit, exists, lstat, plan_paths, remove_path, stop_unit

DAEMON_UNIT = "unbounded-agent-daemon.service"
RECOVERY_UNIT = "unbounded-agent-daemon-recovery.service"
BOOTSTRAP_UNIT = "unbounded-agent-bootstrap.service"
# The upgrade chain (unbounded-upgrade@, -stage@, -preflight@, -switch@, -probation): a unit still at work
# would put a binary back, so every running one is stopped first.
UPGRADE_UNITS = ("unbounded-upgrade@*.service", "unbounded-upgrade-*.service")
# Units of the agent that must not run (or start at boot) after a reset; the daemon's turn comes in
# stop-daemon. Their unit files in /lib/systemd/system belong to the toolset package and stay; copies in
# /etc/systemd/system (an upstream-style install, or an admin's override) and drop-in dirs are the agent's.
OTHER_UNITS = (RECOVERY_UNIT, BOOTSTRAP_UNIT)
AGENT_UNITS = (DAEMON_UNIT, *OTHER_UNITS)
UNIT_STOP_TIMEOUT = 120.0


def agent_unit_files() -> list[str]:
    out = []
    for unit in AGENT_UNITS:
        out += [f"{UNIT_DIR}/{unit}", f"{UNIT_DIR}/{unit}.d"]
    return out


def state_paths(ctx) -> list[str]:
    # Whole directories only when they are the agent's own by name: a stateDir set to /var/lib by mistake
    # must not take /var/lib with it. The bin dir goes with the state dir it is in (the default), never by
    # itself: it may be a shared one such as /usr/local/bin.
    return [d for d in ctx.state_dirs if "unbounded" in os.path.basename(d.rstrip("/"))]


def binary_paths(ctx) -> list[str]:
    from ... import layout

    paths = []
    for d in ctx.bin_dirs:
        real = ctx.p(d)
        if compat_is_ours(ctx.p(f"{d}/{layout.COMPAT}"), real):
            paths.append(f"{d}/{layout.COMPAT}")
        for name in (layout.CURRENT, layout.LAST_GOOD, *layout.SLOTS):
            paths.append(f"{d}/{name}")
        try:  # temporaries a crash left next to the slots (fsutil's hidden ".<name>.tmp-*")
            paths += sorted(f"{d}/{n}" for n in os.listdir(real) if n.startswith(".unbounded-agent") and ".tmp-" in n)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as e:
            raise OpsError(Reason.INVENTORY_FAILED, f"cannot list {d}: {e.strerror}") from None
    return paths


def agent_file_paths(ctx) -> list[str]:
    """Everything of the agent on disk, in the order it is removed: its state and unit files, then what a
    restarted daemon needs to start and report (its config with the kubeconfig, its binaries), then the
    state directories that held the bin dir."""
    first, holders = [], []
    for d in state_paths(ctx):
        inner = [b for b in ctx.bin_dirs if b.startswith(d.rstrip("/") + "/")]
        if not inner:
            first.append(d)
            continue
        # The bin dir is in this state dir (the default): its other entries go first, the dir itself last.
        keep = {b[len(d.rstrip("/")) + 1:].split("/", 1)[0] for b in inner}
        first += [f"{d.rstrip('/')}/{n}" for n in _entries(ctx, d) if n not in keep]
        holders.append(d)
    return list(dict.fromkeys([*first, *agent_unit_files(), *last_paths(ctx), *holders]))


def last_paths(ctx) -> list[str]:
    return [DEFAULT_CONFIG_DIR, *ctx.config_files, *binary_paths(ctx)]


def _entries(ctx, d: str) -> list[str]:
    try:
        return sorted(os.listdir(ctx.p(d)))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot list {d}: {e.strerror}") from None


def compat_is_ours(path: str, bin_dir: str) -> bool:
    """Whether <binDir>/unbounded-agent is the agent's: a link to one of its slots or links, or the agent's own
    binary (our zipapp, or a copy of a slot, as an upstream-style install leaves it)."""
    from ... import layout

    st = lstat(path)
    if st is None:
        return False
    ours = {layout.CURRENT, layout.LAST_GOOD, *layout.SLOTS}
    if stat.S_ISLNK(st.st_mode):
        return os.path.basename(os.readlink(path)) in ours
    if not stat.S_ISREG(st.st_mode):
        return False
    if _is_agent_zipapp(path):
        return True
    digest = _sha256(path)
    return any(_sha256(os.path.join(bin_dir, slot)) == digest for slot in layout.SLOTS
               if os.path.isfile(os.path.join(bin_dir, slot)))


def _is_agent_zipapp(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "unbounded_agent/version.py" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class RemoveAgent(Step):
    name, number, phase = "remove-agent", 7, 1
    title = "stop the agent's other units; remove its state, config, unit files and binaries (the daemon keeps running)"

    def _stoppable(self, ops) -> list[str]:
        out = [*ops.matching(UPGRADE_UNITS), *OTHER_UNITS]
        # A daemon with no process (waiting to be restarted, or crash-looping) cannot report anything: stopped
        # now, systemd does not start it again into files that are gone (recreating its state directory).
        if ops.running(DAEMON_UNIT) and not ops.reporting(DAEMON_UNIT):
            out.append(DAEMON_UNIT)
        return out

    def plan(self, ctx):
        items = []
        ops = ctx.units()
        for unit in self._stoppable(ops):
            if ops.running(unit):
                items.append(Item(f"running unit {unit}", action="stop"))
        for unit in OTHER_UNITS:
            if ops.enabled(unit):
                items.append(Item(f"enabled unit {unit}", action="disable"))
        items += plan_paths(ctx, agent_file_paths(ctx))
        return items

    def apply(self, ctx, rec):
        ops = ctx.units()
        self._stop_and_disable(ops, rec)
        if rec.failed:  # never delete the agent from under a unit that still runs it
            rec.note("not removing the agent's files while one of its units still runs")
            return
        paths = agent_file_paths(ctx)
        if not self._check(ctx, rec, paths):
            rec.note("removed none of the agent's files: the agent stays whole until the cause is fixed")
            return
        self._keep_for_report(ctx, rec)
        last = set(last_paths(ctx))
        for p in paths:
            if p in last and ctx.directory:
                holdpoint.hold(ctx.directory, "reset-remove-agent-last")  # tests: a restart of the daemon here
                last = set()
            if exists(ctx.p(p)):  # a path inside an already removed state dir is simply gone
                remove_path(ctx, rec, p)

    def _keep_for_report(self, ctx, rec) -> None:
        """Keep a copy of the config and credentials in the reset's directory (reporter_kit.py): should the daemon
        stop before it has reported, the reset is reported from it. Without the copy the reset still goes on:
        the daemon normally reports from memory."""
        from .. import reporter_kit

        if not ctx.directory or not rec.run_id:
            return
        try:
            rec.note(reporter_kit.hold(ctx.directory, rec.run_id, ctx.config_path, under=ctx.p))
        except (OSError, ValueError, OpsError) as e:
            rec.note(f"cannot keep the config and credentials for the report ({describe_error(e)}): if the daemon "
                     "stops before it reports, this reset is reported by the next agent installed here")

    def _stop_and_disable(self, ops, rec) -> None:
        for unit in self._stoppable(ops):
            stop_unit(ops, rec, unit, UNIT_STOP_TIMEOUT)
        for unit in OTHER_UNITS:
            disable_unit(ops, rec, unit)

    def _check(self, ctx, rec, paths) -> bool:
        """Unmount what is mounted inside the agent's directories and check every tree; False (with the
        failure recorded) when any of it cannot be removed."""
        from .. import treeremove

        for p in paths:
            try:
                for point in treeremove.prepare(ctx.p(p)):
                    rec.did(f"mount {point}", "unmounted")
            except OpsError as e:
                rec.fail(f"path {p}", e)
                return False
            except OSError as e:
                rec.fail(f"path {p}", OpsError(Reason.EXECUTION_FAILED, f"cannot check {p}: {e.strerror}"))
                return False
        return True


STEP = RemoveAgent()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
