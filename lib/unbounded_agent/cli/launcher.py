"""``/usr/bin/unbounded-agent``: run the agent binary that the config's bin dir selects (its ``-current``
link), or, when there is none (after a reset, or with the slots lost), the toolset's own CLI — the same
commands from the installed library (``status``, ``reset``, ``version`` of the toolset, ...). So the command
always works, whatever ``binDir`` says, and a second ``unbounded-agent reset`` is a clean no-op.
"""

from __future__ import annotations

import os
import sys

from .. import log


def bin_dir() -> str:
    """The config's binDir; a config that cannot be read still names it when it can be found in it (the agent
    binary then reports the config's error itself), else the default."""
    from .. import config

    try:
        return str(config.load().bin_dir)
    except Exception:
        pass
    try:
        with open(config.config_path(), "rb") as f:
            value = config.parse(f.read(), config.config_path()).get("binDir")
    except Exception:
        value = None
    return value if isinstance(value, str) and os.path.isabs(value) else config.DEFAULT_BIN_DIR


def agent_binary() -> str | None:
    """The agent binary to run: ``<bin dir>/unbounded-agent-current`` when it leads to an executable file that is
    not this launcher (a link pointed back here must not loop)."""
    from .. import layout

    lay = layout.Layout(bin_dir())
    real = lay.resolves(layout.CURRENT)
    if real is None or real == _me():
        return None
    return str(lay.path(layout.CURRENT))


def _me():
    from pathlib import Path

    return Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    agent = agent_binary()
    if agent:
        try:
            os.execv(agent, [agent, *args])
        except OSError as e:  # e.g. not a program for this machine: the toolset's own CLI still works
            log.warn(f"cannot run {agent} ({e.strerror}): running the toolset's own unbounded-agent instead")
    from . import main as cli_main

    return cli_main(args)
