"""What every reset step shares: where things are (Context), what it found (Item), what it did (Recorder),
and the step's two halves.

- ``plan(ctx)`` inventories what exists now that the step would stop or remove (nothing is changed;
  ``unbounded-agent reset --dry-run`` prints exactly these lists);
- ``apply(ctx, rec)`` does it, recording per item what was removed, what was already absent and what
  failed. After ``apply`` the runner calls ``plan`` again: anything still there fails the step, so
  "succeeded" always means "verified gone".
"""

from __future__ import annotations

import dataclasses
import os
import stat

from .. import fsutil, log, systemd
from ..reasons import OpsError, Reason, describe_error

MACHINES = ("kube1", "kube2")  # both are always cleaned, whatever the config says
DEFAULT_CONFIG_DIR = "/etc/unbounded/agent"
UNIT_DIR = "/etc/systemd/system"


class AgentUnits:
    """The few systemd calls the agent-removal, daemon-stop and reload steps make (fast tests pass a fake).
    A state that cannot be read is INVENTORY_FAILED, never "not running" or "not enabled"."""

    def matching(self, patterns) -> list[str]:
        try:
            return systemd.list_units(list(patterns))
        except systemd.SystemdError as e:
            raise OpsError(Reason.INVENTORY_FAILED, str(e)) from None

    def running(self, name: str) -> bool:
        try:
            return systemd.running(systemd.unit_state(name))
        except systemd.SystemdError as e:
            raise OpsError(Reason.INVENTORY_FAILED, str(e)) from None

    def reporting(self, name: str) -> bool:
        """Whether the unit's main process runs (a daemon waiting to be restarted has none)."""
        try:
            st = systemd.unit_state(name)
        except systemd.SystemdError as e:
            raise OpsError(Reason.INVENTORY_FAILED, str(e)) from None
        return systemd.running(st) and bool(st.get("main_pid"))

    def enabled(self, name: str) -> bool:
        try:
            return systemd.enabled(systemd.unit_file_state(name))
        except systemd.SystemdError as e:
            raise OpsError(Reason.INVENTORY_FAILED, str(e)) from None

    def stop(self, name: str, timeout: float) -> None:
        if not systemd.stop_and_wait(name, timeout):
            raise OpsError(Reason.EXECUTION_FAILED, f"{name} did not stop within {timeout:g} s")

    def disable(self, name: str) -> None:
        systemd.disable_unit_files([name])
        if self.enabled(name):
            raise OpsError(Reason.EXECUTION_FAILED, f"{name} is still enabled after disabling it")

    def reload(self) -> None:
        systemd.reload()


@dataclasses.dataclass
class Context:
    """What a step needs to know about the host. ``root`` prefixes every file path (fast tests run the file
    steps against a temporary directory; on a host it is "/")."""

    machine_name: str
    bin_dirs: tuple[str, ...]
    state_dirs: tuple[str, ...]
    config_files: tuple[str, ...] = ()  # config files outside DEFAULT_CONFIG_DIR
    config_path: str = ""  # the agent's config (recorded when the reset began)
    all_wg: bool = False
    graceful_timeout: float = 30.0
    terminate_timeout: float = 15.0
    root: str = "/"
    systemd: AgentUnits | None = None  # AgentUnits (or a fake in fast tests); None = the real one, made lazily
    directory: str | None = None  # the reset's own directory (its checkpoint); None = reports.reset_dir()
    tables: tuple[int, ...] = ()  # routing tables the checkpoint records as the agent's (remove-links)

    def p(self, path: str) -> str:
        """The path of host path ``path`` under ``root``."""
        return path if self.root == "/" else os.path.join(self.root, path.lstrip("/"))

    def units(self) -> AgentUnits:
        if self.systemd is None:
            self.systemd = AgentUnits()
        return self.systemd


@dataclasses.dataclass
class Item:
    what: str  # e.g. "link wg51820": the same text in the plan, the report and the dry run
    note: str = ""  # detail for people, e.g. "(bridge)"
    action: str = "remove"  # what the step does to it: remove, stop, disable, unmount
    goes_with: str | None = None  # dry run only: removed as a side effect of an earlier step's item

    def __str__(self) -> str:
        return f"{self.what} {self.note}".rstrip()


