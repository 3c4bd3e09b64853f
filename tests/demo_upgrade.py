"""`make demo` chapter: AgentUpgrade as an operator runs it — a good upgrade, a release whose daemon
crashes (probation rolls it back and quarantines it), and a rollback on request.

run(host, say) expects the .deb installed on host (demo.py does that first); it leaves the daemon
running, on the version it started with.
"""

import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "lib"))  # tests/archives.py (used by releases) reads the library's reasons

import releases  # noqa: E402
CONFIG = "/etc/unbounded/agent/config.yaml"


def _show(host, cmd: list[str]):
    print(f"root@{host.name}:~# {shlex.join(cmd)}", flush=True)
    r = host.run(cmd, check=False, timeout=300)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    if r.returncode:
        print(f"(exit status {r.returncode})", flush=True)
    return r


def run(host, say) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        good = host.serve(releases.real_release(REPO, "2.0.0", Path(tmp) / "v2"), "unbounded-agent-2.0.0.tar.gz")
        bad = host.serve(releases.script_release(Path(tmp) / "bad.tar.gz", version="2.1.0", daemon="crash-after",
                                                 seconds=1), "unbounded-agent-2.1.0.tar.gz")
    say("AgentUpgrade: short probation for the demo (the default is 10 s)")
    host.write(CONFIG, "probationSeconds: 3\nreadyTimeoutSeconds: 10\n")
    _show(host, ["cat", CONFIG])
    say("A good upgrade: stage (download, verify, extract) → preflight → switch → probation → commit")
    _show(host, ["unbounded-agent", "upgrade", good, "--wait"])
    _show(host, ["ls", "-l", "/var/lib/unbounded-agent/bin"])
    _show(host, ["unbounded-agent", "status"])
    say("The same, as systemd ran it: one unit per step")
    _show(host, ["journalctl", "--no-pager", "-o", "cat", "-n", "12", "-u", "unbounded-upgrade*",
                 "--grep", "unbounded-upgrade-"])
    say("Rollback on request: back to unbounded-agent-last-good through the same switch and probation")
    _show(host, ["unbounded-agent", "rollback", "--wait"])
    _show(host, ["unbounded-agent", "version"])
    say("A release whose daemon crashes 1 s after it reported ready: probation rolls it back")
    _show(host, ["unbounded-agent", "upgrade", bad, "--wait"])
    _show(host, ["unbounded-agent", "version"])
    _show(host, ["cat", "/var/lib/unbounded-agent/rollback-signal.json"])
    say("Asked for again, the rolled-back release is refused (quarantined) unless --force")
    _show(host, ["unbounded-agent", "upgrade", bad, "--wait"])
    _show(host, ["unbounded-agent", "status"])
    host.run(["rm", "-f", CONFIG])
