"""`make demo` chapter: AgentReset on a bootstrapped host, as an operator runs it.

run(host, say) expects the .deb installed on host (demo.py does that first). It makes the host
look bootstrapped (machines kube1/kube2 running, the agent's links, keys, rules and routes, plus
decoys that must survive), previews the reset with --dry-run, runs it (queued; the dispatcher runs
phase 1 — everything that can fail, the agent's files included — then phase 2, which stops the daemon),
shows what is left and runs it again to show that a clean host has nothing to do.
"""

from bootstrapped_host import TOOLSET_RESET, bootstrap

from demo import show as _show


def run(host, say) -> None:
    say("AgentReset: a bootstrapped host (kube1/kube2 running, agent links, keys, routing) plus decoys")
    bootstrap(host)
    _show(host, ["machinectl", "list", "--no-pager"])
    _show(host, ["ip", "-br", "link"])
    _show(host, ["ip", "rule"])
    say("Started by hand, with no reset queued, a phase of the reset changes nothing: its begin step refuses, "
        "and no step runs without it")
    _show(host, ["systemctl", "start", "unbounded-agent-reset-phase1.target"])
    _show(host, ["sh", "-c", "journalctl --no-pager -o cat -u unbounded-agent-reset-begin --grep HostLocked | tail -n 1"])
    _show(host, ["systemctl", "is-active", "unbounded-agent-daemon"])
    _show(host, ["unbounded-agent", "version"])
    say("Preview: `unbounded-agent reset --dry-run` lists exactly what would go, and changes nothing")
    _show(host, ["unbounded-agent", "reset", "--dry-run"])
    say("Reset: phase 1 (steps 1-6 and the agent's files, verified; the daemon keeps running), then phase 2 "
        "(the daemon stops)")
    code = _show(host, ["unbounded-agent", "reset"]).returncode
    print(f"(exit status {code})")
    say("What is left: kube10, wg0, wgx, eth-keep, table 51900 and the operator's files")
    _show(host, ["machinectl", "list", "--no-pager"])
    _show(host, ["ip", "-br", "link"])
    _show(host, ["ip", "rule"])
    _show(host, ["ls", "/etc/wireguard", "/var/lib/machines"])
    say("The reset's units: two phase targets, which the dispatcher starts one after the other")
    _show(host, ["systemctl", "list-dependencies", "--no-pager", "unbounded-agent-reset-phase1.target",
                 "unbounded-agent-reset-phase2.target"])
    _show(host, ["journalctl", "--no-pager", "-o", "cat", "-u", "unbounded-agent-dispatch", "--grep", "reset"])
    say("Again, on the clean host (with the toolset's own CLI: `unbounded-agent` went with the agent)")
    code = _show(host, TOOLSET_RESET).returncode
    print(f"(exit status {code})")
