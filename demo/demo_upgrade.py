"""`make demo` chapter: AgentUpgrade as an operator runs it — a good upgrade, requests queued while one
runs, a release whose daemon crashes (probation rolls it back and quarantines it), and a rollback on request.
Every request goes through the operation queue: the CLI queues it and follows it; the dispatcher runs it.

run(host, say) expects the .deb installed on host (demo.py does that first); it leaves the daemon
running, on the version it started with.
"""

import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "tests" / "support", REPO / "lib"):  # support/archives.py (used by releases) reads the library's reasons
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

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


def _wait_for_an_empty_queue(host) -> None:
    from waiting import wait_until

    requests = host.path("/var/lib/unbounded-agent-ops/spool/requests")
    wait_until("the queue to be empty", lambda: not any(requests.iterdir()), timeout=300)


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
    say("The same, as systemd ran it: the dispatcher took the request, one unit per step (keyed by the request id)")
    # (journalctl 252 prints --grep matches newest first when -n is given: tail keeps them in order)
    _show(host, ["sh", "-c", "journalctl --no-pager -o cat -u unbounded-agent-dispatch -u 'unbounded-upgrade*' "
                             "--grep 'unbounded-(agent-dispatch|upgrade-)' | tail -n 16"])
    _show(host, ["ls", "/var/lib/unbounded-agent-ops/results"])
    say("Two requests at once: a rollback and an upgrade back to 2.0.0 queue behind each other, one at a time")
    _show(host, ["unbounded-agent", "rollback"])
    _show(host, ["unbounded-agent", "upgrade", good])
    _show(host, ["unbounded-agent", "status"])
    _wait_for_an_empty_queue(host)
    _show(host, ["sh", "-c", "journalctl --no-pager -o cat -u unbounded-agent-dispatch --grep 'succeeded|failed' "
                             "| tail -n 2"])
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
