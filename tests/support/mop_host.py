"""MachineOperations end to end: a test host whose agent daemon (from the .deb) talks to the test API server,
and kubectl driving it from outside, as a user would.

    kube = KubeLink.start(host)        # veth pair into the host, API server (HTTPS) on the outer end
    kube.configure_agent(host)         # agent kubeconfig (RBAC group unbounded-agent-daemons) + config, restart
    with kube.watch() as w:            # `kubectl get mop -w`, started before anything is applied
        kube.apply(upgrade_op("up-1", host.name, url))
        w.wait_phase("up-1", "Complete")
    w.phases("up-1")                   # ["<none>", "Pending", "InProgress", "Complete"] as kubectl printed them

The test host has a private network namespace with only `lo`; a veth pair gives it one link to the
outside, where the API server runs in the test process (so tests can pause it and count its requests).
"""

from __future__ import annotations

import os
import queue
import random
import subprocess
import threading
import time
from pathlib import Path

import yaml
from kube_apiserver import start_apiserver
from waiting import wait_until  # noqa: F401 (re-exported to the mop tests)

REPO = Path(__file__).resolve().parents[2]
KUBECTL = "/usr/bin/kubectl"
AGENT_CONFIG_DIR = "/etc/unbounded/agent"
DAEMON = "unbounded-agent-daemon.service"
AGENT_USER_AGENT = "unbounded-agent/"
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
    """The API server outside the host and the link to it."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.server = None
        self.outer = ""
        self.outer_ip = ""
        self.admin_kubeconfig = ""

    @classmethod
    def start(cls, host, workdir: Path | None = None) -> KubeLink:
        link = cls(workdir or host.workdir)
        link._connect(host)
        link.server = start_apiserver(host=link.outer_ip, tls=True)
        link.admin_kubeconfig = link.server.kubeconfig(link.workdir / "admin.kubeconfig")
        link.kubectl("apply", "-f", str(REPO / "packaging" / "kubernetes" / "rbac.yaml"))
        return link

    def _connect(self, host) -> None:
        for _ in range(20):
            a, b = random.randint(200, 254), random.randrange(0, 256, 4)
            self.outer = f"vk{random.getrandbits(24):06x}"
            self.outer_ip, inner_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
            r = subprocess.run(["ip", "-o", "addr", "show", "to", f"10.{a}.{b}.0/30"], capture_output=True, text=True)
            if r.stdout.strip():
                continue  # a parallel session uses this subnet
            subprocess.run(["ip", "link", "add", self.outer, "type", "veth", "peer", "name", "kube0", "netns",
                            str(host.init_pid)], check=True, capture_output=True)
            subprocess.run(["ip", "addr", "add", f"{self.outer_ip}/30", "dev", self.outer], check=True)
            subprocess.run(["ip", "link", "set", self.outer, "up"], check=True)
            host.run(["ip", "addr", "add", f"{inner_ip}/30", "dev", "kube0"])
            host.run(["ip", "link", "set", "kube0", "up"])
            return
        raise RuntimeError("no free 10.x.y.0/30 subnet for the API server link")

    def stop(self) -> None:
        if self.server:
            self.server.stop()
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)

    # -- the agent's side ------------------------------------------------------------------------

    def configure_agent(self, host, config: str = AGENT_CONFIG, restart: bool = True) -> None:
        """The agent's credential (group unbounded-agent-daemons: packaging/kubernetes/rbac.yaml) and config."""
        kc = self.server.kubeconfig(self.workdir / f"agent-{host.name}.kubeconfig", user=f"agent-{host.name}",
                                    groups=("unbounded-agent-daemons",))
        host.put(kc, f"{AGENT_CONFIG_DIR}/kubeconfig", mode=0o600)
        host.write(f"{AGENT_CONFIG_DIR}/config.yaml", config)
        if restart:
            r = host.run(["systemctl", "restart", DAEMON], check=False)  # Type=notify: returns once ready
            for _ in range(3):
                # The nested test host's systemd sometimes cannot set up the cgroup of a unit restarted at once
                # (status=219/CGROUP after "Failed to kill control group ... Input/output error"): an
                # artefact of the test host under load, not of the daemon; start it again.
                if r.returncode == 0 or "219/CGROUP" not in journal_of(host, lines=5):
                    break
                time.sleep(1)
                host.run(["systemctl", "reset-failed", DAEMON], check=False)
                r = host.run(["systemctl", "start", DAEMON], check=False)
            if r.returncode:
                raise AssertionError(f"restarting the daemon failed: {r.stderr}\n" + host.run(
                    ["journalctl", "--no-pager", "-n", "80", "-u", DAEMON, "-u", "unbounded-agent-dispatch.service"],
                    check=False).stdout)
            wait_until("the agent's first list", lambda: self.agent_requests(verb="list"), timeout=60)

    def agent_requests(self, **kw) -> list:
        return self.server.find_requests(user_agent=AGENT_USER_AGENT, **kw)

    # -- kubectl -----------------------------------------------------------------------------------

    def env(self) -> dict:
        return dict(os.environ, KUBECONFIG=self.admin_kubeconfig)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run([KUBECTL, *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
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



class KubectlWatch:
    """`kubectl get mop [NAME] -w`: each printed line, as a user sees it, parsed by its header."""

    def __init__(self, link: KubeLink, name: str | None):
        self.args = [KUBECTL, "get", "mop", *([name] if name else []), "-w"]
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
        return self.lines[0].split() if self.lines else []

    def rows(self, name: str) -> list[dict]:
        head = self.header
        out = []
        for line in self.lines[1:]:
            cells = line.split()
            if cells and cells[0] == name and len(cells) == len(head):
                out.append(dict(zip(head, cells, strict=True)))
            elif cells and cells[0] == name and len(cells) == len(head) - 1:  # PHASE empty: kubectl prints nothing
                row = dict(zip([h for h in head if h != "PHASE"], cells, strict=True))
                row["PHASE"] = "<none>"
                out.append(row)
        return out

    def phases(self, name: str) -> list[str]:
        seen = [r["PHASE"] for r in self.rows(name)]
        return [p for i, p in enumerate(seen) if i == 0 or p != seen[i - 1]]

    def wait_phase(self, name: str, *phases: str, timeout: float = 240) -> str:
        return wait_until(f"kubectl to show {name} {' or '.join(phases)}",
                          lambda: next((p for p in self.phases(name) if p in phases), None), timeout=timeout)


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
