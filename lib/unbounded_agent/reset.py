"""AgentReset on the host: the ordered reset steps, their checkpoint and their reports (DESIGN.md §5).

Each step is a named task with two halves:
- ``plan(ctx)`` inventories what exists now that the step would stop or remove (nothing is changed;
  `unbounded-agent reset --dry-run` prints exactly these lists), and
- ``apply(ctx, rec)`` does it, recording per item what was removed, what was already absent and
  what failed. After ``apply`` the runner calls ``plan`` again: anything still there fails the step,
  so "succeeded" always means "verified gone".

Every step runs as its own oneshot unit (units/unbounded-agent-reset-*.service, executables
bin/unbounded-reset-*), under the host lock shared with bootstrap, and writes its report as JSON to
``/var/lib/unbounded-agent-reset/reports/`` (atomically) for the CLI and the watcher to read back.

Progress lives in ``/var/lib/unbounded-agent-reset/checkpoint.json`` ("resetting"): written by the
``begin`` unit before any step, removed by the ``verify`` unit last, and only when every step of the
run succeeded and a full re-inventory finds nothing left. It also records where the agent's files
were (bin dir, state dir, config) when the reset began, because step 7 deletes the config that said
so: a reset interrupted after that point still knows what to clean when it runs again.

The reset's own directory is the toolset's, not the agent's: it is not removed by the reset, so the
last reset's reports can still be read afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import time
import traceback
from pathlib import Path

from . import fsutil, log, state
from .reasons import OpsError, Reason, describe_error

RESET_DIR = Path("/var/lib/unbounded-agent-reset")
CHECKPOINT = "checkpoint.json"
REQUEST = "request.json"  # written by the CLI / watcher before starting the units: run id and flags
REPORTS = "reports"
DEFAULT_CONFIG_DIR = "/etc/unbounded/agent"

MACHINES = ("kube1", "kube2")  # both are always cleaned, whatever the config says
WIREGUARD_KEYS = ("/etc/wireguard/server.priv", "/etc/wireguard/server.pub")
NSPAWN_DIR = "/etc/systemd/nspawn"
UNIT_DIR = "/etc/systemd/system"
MACHINES_DIR = "/var/lib/machines"

DAEMON_UNIT = "unbounded-agent-daemon.service"
RECOVERY_UNIT = "unbounded-agent-daemon-recovery.service"
BOOTSTRAP_UNIT = "unbounded-agent-bootstrap.service"
# The upgrade chain (unbounded-upgrade@, -stage@, -preflight@, -switch@, -probation, -resume):
# an upgrade in flight would put a binary back, so every running one is stopped first.
UPGRADE_UNITS = ("unbounded-upgrade@*.service", "unbounded-upgrade-*.service")
UPGRADE_RESUME_UNIT = "unbounded-upgrade-resume.service"
# Units of the agent that must not run (or start at boot) after a reset. Their unit files in
# /lib/systemd/system belong to the toolset package and stay; copies in /etc/systemd/system
# (an upstream-style install, or an admin's override) and drop-in dirs are the agent's and go.
AGENT_UNITS = (DAEMON_UNIT, RECOVERY_UNIT, BOOTSTRAP_UNIT, UPGRADE_RESUME_UNIT)
DAEMON_STOP_TIMEOUT = 120.0  # the daemon's own TimeoutStopSec (90 s default) ends it before this


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


# -- context: where things are ---------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What a step needs to know about the host. ``root`` prefixes every file path (fast tests run
    the file steps against a temporary directory; on a host it is "/")."""

    machine_name: str
    bin_dirs: tuple[str, ...]
    state_dirs: tuple[str, ...]
    config_files: tuple[str, ...] = ()  # config files outside DEFAULT_CONFIG_DIR
    all_wg: bool = False
    graceful_timeout: float = 30.0
    terminate_timeout: float = 15.0
    root: str = "/"
    reset_dir: str = str(RESET_DIR)
    systemd: object = None  # SystemdOps (or a fake in fast tests); None = the real one, made lazily

    def p(self, path: str) -> str:
        """The path of host path ``path`` under ``root``."""
        return path if self.root == "/" else os.path.join(self.root, path.lstrip("/"))

    def units(self) -> "SystemdOps":
        if self.systemd is None:
            self.systemd = SystemdOps()
        return self.systemd


