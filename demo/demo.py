#!/usr/bin/env python3
"""`make demo`: what an operator sees on a fresh host.

Boots a Debian 12 systemd test host, installs the .deb and shows the agent's version, its status
and its daemon unit. Later features add their part of the story as `demo_*.py` modules with a
`run(host, say)` function (`run(host, say, deb)` for one that boots more hosts: the fleet); they run here
in order, each on the same host.
"""

import argparse
import importlib
import inspect
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "demo", REPO / "tests" / "support", REPO / "lib"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import testhost_tree  # noqa: E402
from testhost import boot_testhost  # noqa: E402

CHAPTERS = ["demo_upgrade", "demo_mop", "demo_fleet", "demo_reset"]  # optional: run when present


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(host, cmd: list[str], check: bool = False, timeout: float = 600):
    """Run a command in the host and print it like a terminal session would."""
    print(f"root@{host.name}:~# {shlex.join(cmd)}", flush=True)
    r = host.run(cmd, check=check, timeout=timeout)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--deb", required=True, type=Path)
    args = ap.parse_args()
    say("Building (or reusing) the cached Debian 12 test-host tree")
    tree = testhost_tree.build_tree()
    say("Booting the test host: systemd as PID 1 in systemd-nspawn, private network")
    with boot_testhost("demo", tree) as host:
        print(f"booted in {host.boot_seconds:.1f} s")
        show(host, ["systemctl", "--version"], check=True)
        say(f"Installing {args.deb.name}")
        host.install_deb(args.deb)
        show(host, ["unbounded-agent", "version"], check=True)
        show(host, ["unbounded-agent", "status"], check=True)
        show(host, ["systemctl", "status", "--no-pager", "--lines=5", "unbounded-agent-daemon"])
        for name in CHAPTERS:
            if (REPO / "demo" / f"{name}.py").exists():
                chapter = importlib.import_module(name)
                # a chapter that boots hosts of its own installs the same package on them
                extra = {"deb": args.deb} if "deb" in inspect.signature(chapter.run).parameters else {}
                chapter.run(host, say, **extra)
        say("Done: the test host is powered off and its overlay removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
