#!/usr/bin/env python3
"""`make bench` (fleet part): one fleet upgrade rolled through simulated machines by the fan-out controller.

    python3 bench/bench_fleet.py [--machines 100,500] [--max-in-flight 50] [--op-seconds 1]

Each machine is the real agent watcher (lib/unbounded_agent/kube/watcher.py, its own user
unbounded-agent:<machine> and state), a thread of this process; only the host side is faked: a fake dispatcher
answers each upgrade request op-seconds after it was queued (tests/support/fleet_fakes.SimulatedAgents). The
controller is the real program (bin/unbounded-agent-fleet-controller) in a process of its own, so that its memory
is its own. The test API server runs in a third process, with the CRD, RBAC and the per-machine admission
policy of packaging/kubernetes/, and counts every request by user.

One parent (machineSelector pool=bench, canaryCount 1, maxInFlight as given) per fleet size. Reported: the
time from its creation to Complete, the API requests per machine during the rollout (the agents', the
controller's without its lease renewals, which depend on time and not on the fleet, and the lease's), and the
controller's resident memory (VmHWM, the peak). The requests per machine must not grow with the fleet.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUPPORT = REPO / "tests" / "support"
for _p in (SUPPORT, REPO / "lib"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

CONTROLLER_USER = "unbounded-agent-fleet-controller"
AGENT_GROUP = "unbounded-agent-daemons"
URL = "https://releases.example/unbounded-agent-linux-amd64.tar.gz"  # never fetched: the host side is faked


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the API server, in a process of its own -----------------------------------------------------------------


def serve(conn, machines: list[str]) -> None:
    """The test API server for the bench: tokens for the admin, the controller and each agent, a Machine per
    machine; answers "counts" (requests by kind of user, since the last "mark") and "stop" on conn."""
    for p in (SUPPORT, REPO / "lib"):
        sys.path.insert(0, str(p))
    raise_fd_limit()
    import kube_apiserver
    from fleet_fakes import PRELOAD, machine

    kube_apiserver._HTTPServer.request_queue_size = 1024  # every agent connects at once
    # A watch window as large as the rollout's changes: a watcher that falls behind relists (real servers keep
    # minutes of history), which would be the server's limit, not the agents'.
    server = kube_apiserver.start_apiserver(preload=PRELOAD, history_limit=500_000)
    tokens = {"admin": server.add_user("admin", ["system:masters"]),
              "controller": server.add_user(CONTROLLER_USER, [])}
    for m in machines:
        tokens[m] = server.add_user(f"unbounded-agent:{m}", [AGENT_GROUP])
        with server.lock:
            server._create(server.types[("unbounded-cloud.io", "v1alpha3", "machines")], None,
                           machine(m, pool="bench"), {})
    conn.send({"url": server.url, "tokens": tokens})
    mark = 0
    while True:
        cmd = conn.recv()
        if cmd == "mark":
            with server.lock:
                mark = len(server.requests)
            conn.send(mark)
        elif cmd == "counts":
            with server.lock:
                reqs = server.requests[mark:]
            counts: dict[str, int] = {}
            for r in reqs:
                who = ("agents" if r.user.startswith("unbounded-agent:") else
                       "lease" if r.user == CONTROLLER_USER and r.resource == "leases" else
                       "controller" if r.user == CONTROLLER_USER else "others")
                counts[who] = counts.get(who, 0) + 1
                key = f"{who}:{r.verb} {r.resource}"
                counts[key] = counts.get(key, 0) + 1
            conn.send(counts)
        elif cmd == "stop":
            server.stop()
            conn.send("stopped")
            return


def kubeconfig(path: Path, url: str, token: str) -> str:
    import yaml

    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "u"}}]}))
    path.chmod(0o600)
    return str(path)


def memory_kib(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines())
            if k in ("VmRSS", "VmHWM")}


def run(n: int, max_in_flight: int, op_seconds: float, tmp: Path) -> dict:
    from fleet_fakes import SimulatedAgents

    from unbounded_agent.kube import client as kubeclient
    from unbounded_agent.kube import mop

    machines = [f"m-{i:04}" for i in range(1, n + 1)]
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child_conn, machines), daemon=True)
    server.start()
    info = parent_conn.recv()
    url, tokens = info["url"], info["tokens"]
    admin = kubeclient.build(kubeconfig(tmp / "admin.kubeconfig", url, tokens["admin"]))
    agents = SimulatedAgents(tmp / "agents", {m: kubeconfig(tmp / f"{m}.kubeconfig", url, tokens[m]) for m in machines},
                             seconds=op_seconds, tick=1.0, poll=0.25)
    controller = None
    stderr, sys.stderr = sys.stderr, open(tmp / "agents.log", "w")  # the agents' journal lines: kept, not shown
    try:
        started = time.monotonic()
        agents.start()
        while not agents.synced():
            time.sleep(0.2)
        while not all(w.api.machine_annotated for w in agents.watchers.values()):
            time.sleep(0.2)
        print(f"  {n} agents listed and watching after {time.monotonic() - started:.1f} s", flush=True)
        config = tmp / "controller.yaml"
        config.write_text(f"kubeconfig: {kubeconfig(tmp / 'controller.kubeconfig', url, tokens['controller'])}\n"
                          "identity: bench-controller\n")
        code = (f"import sys; sys.path.insert(0, {str(REPO / 'lib')!r}); from unbounded_agent.fleet import "
                "controller; sys.exit(controller.main(sys.argv[1:]))")
        controller = subprocess.Popen([sys.executable, "-c", code, "--config", str(config)],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp / "controller.log", "w"))
        lease = "/apis/coordination.k8s.io/v1/namespaces/unbounded-system/leases/unbounded-agent-fleet-controller"
        while True:
            try:
                if admin.get(lease)["spec"].get("holderIdentity") == "bench-controller":
                    break
            except kubeclient.ApiError:
                pass
            time.sleep(0.2)
        time.sleep(1.0)  # its caches listed
        parent_conn.send("mark")
        parent_conn.recv()
        body = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation",
                "metadata": {"name": "upgrade-bench"},
                "spec": {"machineSelector": {"matchLabels": {"pool": "bench"}}, "operationKind": "AgentUpgrade",
                         "parameters": {"downloadURL": URL, "canaryCount": "1", "maxInFlight": str(max_in_flight)}}}
        t0 = time.monotonic()
        admin.request("POST", kubeclient.MOP_PATH, body=body, content_type="application/json")
        peak = {"VmRSS": 0, "VmHWM": 0}
        while True:
            op = admin.get(f"{kubeclient.MOP_PATH}/upgrade-bench")
            if mop.is_terminal(op):
                break
            mem = memory_kib(controller.pid)
            peak = {k: max(peak[k], mem[k]) for k in peak}
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        mem = memory_kib(controller.pid)
        parent_conn.send("counts")
        counts = parent_conn.recv()
        ran = sum(len(v) for v in agents.ran.values())
        return {"machines": n, "phase": mop.phase(op), "message": (op.get("status") or {}).get("message"),
                "seconds": seconds, "ran": ran, "twice": [m for m, v in agents.ran.items() if len(v) > 1],
                "counts": counts, "controller_rss_kib": mem["VmRSS"], "controller_hwm_kib": max(mem["VmHWM"],
                                                                                                peak["VmHWM"])}
    finally:
        if controller is not None:
            controller.send_signal(signal.SIGTERM)
            try:
                controller.wait(30)
            except subprocess.TimeoutExpired:
                controller.kill()
        agents.stop()
        parent_conn.send("stop")
        parent_conn.recv()
        server.join(30)
        sys.stderr = stderr  # (left open: an agent thread still stopping may write a last line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machines", default="100,500", help="fleet sizes, comma-separated")
    ap.add_argument("--max-in-flight", type=int, default=50)
    ap.add_argument("--op-seconds", type=float, default=1.0, help="how long each faked host upgrade takes")
    args = ap.parse_args()
    raise_fd_limit()
    rows = []
    for n in (int(x) for x in args.machines.split(",")):
        print(f"\n{n} simulated machines, maxInFlight {args.max_in_flight}, canaryCount 1, each upgrade "
              f"{args.op_seconds:g} s on its host:", flush=True)
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="bench-fleet-") as tmp:
            r = run(n, args.max_in_flight, args.op_seconds, Path(tmp))
        c = r["counts"]
        print(f"  {r['phase']} in {r['seconds']:.1f} s: {r['message']}")
        print(f"  host operations run: {r['ran']} (machines run twice: {len(r['twice'])})")
        for who in ("agents", "controller", "lease"):
            verbs = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(c.items()) if k.startswith(f"{who}:"))
            print(f"  {who:10} {c.get(who, 0):6} requests ({c.get(who, 0) / n:.2f} per machine): {verbs}")
        print(f"  controller memory: VmRSS {r['controller_rss_kib'] / 1024:.1f} MiB, peak (VmHWM) "
              f"{r['controller_hwm_kib'] / 1024:.1f} MiB", flush=True)
        rows.append(r)
    print("\n| machines | rollout time | agent requests/machine | controller requests/machine | lease requests | "
          "controller RSS (peak) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c, n = r["counts"], r["machines"]
        print(f"| {n} | {r['seconds']:.1f} s | {c.get('agents', 0) / n:.2f} | {c.get('controller', 0) / n:.2f} | "
              f"{c.get('lease', 0)} | {r['controller_hwm_kib'] / 1024:.1f} MiB |")
    print(json.dumps([{k: v for k, v in r.items() if k != "counts"} | {"counts": {k: v for k, v in r["counts"].items()
                                                                                  if ":" not in k}} for r in rows]))
    ok = all(r["phase"] == "Complete" and not r["twice"] and r["ran"] == r["machines"] for r in rows)
    return 0 if ok and requests_do_not_grow(rows) else 1


def requests_do_not_grow(rows: list[dict], slack: float = 0.10) -> bool:
    """The agents' and the controller's requests per machine at each fleet size, against the smallest fleet's:
    a cost per machine that grows with the fleet would not scale (slack for the status writes the controller
    folds together or not, depending on timing). Lease renewals depend on time, not on the fleet: left out."""
    def per_machine(r: dict) -> float:
        return (r["counts"].get("agents", 0) + r["counts"].get("controller", 0)) / r["machines"]

    base = min(rows, key=lambda r: r["machines"])
    ok = True
    for r in rows:
        grows = per_machine(r) > per_machine(base) * (1 + slack)
        ok = ok and not grows
        print(f"requests per machine at {r['machines']}: {per_machine(r):.2f} (at {base['machines']}: "
              f"{per_machine(base):.2f}){': GROWS with the fleet' if grows else ''}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