def recorded_paths(cfg_loader=None) -> dict:
    """Where the agent's files are, from its config (what ``begin`` records in the checkpoint).
    A broken config must not make the host un-resettable: fall back to the defaults and say so."""
    from . import config

    loader = cfg_loader or config.load
    rec = {"config_path": config.config_path()}
    try:
        cfg = loader()
        rec.update(machine_name=cfg.machine_name, bin_dir=str(cfg.bin_dir), state_dir=str(cfg.state_dir))
    except OpsError as e:
        import socket

        rec.update(machine_name=socket.gethostname(), bin_dir=config.DEFAULT_BIN_DIR, state_dir=config.DEFAULT_STATE_DIR,
                   config_error=f"{e.message}; cleaning the default locations")
    return rec


def context_from(recorded: dict, **kw) -> Context:
    from . import config

    def both(value, default):
        return tuple(dict.fromkeys([value or default, default]))  # recorded first, then the default

    cfg_path = recorded.get("config_path") or config.DEFAULT_CONFIG_PATH
    extra_cfg = () if os.path.dirname(cfg_path) == DEFAULT_CONFIG_DIR else (cfg_path,)
    return Context(
        machine_name=recorded.get("machine_name") or "",
        bin_dirs=both(recorded.get("bin_dir"), config.DEFAULT_BIN_DIR),
        state_dirs=both(recorded.get("state_dir"), config.DEFAULT_STATE_DIR),
        config_files=extra_cfg,
        **kw,
    )


# -- checkpoint, request, reports -------------------------------------------------------------


def read_checkpoint(reset_dir: str | os.PathLike = RESET_DIR) -> dict | None:
    try:
        return state.read_json(Path(reset_dir) / CHECKPOINT)
    except ValueError as e:
        # A corrupt checkpoint must not be taken for "no reset in progress".
        raise OpsError(Reason.EXECUTION_FAILED, f"{e}; remove it only if no reset is in progress") from None


def write_request(all_wg: bool, requested_by: str, reset_dir: str | os.PathLike = RESET_DIR) -> str:
    """Ask for a reset run (the CLI and the watcher call this before starting the units)."""
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    state.write_json(Path(reset_dir) / REQUEST,
                     {"run_id": run_id, "all_wg": bool(all_wg), "requested_by": requested_by, "requested_at": _now()})
    return run_id


def report_path(step: "Step", reset_dir: str | os.PathLike = RESET_DIR) -> Path:
    return Path(reset_dir) / REPORTS / f"{step.number:02d}-{step.name}.json"


def read_report(step: "Step", reset_dir: str | os.PathLike = RESET_DIR) -> dict | None:
    try:
        return state.read_json(report_path(step, reset_dir))
    except ValueError:
        return None  # a report cut short cannot happen (atomic writes); treat a foreign file as missing


# -- recording a step's work --------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.removed: list[str] = []
        self.absent: list[str] = []
        self.failed: list[dict] = []
        self.notes: list[str] = []
        self.reasons: list[Reason] = []
        self.forced: list[str] = []  # machines that had to be terminated

    def did(self, item: str, verb: str = "removed") -> None:
        self.removed.append(item)
        log.info(f"{verb} {item}")

    def already_absent(self, item: str) -> None:
        self.absent.append(item)

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info(text)

    def fail(self, item: str | None, error: OpsError) -> None:
        self.failed.append({"item": item, "reason": error.reason.value, "error": error.message})
        self.reasons.append(error.reason)
        log.error(f"{item + ': ' if item else ''}{error}")


# -- systemd operations used by the steps (pystemd; fast tests pass a fake) --------------------------


