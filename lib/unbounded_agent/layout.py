"""The agent's binaries on the host (DESIGN.md §2): two slots and the links that select them.

    <bin dir>/unbounded-agent-blue, unbounded-agent-green   the slots (regular files)
    <bin dir>/unbounded-agent-current   -> the active slot
    <bin dir>/unbounded-agent-last-good -> the binary to roll back to
    <bin dir>/unbounded-agent           -> unbounded-agent-current (compatibility path)

Links hold bare slot names (relative targets), so a link is valid exactly when the slot beside it is.
"""

import os
from pathlib import Path

from . import fsutil
from .reasons import OpsError, Reason

BLUE = "unbounded-agent-blue"
GREEN = "unbounded-agent-green"
SLOTS = (BLUE, GREEN)
CURRENT = "unbounded-agent-current"
LAST_GOOD = "unbounded-agent-last-good"
COMPAT = "unbounded-agent"


class Layout:
    def __init__(self, bin_dir: str | os.PathLike):
        self.bin_dir = Path(bin_dir)

    def path(self, name: str) -> Path:
        return self.bin_dir / name

    def link_target(self, link: str) -> str | None:
        """The slot name a link points at, or None when the link is absent or not a link."""
        try:
            return os.readlink(self.path(link))
        except (FileNotFoundError, OSError):
            return None

    def resolves(self, link: str) -> Path | None:
        """The executable regular file a link leads to, or None if it is absent or dangling."""
        p = self.path(link)
        try:
            real = p.resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            return None
        return real if real.is_file() and os.access(real, os.X_OK) else None

    def active_slot(self) -> str | None:
        real = self.resolves(CURRENT)
        if real is None:
            return None
        for slot in SLOTS:
            if real == self.path(slot).resolve():
                return slot
        return None

    def seed(self, packaged_agent: str | os.PathLike) -> list[str]:
        """First install: put the packaged agent into the blue slot and create the links.

        A host that already has a working current link keeps it: from then on the agent binary is
        managed by upgrades and rollbacks, not by the package. Only missing or dangling links are
        repaired. Returns what was done, for the installer's log.
        """
        done = []
        self.bin_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        fsutil.remove_stale_temps(self.bin_dir)
        if self.resolves(CURRENT) is None:
            fsutil.atomic_copy(packaged_agent, self.path(BLUE), mode=0o755)
            fsutil.atomic_symlink(BLUE, self.path(CURRENT))
            done.append(f"installed the packaged agent as {BLUE} and pointed {CURRENT} at it")
        if self.resolves(LAST_GOOD) is None:
            target = self.link_target(CURRENT)
            if target is None:  # current works but is a regular file, not a link to a slot
                raise OpsError(Reason.EXECUTION_FAILED,
                               f"{self.path(CURRENT)} is not a link to a slot: cannot point {LAST_GOOD} at it")
            fsutil.atomic_symlink(target, self.path(LAST_GOOD))
            done.append(f"pointed {LAST_GOOD} at {target}")
        if self.link_target(COMPAT) != CURRENT:
            if self.path(COMPAT).is_symlink() or not self.path(COMPAT).exists():
                fsutil.atomic_symlink(CURRENT, self.path(COMPAT))
                done.append(f"pointed {COMPAT} at {CURRENT}")
            else:
                # A regular file here is an operator's own binary: never overwrite it silently.
                done.append(f"left {self.path(COMPAT)} alone: it is not a link")
        return done


def binary_version(path: str | os.PathLike, timeout: float = 10.0) -> str | None:
    """Ask a binary for its version (`<path> version`); None when it cannot say."""
    import subprocess  # here: of the programs that read the layout, few ask a binary anything
    try:
        out = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.stdout.split()
    return words[-1] if words else None


PACKAGED_AGENT = "/usr/lib/unbounded-agent/unbounded-agent"
ENV_PACKAGED_AGENT = "UNBOUNDED_AGENT_PACKAGED"  # tests point it elsewhere


def packaged_agent() -> Path:
    """The agent the package ships: what seeds the first slot, and the rollback of last resort."""
    return Path(os.environ.get(ENV_PACKAGED_AGENT) or PACKAGED_AGENT)


def seed_main(argv: list[str] | None = None) -> int:
    """bin/unbounded-agent-seed-slots [AGENT]: seed the slots from the packaged agent (the postinst runs it)."""
    import sys

    from . import log, program

    ap = program.parser("unbounded-agent-seed-slots", seed_main.__doc__)
    ap.add_argument("agent", nargs="?", default=PACKAGED_AGENT, help=f"the agent binary to seed (default {PACKAGED_AGENT})")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    def seed_slots(cfg) -> None:
        for action in Layout(cfg.bin_dir).seed(args.agent) or ["slots and links already in place"]:
            log.info(action)

    return program.run("unbounded-agent-seed-slots", seed_slots)
