"""A fleet of test hosts against one test API server: each host with the .deb, its own agent daemon and its
own identity (mop_host.KubeLink.configure_agent), a Machine per host, and the fan-out controller run by its
systemd unit on a host acting as the management host.

    link = fleet_link(hosts, workdir)             # the API server in the test network, every host plugged in,
                                                  # Machines labelled pool=blue, the agents configured
    install_controller(link, hosts[0])            # its client certificate, kubeconfig and settings
    start_controller(hosts[0])                    # systemctl enable --now unbounded-agent-fleet-controller
    link.apply(parent("up", URL, maxInFlight="2"))
    leader(link)                                  # the Lease's holder ("worker-01_1a2b3c4d")

The release server of each host serves the same file under the same name: one downloadURL
(https://localhost:8443/...) reaches every host's own copy, as one URL of a real release server would.
"""

from __future__ import annotations

import json
import re

import yaml
from mop_host import MANIFESTS, KubeLink, wait_until

CONTROLLER = "unbounded-agent-fleet-controller.service"
CONTROLLER_USER = "unbounded-agent-fleet-controller"
CONTROLLER_DIR = "/etc/unbounded/fleet-controller"
LEASE = ("unbounded-system", "unbounded-agent-fleet-controller")
PARENT_LABEL = "unbounded-cloud.io/fleet-parent"
# Short lease timings, so that a failover takes seconds (retryPeriod < renewDeadline < leaseDuration).
CONTROLLER_CONFIG = f"""\
kubeconfig: {CONTROLLER_DIR}/kubeconfig
leaseDurationSeconds: 6
renewDeadlineSeconds: 4
retryPeriodSeconds: 1
"""


def fleet_link(hosts, workdir, pool: str = "blue") -> KubeLink:
    link = KubeLink.start(hosts[0], workdir)
    try:
        for h in hosts[1:]:
            link.net.plug(h)
        link.kubectl("apply", "-f", str(MANIFESTS / "fleet-controller-rbac.yaml"))
        machines = [{"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "Machine",
                     "metadata": {"name": h.name, "labels": {"pool": pool}}, "spec": {}} for h in hosts]
        path = link.workdir / "machines.yaml"
        path.write_text(yaml.safe_dump_all(machines, sort_keys=False))
        link.kubectl("apply", "-f", str(path))
        for h in hosts:
            link.configure_agent(h)
    except BaseException:
        link.stop()
        raise
    return link


def install_controller(link: KubeLink, host, config: str = CONTROLLER_CONFIG) -> None:
    """What an administrator puts on a management host: a credential for the controller's user (a client
    certificate, CN=unbounded-agent-fleet-controller), a kubeconfig naming it, and the settings."""
    crt, key, _ = link.server.issue_client_cert(link.workdir, CONTROLLER_USER, [], name=f"controller-{host.name}")
    host.put(crt, f"{CONTROLLER_DIR}/controller.crt", mode=0o600)
    host.put(key, f"{CONTROLLER_DIR}/controller.key", mode=0o600)
    kc = link.server.kubeconfig(link.workdir / f"controller-{host.name}.kubeconfig", user=CONTROLLER_USER,
                                credential={"client-certificate": f"{CONTROLLER_DIR}/controller.crt",
                                            "client-key": f"{CONTROLLER_DIR}/controller.key"})
    host.put(kc, f"{CONTROLLER_DIR}/kubeconfig", mode=0o600)
    host.write(f"{CONTROLLER_DIR}/config.yaml", config)


def start_controller(host) -> None:
    host.run(["systemctl", "enable", "--now", CONTROLLER])


def controller_state(host) -> dict:
    out = host.run(["systemctl", "show", CONTROLLER, "-p", "ActiveState,SubState,MainPID,UnitFileState"],
                   check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def lease(link: KubeLink) -> dict:
    r = link.kubectl("get", "lease", "-n", LEASE[0], LEASE[1], "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def leader(link: KubeLink) -> str:
    return (lease(link).get("spec") or {}).get("holderIdentity") or ""


def wait_leader(link: KubeLink, host, timeout: float = 60) -> str:
    return wait_until(f"the controller on {host.name} to hold the Lease",
                      lambda: (h := leader(link)).startswith(f"{host.name}_") and h, timeout=timeout)


def parent(name: str, url: str, kind: str = "AgentUpgrade", pool: str = "blue", **params) -> dict:
    spec = {"machineSelector": {"matchLabels": {"pool": pool}}, "operationKind": kind,
            "parameters": {"downloadURL": url, **params} if kind == "AgentUpgrade" else params}
    return {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation", "metadata": {"name": name},
            "spec": spec}


def children(link: KubeLink, name: str) -> dict[str, dict]:
    """The children of parent name, by machine."""
    out = link.kubectl("get", "mop", "-l", f"{PARENT_LABEL}={name}", "-o", "json").stdout
    return {o["spec"]["machineRef"]: o for o in json.loads(out)["items"]}


def phase(link: KubeLink, name: str) -> str:
    return ((link.get(name) or {}).get("status") or {}).get("phase") or ""


def version(host) -> str:
    return host.run(["unbounded-agent", "version"], check=False).stdout.strip().split()[-1]


def wide(link: KubeLink) -> str:
    return link.kubectl("get", "mop", "-o", "wide").stdout


def wide_row(text: str, name: str) -> list[str]:
    """The cells of name's row in `kubectl get mop -o wide` output (cells are two or more spaces apart)."""
    line = next(line for line in text.splitlines() if line.split()[0] == name)
    return re.split(r"\s{2,}", line.strip())


def wide_cell(text: str, name: str, column: str) -> str:
    """One cell of name's row, by the header's column position (kubectl aligns every cell under its header), so
    that an empty cell reads as "" rather than shifting the others."""
    lines = text.splitlines()
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    titles = header.split()
    i = titles.index(column)
    line = next(line for line in lines[1:] if line.split()[0] == name)
    end = starts[i + 1] if i + 1 < len(starts) else len(line)
    return line[starts[i]:end].strip()