class SystemdOps:
    """The few systemd1 calls the agent-removal and reload steps need."""

    def __init__(self):
        from .machines import systemd_manager

        self._manager = systemd_manager()

    def unit(self, name: str) -> dict:
        from pystemd.systemd1 import Unit

        with Unit(name.encode()) as u:
            st = {"load_state": u.Unit.LoadState.decode(), "active_state": u.Unit.ActiveState.decode()}
        try:
            st["file_state"] = self._manager.Manager.GetUnitFileState(name.encode()).decode()
        except Exception:
            st["file_state"] = "not-found"
        return st

    def running(self, name: str) -> bool:
        return self.unit(name)["active_state"] in ("active", "activating", "deactivating", "reloading")

    def enabled(self, name: str) -> bool:
        return self.unit(name)["file_state"] in ("enabled", "enabled-runtime", "linked", "linked-runtime", "alias")

    def matching(self, patterns) -> list[str]:
        """Loaded units (running or not) whose names match any of the glob patterns."""
        found = self._manager.Manager.ListUnitsByPatterns([], [p.encode() for p in patterns])
        return sorted({u[0].decode() for u in found})

    def stop(self, name: str, timeout: float) -> None:
        self._manager.Manager.StopUnit(name.encode(), b"replace")
        deadline = time.monotonic() + timeout
        while self.running(name):
            if time.monotonic() >= deadline:
                raise OpsError(Reason.EXECUTION_FAILED, f"{name} did not stop within {timeout:g} s")
            time.sleep(0.2)

    def disable(self, name: str) -> None:
        self._manager.Manager.DisableUnitFiles([name.encode()], False)
        if self.enabled(name):
            raise OpsError(Reason.EXECUTION_FAILED, f"{name} is still enabled after disabling it")

    def reload(self) -> None:
        # The reply to Reload comes once the manager has re-read its units (like systemctl daemon-reload).
        self._manager.Manager.Reload()


# -- the steps -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Item:
    what: str  # e.g. "link wg51820": the same text in the plan, the report and the dry run
    note: str = ""  # detail for people, e.g. "(bridge)"
    action: str = "remove"  # what the step does to it: remove, stop, disable, unmount
    goes_with: str | None = None  # dry run only: removed as a side effect of an earlier step's item

    def __str__(self) -> str:
        return f"{self.what} {self.note}".rstrip()


class Step:
    name = ""
    number = 0
    phase = 1
    title = ""
    verify_after = True  # re-plan after apply; leftovers fail the step

    @property
    def unit(self) -> str:
        return f"unbounded-agent-reset-{self.name}.service"

    @property
    def executable(self) -> str:
        return f"unbounded-reset-{self.name}"

    def plan(self, ctx: Context) -> list[Item]:
        return []

    def apply(self, ctx: Context, rec: Recorder) -> None:
        raise NotImplementedError


def _lexists(path: str) -> bool:
    return os.path.lexists(path)


def _file_kind(path: str) -> str:
    if os.path.islink(path):
        return "link"
    return "directory" if os.path.isdir(path) else "file"


def _remove_path(ctx: Context, rec: Recorder, host_path: str) -> None:
    """Remove one file, link or directory tree (safely: see treeremove), recording the outcome."""
    from . import treeremove

    real = ctx.p(host_path)
    if not _lexists(real):
        rec.already_absent(f"path {host_path}")
        return
    kind = _file_kind(real)
    try:
        treeremove.remove_tree(real)
        fsutil.fsync_dir(os.path.dirname(real))
    except OpsError as e:
        rec.fail(f"{kind} {host_path}", e)
        return
    except OSError as e:
        rec.fail(f"{kind} {host_path}", OpsError(Reason.EXECUTION_FAILED, f"cannot remove {host_path}: {e.strerror}"))
        return
    rec.did(f"{kind} {host_path}")


def _plan_paths(ctx: Context, host_paths) -> list[Item]:
    return [Item(f"{_file_kind(ctx.p(p))} {p}") for p in host_paths if _lexists(ctx.p(p))]


