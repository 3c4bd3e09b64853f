"""MachineOperations end to end: a test host whose agent daemon (from the .deb) talks to the test API server,
and kubectl driving it from the test network, as a user would.

    kube = KubeLink.start(host)        # a test network (testnet.py) with the host plugged in; the API server
                                       # (HTTPS) in it, with the CRD, RBAC and the per-machine admission policy
    kube.configure_agent(host)         # the agent's client certificate (CN=unbounded-agent:<host>,
                                       # O=unbounded-agent-daemons), kubeconfig and config; daemon restarted
    with kube.watch() as w:            # `kubectl get mop -w`, started before anything is applied
        kube.apply(mop("up-1", host.name, "AgentUpgrade", downloadURL=url))
        w.wait_phase("up-1", "Complete")
    w.phases("up-1")                   # ["Pending", "InProgress", "Complete"] as kubectl printed them
    kube.cut(host); kube.mend(host)    # the host loses the API server (kubectl still reaches it), and gets it back

The test host has a private network namespace with only `lo`; a veth pair gives it one link to a network
namespace of the tests' own, where the API server listens (it runs in the test process, so tests can pause it,
partition it and count its requests) and where kubectl runs (nsenter --net). None of this traffic passes
through the machine's own network namespace.
"""

from __future__ import annotations

import os
import queue
import random
import subprocess
import threading
from pathlib import Path

import yaml
from kube_apiserver import start_apiserver
from testnet import TestNet
from waiting import wait_until  # noqa: F401 (re-exported to the mop tests)

REPO = Path(__file__).resolve().parents[2]
KUBECTL = "/usr/bin/kubectl"
AGENT_CONFIG_DIR = "/etc/unbounded/agent"
DAEMON = "unbounded-agent-daemon.service"
AGENT_USER_AGENT = "unbounded-agent/"
PHASES = ("Pending", "InProgress", "Complete", "Failed")
AGENT_GROUP = "unbounded-agent-daemons"
MANIFESTS = REPO / "packaging" / "kubernetes"
# Short upgrade bounds (as upgrade_host.TEST_CONFIG) so a failing daemon is caught in seconds.
AGENT_CONFIG = """\
kubeconfig: /etc/unbounded/agent/kubeconfig
probationSeconds: 3
readyTimeoutSeconds: 8
preflightTimeoutSeconds: 5
readyWithoutApiSeconds: 3
maxExtractedBytes: 16777216
"""


