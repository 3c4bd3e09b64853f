"""What a reset keeps so that it can still be reported when the agent daemon cannot: a copy of the agent's config
and of its credentials (the kubeconfig with every file it names inline), in the reset's own directory.

remove-agent removes the daemon's binary, config and kubeconfig before the requester reports ``Complete`` (at
the gate): the daemon reports from memory. A daemon that stops in that window (a power cut, a restart) cannot
start again, and nobody would report; the dispatcher then starts ``unbounded-agent-reset-reporter.service``,
the toolset's own watcher running on this copy, which publishes the reset and acknowledges the gate. The
copy lives from just before those removals to stop-daemon (phase 2), which removes it. Only a config with a
kubeconfig is kept: without one there is no cluster to report to."""

from __future__ import annotations

import os
from pathlib import Path

from .. import fsutil

REPORTER_UNIT = "unbounded-agent-reset-reporter.service"
KIT = "reporter"
CONFIG = "config.yaml"
KUBECONFIG = "kubeconfig"
RUN = "run"
STATE = "state"


def kit_dir(directory: str | os.PathLike) -> Path:
    return Path(directory) / KIT


def config_path(directory: str | os.PathLike) -> Path | None:
    """The held config (complete: written last), None when nothing is held."""
    path = kit_dir(directory) / CONFIG
    return path if path.is_file() else None


def held_for(directory: str | os.PathLike) -> str | None:
    """The reset run the held copy is for, None when nothing (complete) is held."""
    if config_path(directory) is None:
        return None
    try:
        return (kit_dir(directory) / RUN).read_text().strip()
    except FileNotFoundError:
        return None


def hold(directory: str | os.PathLike, run_id: str, config_file: str, under=lambda path: path) -> str:
    """Keep the config at config_file (read at under(path): a step's Context.p) and its kubeconfig for run_id; what was done, in
    words. Kept once per run: a run resumed after its originals are gone keeps its first copy. OSError or
    ValueError when the originals cannot be read or the copy cannot be written."""
    import yaml

    from .. import config, kubeconfig

    if held_for(directory) == run_id:
        return "the config and credentials for the report are kept already"
    try:
        with open(under(config_file), "rb") as f:
            doc = config.parse(f.read(), config_file)
    except FileNotFoundError:
        if held_for(directory) is None:
            return "no config: nothing to keep for a report"
        # An earlier run, cut short, removed the originals after keeping them: its copy serves this run.
        fsutil.atomic_write(kit_dir(directory) / RUN, f"{run_id}\n".encode(), mode=0o600)
        return "kept the copy an earlier run of this reset made for the report"
    source = doc.get("kubeconfig")
    if not isinstance(source, str) or not source:
        return "no kubeconfig in the config: no cluster to report to"
    flat = kubeconfig.flattened(under(source))
    kit = kit_dir(directory)
    release(directory)
    os.mkdir(kit, 0o700)
    fsutil.fsync_dir(kit.parent)
    fsutil.atomic_write(kit / KUBECONFIG, yaml.safe_dump(flat).encode(), mode=0o600)
    fsutil.atomic_write(kit / RUN, f"{run_id}\n".encode(), mode=0o600)
    held = {**doc, "stateDir": str(kit / STATE), "kubeconfig": str(kit / KUBECONFIG)}
    fsutil.atomic_write(kit / CONFIG, yaml.safe_dump(held).encode(), mode=0o600)  # last: the copy is complete
    return f"kept the config and the credentials of {source} for the report until the daemon stops"


def release(directory: str | os.PathLike) -> bool:
    """Remove the held copy; whether there was one."""
    kit = kit_dir(directory)
    if not os.path.lexists(kit):
        return False
    import shutil  # here: of the programs that import this, only the one that releases the copy removes a tree

    shutil.rmtree(kit)
    fsutil.fsync_dir(kit.parent)
    return True