class StopMachines(Step):
    name, number, phase = "stop-machines", 1, 1
    title = "stop the nspawn machines kube1 and kube2"

    def plan(self, ctx):
        from . import machines

        items = []
        for s in machines.inspect(MACHINES):
            if s.enabled:
                items.append(Item(f"enabled unit {machines.unit_of(s.name)}", f"({s.unit_file_state})", "disable"))
            if s.running:
                detail = "registered" if s.registered else "not registered"
                items.append(Item(f"machine {s.name}", f"({detail}, {machines.unit_of(s.name)} {s.unit_active_state})", "stop"))
        return items

    def apply(self, ctx, rec):
        from . import machines

        for m in MACHINES:  # disable first: even if stopping fails, the machine will not come back at boot
            try:
                if machines.disable(m):
                    rec.did(f"enabled unit {machines.unit_of(m)}", "disabled")
            except OpsError as e:
                rec.fail(f"enabled unit {machines.unit_of(m)}", e)
        outcomes = machines.stop(MACHINES, ctx.graceful_timeout, ctx.terminate_timeout, log=rec.note)
        for o in outcomes:
            if not o.was_running:
                rec.already_absent(f"machine {o.machine}")
                continue
            rec.did(f"machine {o.machine}", "stopped")
            if o.forced:
                rec.note(f"machine {o.machine} ignored the graceful stop for {ctx.graceful_timeout:g} s and was terminated")
        rec.forced = [o.machine for o in outcomes if o.forced]


class RemoveLinks(Step):
    name, number, phase = "remove-links", 2, 1
    title = "remove the agent's network links"

    def plan(self, ctx):
        from . import netlinks

        return [Item(f"link {l.name}", f"({l.kind})" if l.kind else "") for l in netlinks.agent_links(ctx.all_wg)]

    def apply(self, ctx, rec):
        from . import netlinks

        links = netlinks.agent_links(ctx.all_wg)
        present = {l.name for l in links}
        for name in netlinks.FIXED_LINKS:
            if name not in present:
                rec.already_absent(f"link {name}")
        for link in links:
            try:
                netlinks.remove(link)
                rec.did(f"link {link.name}")
            except OpsError as e:
                rec.fail(f"link {link.name}", e)


class RemoveWireguardKeys(Step):
    name, number, phase = "remove-wireguard-keys", 3, 1
    title = "remove the WireGuard server keys"

    def plan(self, ctx):
        return _plan_paths(ctx, WIREGUARD_KEYS)

    def apply(self, ctx, rec):
        for p in WIREGUARD_KEYS:
            _remove_path(ctx, rec, p)


def _nspawn_config_paths() -> list[str]:
    out = []
    for m in MACHINES:
        out += [f"{NSPAWN_DIR}/{m}.nspawn", f"{UNIT_DIR}/systemd-nspawn@{m}.service.d"]
    return out


class RemoveNspawnConfig(Step):
    name, number, phase = "remove-nspawn-config", 4, 1
    title = "remove the machines' .nspawn files and unit overrides"

    def plan(self, ctx):
        return _plan_paths(ctx, _nspawn_config_paths())

    def apply(self, ctx, rec):
        for p in _nspawn_config_paths():
            _remove_path(ctx, rec, p)


class RemoveMachineTrees(Step):
    name, number, phase = "remove-machine-trees", 5, 1
    title = "remove the machines' root trees (never through a mount)"

    def plan(self, ctx):
        from . import treeremove

        items = []
        for m in MACHINES:
            tree = f"{MACHINES_DIR}/{m}"
            real = ctx.p(tree)
            if not _lexists(real):
                continue
            if not os.path.islink(real):
                for point in treeremove.mounts_at_or_below(real):
                    items.append(Item(f"mount {point}", "(the mounted data is not touched)", "unmount"))
            items.append(Item(f"machine tree {tree}", "(a symlink: only the link)" if os.path.islink(real) else ""))
        return items

    def apply(self, ctx, rec):
        from . import machines, treeremove

        # Fail closed: never delete the root of a machine that runs, or that we cannot tell about.
        try:
            running = {s.name for s in machines.inspect(MACHINES) if s.running}
        except OpsError as e:
            rec.fail(None, OpsError(e.reason, f"not removing any machine tree: {e.message}"))
            return
        for m in MACHINES:
            tree = f"{MACHINES_DIR}/{m}"
            real = ctx.p(tree)
            if not _lexists(real):
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


