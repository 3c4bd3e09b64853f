"""Hostile MachineOperations, one table: huge and odd parameters, wrong types, unicode, control characters,
unknown fields, bad digests, negative and overflowing numbers. Each ends Failed with its own reason on the
condition, and the host is untouched: nothing queued, no upgrade record or request, no secret in the status
or the Events, the operation kept (no TTL acted on), and the watcher still serving the next operation.

The real watcher runs against the test API server (watcher_fakes.Harness) serving our CRD loosened as an
older or hand-made one could be (no rules, no defaults, parameters an untyped map): the agent's own checks are
what stands between these inputs and the host. (Our own CRD refuses most of them at the API server already.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from watcher_fakes import Harness, crd_without_rules, wait_for

from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import mop
from unbounded_agent.reasons import Reason
from unbounded_agent.upgrade import record

SECRET = "mop-secret-token"
URL = f"https://releases.example/agent.tar.gz?sig={SECRET}"
IP, UNSUPPORTED = Reason.INVALID_PARAMETERS, Reason.UNSUPPORTED_OPERATION


def loose_crd(directory: Path) -> Path:
    path = crd_without_rules(directory)
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"]["parameters"] = {"x-kubernetes-preserve-unknown-fields": True}  # any JSON at all
        ttl = spec["properties"]["ttlSecondsAfterFinished"]
        for bound in ("minimum", "maximum", "format"):
            ttl.pop(bound, None)
    path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-mops")
    with Harness(tmp, crds=[loose_crd(tmp)]) as harness:
        harness.start()
        harness.synced()
        yield harness


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    spec: dict  # merged over {"machineRef": <this machine>, "operationKind": "AgentUpgrade"}
    reason: Reason
    words: str


def upgrade(**params) -> dict:
    return {"parameters": params}


ROWS = [
    Row("downloadURL of 9000 characters", upgrade(downloadURL="https://releases.example/" + "a" * 9000 + "?s=" + SECRET),
        IP, "URL is longer than 8192 characters"),
    Row("downloadURL is a number", upgrade(downloadURL=42), IP, "parameters must be strings: downloadURL"),
    Row("downloadURL is an object", upgrade(downloadURL={"url": URL}), IP, "parameters must be strings: downloadURL"),
    Row("downloadURL is null", upgrade(downloadURL=None), IP, "parameters must be strings: downloadURL"),
    Row("force is a boolean", upgrade(downloadURL=URL, force=True), IP, "parameters must be strings: force"),
    Row("sha256 is a list", upgrade(downloadURL=URL, sha256=["ab" * 32]), IP, "parameters must be strings: sha256"),
    Row("parameters is a list", {"parameters": [URL]}, IP, 'missing required parameter "downloadURL"'),
    Row("parameters is a string", {"parameters": URL}, IP, 'missing required parameter "downloadURL"'),
    Row("downloadURL is empty", upgrade(downloadURL=""), IP, 'missing required parameter "downloadURL"'),
    Row("downloadURL with user info", upgrade(downloadURL=f"https://agent:{SECRET}@releases.example/a.tar.gz"),
        IP, "must not contain user info"),
    Row("downloadURL with a newline (a forged status line)",
        upgrade(downloadURL=f"https://releases.example/a.tar.gz?s={SECRET}\nphase: Complete"), IP, "control characters"),
    Row("downloadURL with a right-to-left override", upgrade(downloadURL="https://releases.example/\u202ezg.rat.a"),
        IP, "control characters"),
    Row("downloadURL with a NUL byte", upgrade(downloadURL="https://releases.example/a\x00.tar.gz"), IP,
        "control characters"),
    Row("downloadURL with a unicode host", upgrade(downloadURL="https://релизы.example/a.tar.gz"), IP, "must be ASCII"),
    Row("downloadURL with a fullwidth dot host", upgrade(downloadURL="https://releases\uff0eexample/a.tar.gz"), IP,
        "must be ASCII"),
    Row("downloadURL over plain http", upgrade(downloadURL=f"http://releases.example/a.tar.gz?s={SECRET}"), IP,
        "plain http is refused"),
    Row("downloadURL of another scheme", upgrade(downloadURL="file:///etc/shadow"), IP, "URL scheme must be https"),
    Row("downloadURL with a fragment", upgrade(downloadURL="https://releases.example/a.tar.gz#" + SECRET), IP,
        "fragment"),
    Row("downloadURL with a negative port", upgrade(downloadURL="https://releases.example:-443/a.tar.gz"), IP,
        "not a valid URL"),
    Row("downloadURL with a port past 65535", upgrade(downloadURL="https://releases.example:4294967297/a.tar.gz"), IP,
        "not a valid URL"),
    Row("downloadURL with an IPv6 zone id", upgrade(downloadURL="https://[fe80::1%25eth0]/a.tar.gz"), IP,
        "not a valid host name or IP address"),
    Row("misspelt parameter (sha-256)", upgrade(downloadURL=URL, **{"sha-256": "ab" * 32}), IP,
        "unknown parameter(s) for AgentUpgrade: sha-256"),
    Row("ten thousand unknown parameters", upgrade(downloadURL=URL, **{f"p{i:05}": "x" for i in range(10000)}), IP,
        "unknown parameter(s) for AgentUpgrade: p00000, p00001, p00002, p00003, p00004, p00005, p00006, p00007, "
        "p00008, p00009 and 9990 more (allowed: downloadURL, force, sha256)"),
    Row("unknown parameter whose name forges a log line", upgrade(downloadURL=URL, **{"x\nreason=Succeeded": "1"}),
        IP, "unknown parameter(s) for AgentUpgrade: 'x\\nreason=Succeeded'"),
    Row("sha256 of 63 characters", upgrade(downloadURL=URL, sha256="a" * 63), IP, "64 hexadecimal"),
    Row("sha256 of 100000 characters", upgrade(downloadURL=URL, sha256="a" * 100000), IP, "64 hexadecimal"),
    Row("sha256 of another algorithm", upgrade(downloadURL=URL, sha256="sha512:" + "ab" * 64), IP, "64 hexadecimal"),
    Row("force is neither true nor false", upgrade(downloadURL=URL, force="yes please"), IP,
        'force must be "true" or "false"'),
    Row("negative ttlSecondsAfterFinished", {**upgrade(downloadURL="ftp://releases.example/a"),
                                              "ttlSecondsAfterFinished": -5}, IP, "URL scheme must be https"),
    Row("ttlSecondsAfterFinished past int64", {**upgrade(downloadURL="ftp://releases.example/a"),
                                               "ttlSecondsAfterFinished": 2**70}, IP, "URL scheme must be https"),
    Row("AgentReset with parameters", {"operationKind": "AgentReset", **upgrade(downloadURL=URL)}, IP,
        "unknown parameter(s) for AgentReset: downloadURL"),
    Row("machineRef and machineSelector both", {**upgrade(downloadURL=URL),
                                                "machineSelector": {"matchLabels": {"pool": "a"}}}, IP,
        "machineRef and machineSelector are both set"),
    Row("NodeReboot, which this agent does not do", {"operationKind": "NodeReboot"}, UNSUPPORTED, "NodeReboot"),
]


def host_state(h) -> dict:
    """What a refused operation must not have changed on the host: the queue, the upgrade's state, the bin dir."""
    def files(d: Path) -> list[str]:
        return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []

    state = Path(h.cfg.state_dir)
    return {"queued": files(h.spool.requests), "submitted": h.dispatcher.submitted(), "bin": files(Path(h.cfg.bin_dir)),
            "upgrade": [(state / f).exists() for f in (record.RECORD_FILE, record.REQUEST_FILE)]}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_hostile_operation_fails_with_its_reason_and_touches_nothing(h, row):
    name = "hostile-" + str(ROWS.index(row))
    before = host_state(h)
    spec = {"machineRef": h.cfg.machine_name, "operationKind": "AgentUpgrade", **row.spec}
    body = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation", "metadata": {"name": name},
            "spec": spec}
    h.admin.request("POST", kubeclient.MOP_PATH, body=body, content_type="application/json")
    h.wait_phase(name, "Failed")
    cond = h.condition(name)
    assert (cond["status"], cond["reason"]) == ("False", row.reason.value), cond
    assert row.words in cond["message"], cond["message"][:300]
    wait_for("the failure's Event", lambda: row.reason.value in h.event_reasons(name))
    op, events = h.get(name), h.events(name)
    assert len(op["status"]["message"]) <= 4096 and all(len(e["message"]) <= 4096 for e in events)
    assert SECRET not in json.dumps(op["status"]) + json.dumps(events)
    assert host_state(h) == before == {"queued": [], "submitted": [], "bin": [], "upgrade": [False, False]}
    # a negative or overflowing TTL is no reason to delete it (nor to stop the watcher): it is still there
    # after another whole pass of the watcher's loop
    h.settle()
    assert h.get(name) is not None and mop.phase(h.get(name)) == "Failed"


def test_the_table_is_long_enough_and_every_name_is_its_own():
    assert len(ROWS) >= 30 and len({r.name for r in ROWS}) == len(ROWS)
