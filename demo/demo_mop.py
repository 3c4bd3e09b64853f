"""`make demo` chapter: MachineOperations driven with kubectl, as in the Unbounded docs.

run(host, say) expects the .deb installed on host (demo.py does that first; if an earlier chapter reset the
host, the agent is put back from the toolset package first). It starts the test API server in a network
namespace of its own (a test network, bridged to the host; kubectl runs there too, through nsenter --net),
applies the CRD, the agent's ClusterRole and the per-machine admission policy, gives the agent its client
certificate (CN=unbounded-agent:<host>, O=unbounded-agent-daemons), and then, with kubectl only:
  1. shows that a bad operation is refused by the CRD's rules, and that the agent cannot speak for another
     machine (`kubectl auth can-i`, and a forged status write denied by the policy);
  2. applies an AgentUpgrade to a new release and watches it: Pending → InProgress → Complete;
  3. applies an AgentUpgrade to a release whose daemon crashes and watches it fail with DaemonFailed,
     while the host keeps running the good version;
  4. applies an AgentReset and watches it complete once the host is clean but for the running daemon (the
     dispatcher waits at the reset's gate until the daemon has published Complete, then stops the daemon).
`kubectl describe mop` tells each story: conditions and Events.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "demo", REPO / "tests" / "support", REPO / "lib"):  # run from demo.py as a script
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import releases  # noqa: E402
from mop_host import AGENT_CONFIG_DIR, KubeLink, agent_user, daemon_state, mop, wait_until  # noqa: E402

from demo import show  # noqa: E402

TERMINAL = ("Complete", "Failed")


def kubectl(kube: KubeLink, *args: str, kubeconfig: str | None = None, stdin: str | None = None) -> str:
    print(f"$ kubectl {shlex.join(args)}", flush=True)
    r = kube.kubectl(*args, check=False, kubeconfig=kubeconfig, stdin=stdin)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    return r.stdout


def apply(kube: KubeLink, manifest: dict) -> None:
    name = manifest["metadata"]["name"]
    path = kube.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    print(f"$ cat {path.name}\n{path.read_text().rstrip()}", flush=True)
    print(f"$ kubectl apply -f {path.name}", flush=True)
    print(kube.kubectl("apply", "-f", str(path)).stdout.rstrip(), flush=True)


def watch(kube: KubeLink, name: str, timeout: float = 300) -> str:
    """`kubectl get mop NAME -w`, printed live, until the operation is Complete or Failed."""
    print(f"$ kubectl get mop {name} -w", flush=True)
    proc = subprocess.Popen(kube.command("get", "mop", name, "-w"), env=kube.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    phase = ""
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
            cells = line.split()
            if len(cells) >= 4 and cells[0] == name and cells[3] in TERMINAL:
                phase = cells[3]
                break
            if time.monotonic() > deadline:
                break
    finally:
        proc.terminate()
        proc.wait(10)
    print("^C", flush=True)
    return phase


def ensure_agent(host, say) -> None:
    """An earlier chapter may have reset the host (the agent removed itself, the toolset package stayed): put
    the agent back as bootstrap does — seed the slots from the package, enable and start the daemon."""
    if daemon_state(host).get("ActiveState") == "active":
        return
    say("The agent was reset in the previous chapter: putting it back (seed the slots, start the daemon)")
    show(host, ["/usr/libexec/unbounded-agent/unbounded-agent-seed-slots"], check=True)
    show(host, ["systemctl", "enable", "--now", "unbounded-agent-daemon.service"], check=True)
    wait_until("the daemon", lambda: daemon_state(host).get("ActiveState") == "active", timeout=60)


def run(host, say) -> None:
    ensure_agent(host, say)
    work = Path(tempfile.mkdtemp(prefix="demo-mop-"))
    say("MachineOperations: a Kubernetes API server (the test one) in a test network, and a link from the host")
    kube = KubeLink.start(host, work)
    try:
        print(f"API server at {kube.server.url} (in the test network); the agent's client certificate says "
              f"CN={agent_user(host)}, O=unbounded-agent-daemons (packaging/kubernetes/rbac.yaml, "
              "admission-policy.yaml)", flush=True)
        kubectl(kube, "create", "-f", str(_machine_manifest(kube, host.name)))
        kube.configure_agent(host)
        show(host, ["cat", "/etc/unbounded/agent/config.yaml"])
        show(host, ["systemctl", "status", "--no-pager", "--lines=4", "unbounded-agent-daemon"])
        kubectl(kube, "get", "crd", "machineoperations.unbounded-cloud.io")
        kubectl(kube, "get", "validatingadmissionpolicies,validatingadmissionpolicybindings")
        before = host.run(["unbounded-agent", "version"]).stdout.split()[-1]

        say("The CRD says no: an AgentUpgrade without downloadURL is refused by the API server")
        bad = yaml.safe_dump(mop(f"upgrade-agent-{host.name}-no-url", host.name, "AgentUpgrade"), sort_keys=False)
        print(bad.rstrip(), flush=True)
        kubectl(kube, "apply", "-f", "-", stdin=bad)

        say(f"Per-machine authorization: the agent of {host.name} cannot speak for worker-02")
        apply(kube, mop("reset-agent-worker-02", "worker-02", "AgentReset"))
        as_agent = kube.server.kubeconfig(kube.workdir / "as-the-agent.kubeconfig", user=agent_user(host), credential={
            "client-certificate": str(host.path(f"{AGENT_CONFIG_DIR}/agent.crt")),
            "client-key": str(host.path(f"{AGENT_CONFIG_DIR}/agent.key"))})
        print("(kubectl below uses the agent's own client certificate)", flush=True)
        kubectl(kube, "auth", "whoami", kubeconfig=as_agent)
        kubectl(kube, "auth", "can-i", "update", "machineoperations/reset-agent-worker-02", "--subresource=status",
                kubeconfig=as_agent)
        kubectl(kube, "auth", "can-i", "create", "machineoperations", kubeconfig=as_agent)
        kubectl(kube, "patch", "mop", "reset-agent-worker-02", "--subresource=status", "--type=merge", "-p",
                '{"status": {"phase": "Complete", "message": "AgentReset completed"}}', kubeconfig=as_agent)
        kubectl(kube, "get", "mop", "reset-agent-worker-02")

        say("Building two releases with `make release`: 2.0.0, and 9.0.0 whose daemon crashes at start")
        good = releases.real_release(REPO, "2.0.0", work / "2.0.0")
        crash = releases.script_release(work / "crash.tar.gz", version="9.0.0", daemon="crash")
        urls = {"good": host.serve(good, "agent-2.0.0.tar.gz"), "crash": host.serve(crash, "agent-9.0.0.tar.gz")}

        say(f"AgentUpgrade {before} → 2.0.0: apply, then watch it (the daemon restarts into the new binary)")
        apply(kube, mop(f"upgrade-agent-{host.name}", host.name, "AgentUpgrade", downloadURL=urls["good"],
                        sha256=releases_digest(good)))
        watch(kube, f"upgrade-agent-{host.name}")
        show(host, ["unbounded-agent", "version"])
        kubectl(kube, "describe", "mop", f"upgrade-agent-{host.name}")
        wait_until("the new daemon's annotation", lambda: "2.0.0" in kube.kubectl(
            "get", "machine", host.name, "-o", "yaml").stdout, timeout=30)
        kubectl(kube, "get", "machine", host.name, "-o",
                "jsonpath={.metadata.annotations.unbounded-cloud\\.io/agent-version}{\"\\n\"}")

        say("AgentUpgrade to a release whose daemon crashes: probation rolls it back; the restored daemon "
            "reports DaemonFailed")
        apply(kube, mop(f"upgrade-agent-{host.name}-crash", host.name, "AgentUpgrade", downloadURL=urls["crash"]))
        watch(kube, f"upgrade-agent-{host.name}-crash")
        kubectl(kube, "get", "mop", "-o", "wide")
        kubectl(kube, "describe", "mop", f"upgrade-agent-{host.name}-crash")
        show(host, ["unbounded-agent", "version"])
        show(host, ["systemctl", "status", "--no-pager", "--lines=0", "unbounded-agent-daemon"])

        say("AgentReset: everything that can fail (the agent's own files included) while the daemon runs, "
            "Complete on the server, then the daemon stops")
        apply(kube, mop(f"reset-agent-{host.name}", host.name, "AgentReset"))
        watch(kube, f"reset-agent-{host.name}")
        wait_until("the daemon to be removed", lambda: daemon_state(host).get("LoadState") == "not-found"
                   or daemon_state(host).get("ActiveState") in ("inactive", "failed"), timeout=120)
        show(host, ["systemctl", "status", "--no-pager", "--lines=3", "unbounded-agent-daemon"])
        # Complete was published at the reset's gate; the dispatcher then finished the reset without the daemon
        requests = host.path("/var/lib/unbounded-agent-ops/spool/requests")
        wait_until("the dispatcher to finish the reset", lambda: not any(requests.iterdir()), timeout=300)
        show(host, ["journalctl", "--no-pager", "-o", "cat", "-u", "unbounded-agent-dispatch", "--grep",
                    f"reset reset-agent-{host.name}"])
        kubectl(kube, "get", "mop")
        kubectl(kube, "describe", "mop", f"reset-agent-{host.name}")
        agent = kube.agent_requests()
        print(f"(the agent sent {len(agent)} requests to the API server in this chapter)", flush=True)
    finally:
        kube.stop()


def _machine_manifest(kube: KubeLink, name: str) -> Path:
    """The host's Machine (the test server serves a stand-in of the Unbounded Machine type)."""
    path = kube.workdir / f"machine-{name}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                                    "metadata": {"name": name}, "spec": {}}, sort_keys=False))
    return path


def releases_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