class RemoveRouting(Step):
    name, number, phase = "remove-routing", 6, 1
    title = "remove the agent's policy rules and flush its routing tables (51820-51899, IPv4 and IPv6)"

    def plan(self, ctx):
        from . import routing

        return [Item(e.describe()) for e in routing.inventory()]

    def apply(self, ctx, rec):
        from . import routing

        for entry in routing.inventory():
            try:
                routing.remove(entry)
                rec.did(entry.describe())
            except OpsError as e:
                rec.fail(entry.describe(), e)


def _agent_unit_files() -> list[str]:
    out = []
    for unit in AGENT_UNITS:
        out += [f"{UNIT_DIR}/{unit}", f"{UNIT_DIR}/{unit}.d"]
    return out


def _agent_file_paths(ctx: Context) -> list[str]:
    from . import layout

    paths = []
    for d in ctx.bin_dirs:
        for name in (*layout.SLOTS, layout.CURRENT, layout.LAST_GOOD, layout.COMPAT):
            paths.append(f"{d}/{name}")
        real = ctx.p(d)
        try:  # temporaries a crash left next to the slots (fsutil's hidden ".<name>.tmp-*")
            paths += sorted(f"{d}/{n}" for n in os.listdir(real) if n.startswith(".unbounded-agent") and ".tmp-" in n)
        except OSError:
            pass
    # Whole directories only when they are the agent's own by name: a stateDir set to /var/lib by
    # mistake must not take /var/lib with it. The bin dir goes with the state dir it is in (the
    # default), never by itself: it may be a shared one such as /usr/local/bin.
    paths += [d for d in ctx.state_dirs if "unbounded" in os.path.basename(d.rstrip("/"))]
    paths.append(DEFAULT_CONFIG_DIR)
    paths += list(ctx.config_files)
    paths += _agent_unit_files()
    return list(dict.fromkeys(paths))


class RemoveAgent(Step):
    name, number, phase = "remove-agent", 7, 2
    title = "stop and disable the agent daemon; remove its binaries, config and state"

    def plan(self, ctx):
        items = []
        ops = ctx.units()
        for unit in [*ops.matching(UPGRADE_UNITS), DAEMON_UNIT, RECOVERY_UNIT, BOOTSTRAP_UNIT]:
            if ops.running(unit):
                items.append(Item(f"running unit {unit}", action="stop"))
        for unit in AGENT_UNITS:
            if ops.enabled(unit):
                items.append(Item(f"enabled unit {unit}", action="disable"))
        items += _plan_paths(ctx, _agent_file_paths(ctx))
        return items

    def apply(self, ctx, rec):
        ops = ctx.units()
        # An upgrade in flight would put a binary back; the daemon would restart into a deleted one.
        for unit in [*ops.matching(UPGRADE_UNITS), DAEMON_UNIT, RECOVERY_UNIT, BOOTSTRAP_UNIT]:
            try:
                if ops.running(unit):
                    ops.stop(unit, DAEMON_STOP_TIMEOUT)
                    rec.did(f"running unit {unit}", "stopped")
            except OpsError as e:
                rec.fail(f"running unit {unit}", e)
            except Exception as e:
                rec.fail(f"running unit {unit}", OpsError(Reason.EXECUTION_FAILED, f"cannot stop {unit}: {describe_error(e)}"))
        for unit in AGENT_UNITS:
            try:
                if ops.enabled(unit):
                    ops.disable(unit)
                    rec.did(f"enabled unit {unit}", "disabled")
            except OpsError as e:
                rec.fail(f"enabled unit {unit}", e)
            except Exception as e:
                rec.fail(f"enabled unit {unit}", OpsError(Reason.EXECUTION_FAILED, f"cannot disable {unit}: {describe_error(e)}"))
        for p in _agent_file_paths(ctx):
            if _lexists(ctx.p(p)):  # a path inside an already removed state dir is simply gone
                _remove_path(ctx, rec, p)


class ReloadSystemd(Step):
    name, number, phase = "reload-systemd", 8, 2
    title = "reload systemd (daemon-reload)"
    verify_after = False

    def apply(self, ctx, rec):
        try:
            ctx.units().reload()
        except OpsError:
            raise
        except Exception as e:
            raise OpsError(Reason.EXECUTION_FAILED, f"daemon-reload failed: {describe_error(e)}") from None
        rec.note("systemd reloaded its units")