class KubeLink:
    """The API server in the test network, and the host's link to it."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.net: TestNet | None = None
        self.server = None
        self.admin_kubeconfig = ""
        self.agent_certs: dict[str, str] = {}  # host name -> the serial of its current client certificate

    @classmethod
    def start(cls, host, workdir: Path | None = None, policy: bool = True) -> KubeLink:
        link = cls(workdir or host.workdir)
        link.net = TestNet.start()
        try:
            link.net.plug(host)
            link.server = start_apiserver(host=link.net.gateway, tls=True, netns=link.net.ns)
            link.admin_kubeconfig = link.server.kubeconfig(link.workdir / "admin.kubeconfig")
            link.kubectl("apply", "-f", str(MANIFESTS / "rbac.yaml"))
            if policy:
                link.kubectl("apply", "-f", str(MANIFESTS / "admission-policy.yaml"))
        except BaseException:
            link.stop()
            raise
        return link

    def stop(self) -> None:
        if self.server:
            self.server.stop()
        if self.net:
            self.net.stop()

    def cut(self, host) -> None:
        """The host loses the API server (its link goes dead); kubectl, in the test network, still reaches it."""
        self.net.cut(host)

    def mend(self, host) -> None:
        self.net.mend(host)

    # -- the agent's side ------------------------------------------------------------------------

    def configure_agent(self, host, config: str = AGENT_CONFIG, restart: bool = True) -> None:
        """The agent's credential — a client certificate for the user unbounded-agent:<host> in the group
        unbounded-agent-daemons (packaging/kubernetes/rbac.yaml, admission-policy.yaml) — a kubeconfig naming
        its files, and the agent's config."""
        self.install_agent_cert(host)
        kc = self.server.kubeconfig(self.workdir / f"agent-{host.name}.kubeconfig", user=agent_user(host),
                                    credential={"client-certificate": f"{AGENT_CONFIG_DIR}/agent.crt",
                                                "client-key": f"{AGENT_CONFIG_DIR}/agent.key"})
        host.put(kc, f"{AGENT_CONFIG_DIR}/kubeconfig", mode=0o600)
        host.write(f"{AGENT_CONFIG_DIR}/config.yaml", config)
        if restart:
            r = host.run(["systemctl", "restart", DAEMON], check=False)  # Type=notify: returns once ready
            if r.returncode:
                raise AssertionError(f"restarting the daemon failed: {r.stderr}\n" + host.run(
                    ["journalctl", "--no-pager", "-n", "80", "-u", DAEMON, "-u", "unbounded-agent-dispatch.service"],
                    check=False).stdout)
            wait_until("the agent's first list", lambda: self.agent_requests(verb="list"), timeout=60)

    def install_agent_cert(self, host) -> str:
        """A new client certificate for the host's agent, put in place as a rotation tool would (new files renamed
        over the old ones); returns its serial. The old one stays valid until revoke_agent_cert."""
        crt, key, serial = self.server.issue_client_cert(self.workdir, agent_user(host), [AGENT_GROUP],
                                                         name=f"{host.name}-{len(self.agent_certs)}-{serial_hint()}")
        for src, dest in ((crt, "agent.crt"), (key, "agent.key")):
            host.put(src, f"{AGENT_CONFIG_DIR}/.{dest}.new", mode=0o600)
            host.path(f"{AGENT_CONFIG_DIR}/.{dest}.new").rename(host.path(f"{AGENT_CONFIG_DIR}/{dest}"))
        self.agent_certs[host.name] = serial
        return serial

    def revoke_agent_cert(self, serial: str) -> None:
        self.server.revoke_client_cert(serial)

    def agent_requests(self, **kw) -> list:
        return self.server.find_requests(user_agent=AGENT_USER_AGENT, **kw)

    # -- kubectl (in the test network) ---------------------------------------------------------------

    def env(self, kubeconfig: str | None = None) -> dict:
        return dict(os.environ, KUBECONFIG=kubeconfig or self.admin_kubeconfig)

    def command(self, *args: str) -> list[str]:
        """kubectl args, as a command line that runs in the test network."""
        return self.net.command([KUBECTL, *args])

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60, kubeconfig: str | None = None,
                stdin: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(self.command(*args), env=self.env(kubeconfig), capture_output=True, text=True,
                           timeout=timeout, input=stdin)
        if check and r.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def apply(self, manifest: dict) -> str:
        path = self.workdir / f"{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        return self.kubectl("apply", "-f", str(path)).stdout

    def get(self, name: str) -> dict | None:
        import json

        r = self.kubectl("get", "mop", name, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def condition(self, name: str) -> dict:
        op = self.get(name)
        return next(c for c in op["status"]["conditions"] if c["type"] == "Completed")

    def watch(self, name: str | None = None) -> KubectlWatch:
        return KubectlWatch(self, name)

    def watching(self, since: int) -> bool:
        """Whether kubectl opened a watch of MachineOperations after `since` watches (count_watches())."""
        return self.count_watches() > since

    def count_watches(self) -> int:
        return len([r for r in self.server.find_requests(verb="watch", resource="machineoperations")
                    if r.user_agent.startswith("kubectl")])



class KubectlWatch:
    """`kubectl get mop [NAME] -w`: each printed line, as a user sees it, parsed by its header."""

    def __init__(self, link: KubeLink, name: str | None):
        self.args = link.command("get", "mop", *([name] if name else []), "-w")
        self.env = link.env()
        self.lines: list[str] = []
        self.q: queue.Queue = queue.Queue()
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.q.put(line)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def header(self) -> list[str]:
        """The column names (the first line, or the first after "No resources found" when nothing was listed)."""
        return next((line.split() for line in self.lines if line.startswith("NAME ")), [])

    def rows(self, name: str) -> list[dict]:
        head = self.header
        out = []
        for line in self.lines:
            cells = line.split()
            if cells and cells[0] == name and len(cells) == len(head):
                out.append(dict(zip(head, cells, strict=True)))
            elif cells and cells[0] == name and len(cells) == len(head) - 1:
                # An empty cell prints nothing: MACHINE for a fan-out parent (then PHASE comes third), else PHASE.
                empty = "MACHINE" if "MACHINE" in head and cells[2] in PHASES else "PHASE"
                row = dict(zip([h for h in head if h != empty], cells, strict=True))
                row[empty] = "<none>" if empty == "PHASE" else ""
                out.append(row)
        return out

    def phases(self, name: str) -> list[str]:
        seen = [r["PHASE"] for r in self.rows(name)]
        return [p for i, p in enumerate(seen) if i == 0 or p != seen[i - 1]]

    def wait_phase(self, name: str, *phases: str, timeout: float = 240) -> str:
        return wait_until(f"kubectl to show {name} {' or '.join(phases)}",
                          lambda: next((p for p in self.phases(name) if p in phases), None), timeout=timeout)


def agent_user(host) -> str:
    """The identity convention (packaging/kubernetes/admission-policy.yaml): the agent of machine M is
    unbounded-agent:M."""
    return f"unbounded-agent:{host.name}"


def serial_hint() -> str:
    return f"{random.getrandbits(24):06x}"


def mop(name: str, machine: str, kind: str, ttl: int | None = None, **params) -> dict:
    spec = {"machineRef": machine, "operationKind": kind}
    if params:
        spec["parameters"] = params
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    return {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation", "metadata": {"name": name},
            "spec": spec}


def journal_of(host, unit: str = DAEMON, lines: int = 2000) -> str:
    return host.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit, "-n", str(lines)], check=False).stdout


def daemon_state(host) -> dict:
    out = host.run(["systemctl", "show", DAEMON, "-p", "ActiveState,SubState,MainPID,NRestarts,LoadState"],
                   check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def kill9_daemon(host) -> int:
    """SIGKILL the daemon's main process (systemd restarts it: Restart=always); returns the old PID."""
    pid = int(daemon_state(host)["MainPID"])
    assert pid > 0, "the daemon is not running"
    host.run(["kill", "-9", str(pid)])
    wait_until("the daemon to run again", lambda: daemon_state(host)["ActiveState"] == "active"
               and int(daemon_state(host)["MainPID"]) not in (0, pid), timeout=60)
    return pid


def rss_kib(host) -> int:
    pid = daemon_state(host)["MainPID"]
    status = host.run(["cat", f"/proc/{pid}/status"]).stdout
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def unit_started_at(host, unit_glob: str, after: float) -> float:
    """When systemd first logged "Starting" for a unit matching unit_glob after the time after (seconds since
    the epoch; the test host shares the real-time clock with the test process)."""
    import json

    out = host.run(["journalctl", "-o", "json", "--no-pager", "-u", unit_glob]).stdout
    times = [int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in map(json.loads, out.splitlines())
             if str(e.get("MESSAGE", "")).startswith("Starting ")]
    return min(t for t in times if t >= after)