class Recorder:
    def __init__(self) -> None:
        self.removed: list[str] = []
        self.absent: list[str] = []
        self.failed: list[dict] = []
        self.notes: list[str] = []
        self.reasons: list[Reason] = []
        self.forced: list[str] = []  # machines that had to be terminated
        self.run_id: str | None = None  # the reset this step works for, once known

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
        return f"unbounded-agent-reset-{self.name}"

    def plan(self, ctx: Context) -> list[Item]:
        return []

    def apply(self, ctx: Context, rec: Recorder) -> None:
        raise NotImplementedError

    def checkpoint(self, directory, rec: Recorder):
        """The run this step works for: its checkpoint, which the begin step wrote, and the host-operation lock
        held for that run."""
        from .. import hostlock
        from .reports import read_checkpoint

        checkpoint = read_checkpoint(directory)
        if checkpoint is None:
            raise OpsError(Reason.EXECUTION_FAILED,
                           "no reset in progress (no checkpoint): run `unbounded-agent reset`, whose dispatcher runs "
                           "the begin step first")
        rec.run_id = checkpoint.run_id  # a refusal below is still reported for this run
        hostlock.require(checkpoint.run_id, f"reset step {self.name}")
        return checkpoint

    def work(self, ctx: Context, directory, run_id: str, rec: Recorder) -> None:
        """Do the step, then inventory again: anything still there fails it."""
        self.apply(ctx, rec)
        if self.verify_after and not rec.failed:
            left = self.plan(ctx)
            if left:
                rec.fail(None, OpsError(Reason.EXECUTION_FAILED, f"still present after removal: {', '.join(map(str, left))}"))


def stop_unit(ops: AgentUnits, rec: Recorder, unit: str, timeout: float) -> bool:
    """Stop unit if it runs, recording what happened; False when it failed to stop."""
    try:
        if ops.running(unit):
            ops.stop(unit, timeout)
            rec.did(f"running unit {unit}", "stopped")
        return True
    except OpsError as e:
        rec.fail(f"running unit {unit}", e)
    except Exception as e:
        rec.fail(f"running unit {unit}", unexpected(e, f"cannot stop {unit}"))
    return False


def disable_unit(ops: AgentUnits, rec: Recorder, unit: str) -> None:
    """Disable unit if it is enabled, recording what happened."""
    try:
        if ops.enabled(unit):
            ops.disable(unit)
            rec.did(f"enabled unit {unit}", "disabled")
    except OpsError as e:
        rec.fail(f"enabled unit {unit}", e)
    except Exception as e:
        rec.fail(f"enabled unit {unit}", unexpected(e, f"cannot disable {unit}"))


def lstat(path: str) -> os.stat_result | None:
    """The path's own status (a symlink is not followed; symlinks in its parents are), None when it does not
    exist. Anything else — a parent that cannot be searched, an I/O error — is INVENTORY_FAILED: a path
    that cannot be looked at is never taken for one that is not there."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise OpsError(Reason.INVENTORY_FAILED, f"cannot tell whether {path} exists: {e.strerror}") from None


def exists(path: str) -> bool:
    return lstat(path) is not None


def file_kind(path: str) -> str:
    st = lstat(path)
    if st is None:
        return "path"
    if stat.S_ISLNK(st.st_mode):
        return "link"
    return "directory" if stat.S_ISDIR(st.st_mode) else "file"


def remove_path(ctx: Context, rec: Recorder, host_path: str) -> None:
    """Remove one file, link or directory tree (safely: see treeremove), recording the outcome."""
    from . import treeremove

    real = ctx.p(host_path)
    try:
        if not exists(real):
            rec.already_absent(f"path {host_path}")
            return
        kind = file_kind(real)
    except OpsError as e:
        rec.fail(f"path {host_path}", e)
        return
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


def plan_paths(ctx: Context, host_paths) -> list[Item]:
    return [Item(f"{file_kind(ctx.p(p))} {p}") for p in host_paths if exists(ctx.p(p))]


def unexpected(e: Exception, what: str) -> OpsError:
    return OpsError(Reason.EXECUTION_FAILED, f"{what}: {describe_error(e)}")


def recorded_paths(cfg_loader=None):
    """Where the agent's files are, from its config (what begin records in the checkpoint). A broken config
    must not make the host un-resettable: fall back to the defaults and say so."""
    from .. import config
    from .reports import Recorded

    loader = cfg_loader or config.load
    try:
        cfg = loader()
        return Recorded(config_path=config.config_path(), machine_name=cfg.machine_name, bin_dir=str(cfg.bin_dir),
                        state_dir=str(cfg.state_dir))
    except OpsError as e:
        import socket

        return Recorded(config_path=config.config_path(), machine_name=socket.gethostname(),
                        bin_dir=config.DEFAULT_BIN_DIR, state_dir=config.DEFAULT_STATE_DIR,
                        config_error=f"{e.message}; cleaning the default locations")


def context_from(recorded, **kw) -> Context:
    """The Context of a run from what its checkpoint recorded (the recorded places first, then the defaults)."""
    from .. import config

    def both(value, default):
        return tuple(dict.fromkeys([value or default, default]))

    cfg_path = recorded.config_path or config.DEFAULT_CONFIG_PATH
    extra_cfg = () if os.path.dirname(cfg_path) == DEFAULT_CONFIG_DIR else (cfg_path,)
    return Context(machine_name=recorded.machine_name or "", bin_dirs=both(recorded.bin_dir, config.DEFAULT_BIN_DIR),
                   state_dirs=both(recorded.state_dir, config.DEFAULT_STATE_DIR), config_files=extra_cfg,
                   config_path=cfg_path, **kw)