class Begin(Step):
    name, number, phase = "begin", 0, 0
    title = "take the host lock and write the 'resetting' checkpoint"
    verify_after = False

    def apply(self, ctx, rec):
        pass  # done by run_step, which owns the checkpoint


class Verify(Step):
    name, number, phase = "verify", 9, 2
    title = "verify nothing is left, then remove the checkpoint"
    verify_after = False

    def apply(self, ctx, rec):
        pass  # done by run_step: it needs the run's reports


STEPS: tuple[Step, ...] = (Begin(), StopMachines(), RemoveLinks(), RemoveWireguardKeys(), RemoveNspawnConfig(),
                           RemoveMachineTrees(), RemoveRouting(), RemoveAgent(), ReloadSystemd(), Verify())
BY_NAME = {s.name: s for s in STEPS}
WORK_STEPS = tuple(s for s in STEPS if 1 <= s.number <= 8)  # the eight steps of DESIGN.md §5
PHASE1_TARGET = "unbounded-agent-reset-phase1.target"
PHASE2_TARGET = "unbounded-agent-reset-phase2.target"


def steps_of_phase(phase: int) -> list[Step]:
    """The units a phase target runs, in order (begin runs with both: it is idempotent)."""
    return [s for s in STEPS if s.phase in (0, phase)]


# -- dry run -------------------------------------------------------------------------------------


def dry_run(ctx: Context) -> list[dict]:
    """Every step's plan, in order, changing nothing. A step whose inventory fails shows its error.

    Routes through a link that remove-links deletes disappear with that link (the kernel drops
    them), so the routing step lists them as ``goes_with`` rather than as its own removals.
    """
    out, links_removed = [], set()
    for step in WORK_STEPS:
        entry = {"step": step.name, "number": step.number, "phase": step.phase, "title": step.title}
        try:
            if step.name == "remove-routing":
                items = _plan_routing_after_links(ctx, links_removed)
            else:
                items = step.plan(ctx)
        except OpsError as e:
            entry.update(items=[], goes_with=[], error=str(e), reason=e.reason.value)
            out.append(entry)
            continue
        except Exception as e:  # e.g. systemd unreachable: report, do not crash the dry run
            entry.update(items=[], goes_with=[], error=f"cannot inventory: {describe_error(e)}", reason=Reason.INVENTORY_FAILED.value)
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

    names = {l.index: l.name for l in netlinks.list_links()}
    items = []
    for e in routing.inventory(names):
        dev = names.get(e.oif) if e.oif is not None else None
        items.append(Item(e.describe(), goes_with=f"link {dev}" if dev in links_removed else None))
    return items


# -- running one step (what each bin/unbounded-reset-<step> does) ---------------------------------


def run_step(name: str, reset_dir: str | os.PathLike = RESET_DIR, lock_path: str | None = None,
             **ctx_overrides) -> dict:
    """Run one step under the host lock and write its report. Returns the report."""
    from . import hostlock

    step = BY_NAME[name]
    reset_dir = Path(reset_dir)
    rec = Recorder()
    started, t0 = _now(), time.monotonic()
    run_id = None
    try:
        with hostlock.HostLock(lock_path or hostlock.LOCK_PATH, purpose=f"reset {name}"):
            if step is BY_NAME["begin"]:
                checkpoint = _begin(reset_dir, rec)
            else:
                checkpoint = read_checkpoint(reset_dir)
                if checkpoint is None:
                    raise OpsError(Reason.EXECUTION_FAILED,
                                   "no reset in progress (no checkpoint): start unbounded-agent-reset.target or run "
                                   "`unbounded-agent reset`, which run the begin step first")
            run_id = checkpoint.get("run_id")
            ctx = context_from(checkpoint.get("recorded", {}), all_wg=bool(checkpoint.get("all_wg")),
                               reset_dir=str(reset_dir), **ctx_overrides)
            if step is BY_NAME["verify"]:
                _verify(ctx, reset_dir, run_id, rec)
            else:
                step.apply(ctx, rec)
                if step.verify_after and not rec.failed:
                    left = step.plan(ctx)
                    if left:
                        rec.fail(None, OpsError(Reason.EXECUTION_FAILED,
                                                f"still present after removal: {', '.join(map(str, left))}"))
    except OpsError as e:
        rec.fail(None, e)
    except Exception as e:  # a bug: keep the traceback in the journal, and still write a report
        log.error(traceback.format_exc().rstrip())
        rec.fail(None, OpsError(Reason.EXECUTION_FAILED, f"unexpected error: {type(e).__name__}: {describe_error(e)}"))
    if run_id is None:
        run_id = _request_run_id(reset_dir)
    report = {
        "step": step.name, "number": step.number, "phase": step.phase, "title": step.title, "unit": step.unit,
        "run_id": run_id,
        "result": "failed" if rec.failed else "succeeded",
        "reason": (rec.reasons[0] if rec.reasons else Reason.SUCCEEDED).value,
        "removed": rec.removed, "absent": rec.absent, "failed": rec.failed, "notes": rec.notes,
        "forced": rec.forced,
        "started_at": started, "finished_at": _now(), "seconds": round(time.monotonic() - t0, 3),
    }
    state.write_json(report_path(step, reset_dir), report, mode=0o644)
    return report


def _request_run_id(reset_dir: Path) -> str | None:
    try:
        return (state.read_json(reset_dir / REQUEST) or {}).get("run_id")
    except ValueError:
        return None


def _begin(reset_dir: Path, rec: Recorder) -> dict:
    """Create the checkpoint (or resume the one an interrupted reset left) and take the request."""
    try:
        request = state.read_json(reset_dir / REQUEST) or {}
    except ValueError:
        request = {}
    checkpoint = read_checkpoint(reset_dir)
    if checkpoint is None:
        checkpoint = {"checkpoint": "resetting", "created_at": _now(), "recorded": recorded_paths()}
        if "config_error" in checkpoint["recorded"]:
            rec.note(checkpoint["recorded"]["config_error"])
        r = checkpoint["recorded"]
        rec.note(f"checkpoint written: resetting (agent bin dir {r['bin_dir']}, state dir {r['state_dir']})")
    elif checkpoint.get("run_id") != request.get("run_id"):
        rec.note(f"resuming the interrupted reset begun at {checkpoint.get('created_at')}")
    # Without a request (a bare `systemctl start unbounded-agent-reset.target`) each begin is a new run.
    checkpoint["run_id"] = request.get("run_id") or f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    checkpoint["all_wg"] = bool(request.get("all_wg"))
    # "Written first": this write is durable (fsync) before any step unit is allowed to start.
    state.write_json(reset_dir / CHECKPOINT, checkpoint, mode=0o644)
    return checkpoint


def _verify(ctx: Context, reset_dir: Path, run_id: str | None, rec: Recorder) -> None:
    """The final check: every step of this run succeeded and a fresh inventory finds nothing left;
    only then is the checkpoint removed (last), so an unfinished reset is always resumed."""
    problems = []
    for step in WORK_STEPS:
        report = read_report(step, reset_dir)
        if report is None or report.get("run_id") != run_id:
            problems.append(f"{step.name} did not run in this reset")
        elif report.get("result") != "succeeded":
            problems.append(f"{step.name} failed ({report.get('reason')})")
        if step.verify_after:
            try:
                left = step.plan(ctx)
            except OpsError as e:
                problems.append(f"{step.name}: {e.message}")
                continue
            for item in left:
                problems.append(f"{item.what} is still there")
    if problems:
        raise OpsError(Reason.RESET_INCOMPLETE, "reset incomplete: " + "; ".join(problems))
    for name in (CHECKPOINT, REQUEST):
        (reset_dir / name).unlink(missing_ok=True)
    fsutil.fsync_dir(reset_dir)
    rec.note("verified: no agent artifact is left; checkpoint removed")


def exit_code(report: dict) -> int:
    """Log the step's one-line outcome and map it to the executable's exit code."""
    if report["result"] == "succeeded":
        log.info(f"succeeded: {len(report['removed'])} removed, {len(report['absent'])} already absent")
        return 0
    first = report["failed"][0]
    log.error(f"failed ({first['reason']}): {first['error']}")
    return Reason(report["reason"]).exit_code
