"""Hostile inputs on a real host, end to end, where "the host unchanged" is more than a temp dir: the .deb's
units, the sandboxed steps, the running daemon, real disks that fill. Each row is what a user types
(`unbounded-agent upgrade URL --wait`, or `kubectl apply` of a MachineOperation) and ends in its own reason:
in the CLI's exit code, the record and the operation's condition. The links and the binaries they select,
the daemon (same process), and the absence of temporary files are checked after every row.

The fast table (tests/unit/test_hostile_inputs.py) covers many more inputs in-process; these are the ones
whose harm would only show on a host: a disk filling under the state dir or the bin dir (small tmpfs
mounts inside the host), servers that stall or trickle through the real sandboxed stage unit, an agent whose
running daemon claims another version than it printed, and a MachineOperation through the watcher.

Bounds are set per row in the agent's config so that the hostile behaviour (a stall of 600 s, a trickle of
one byte per 0.1 s) is far beyond the bound that must stop it, and far from the other bound.
"""

import json
import os

import pytest
import releases
from archives import valid_archive
from mop_host import AGENT_CONFIG, KubeLink, mop, wait_until
from upgrade_host import CONFIG, OPS, STATE, TEST_CONFIG, look, prepare, queued, upgrade

pytestmark = pytest.mark.testhost

SECRET = "hostile-host-secret"
BIN = f"{STATE}/bin"
EXIT = {"DownloadFailed": 10, "InvalidArchive": 12, "InsufficientSpace": 13, "DaemonFailed": 15}


@pytest.fixture(scope="module")
def host(testhost_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-releases")
    files = {
        "good": valid_archive(out / "good.tar.gz", b"#!/bin/sh\necho unbounded-agent 7.0.0\n" + b"#" * 4096 + b"\n"),
        "big": valid_archive(out / "big.tar.gz", b"#!/bin/sh\n" + os.urandom(4 << 20)),
        "understated": _understated(out / "understated.tar.gz", 8 << 20),
        "liar": releases.script_release(out / "liar.tar.gz", version="9.0.0", daemon="liar"),
    }
    with testhost_factory("hostile", installed=True) as h:
        prepare(h)
        h.urls = {name: h.serve(path, f"{name}.tar.gz") for name, path in files.items()}
        h.before = look(h)
        yield h


def _understated(path, size):
    """An agent of size bytes whose gzip trailer claims 100: only the extraction finds out how big it is."""
    valid_archive(path, b"#!/bin/sh\n" + bytes(size))
    data = bytearray(path.read_bytes())
    data[-4:] = (100).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def configure(host, **bounds) -> None:
    """The test config with these bounds (read by each step's unit when it starts)."""
    host.write(CONFIG, TEST_CONFIG + "".join(f"{k}: {v}\n" for k, v in bounds.items()))


def record(host) -> dict:
    # read inside the host: a row's tmpfs over the state dir is not visible from outside
    return json.loads(host.run(["cat", f"{STATE}/upgrade.json"]).stdout)


def assert_unchanged(host, *, daemon_restarted=False) -> None:
    after, before = look(host), host.before
    for key in ("current", "last_good", "current_sha", "version", "daemon_state"):
        assert after[key] == before[key], (key, after[key], before[key])
    if not daemon_restarted:
        assert (after["daemon_pid"], after["daemon_invocation"]) == (before["daemon_pid"], before["daemon_invocation"])
    assert after["hidden_files"] == [] and queued(host) == []


# -- small disks inside the host ---------------------------------------------------------------------------


def _bytes_in(host, directory: str) -> int:
    return int(host.run(["du", "-sbL", directory]).stdout.split()[0])


def _room(host) -> int:
    """Free room a small disk keeps: the stage's check before the download (one more binary of today's size)
    passes, and the 4 and 8 MiB archives below still fill it."""
    return int(host.run(["stat", "-Lc", "%s", f"{BIN}/unbounded-agent-current"]).stdout) + (512 << 10)


def small_state_dir(host) -> str:
    """A tmpfs over the state dir with room for its files and _room() more; the bin dir inside it bound
    back from the real disk. Returns the teardown script."""
    size = _bytes_in(host, STATE) - _bytes_in(host, BIN) + _room(host)
    host.sh(f"""
mkdir -p /var/tmp/real-state /var/tmp/real-bin
mount --bind {STATE} /var/tmp/real-state
mount --bind {BIN} /var/tmp/real-bin
mount -t tmpfs -o size={size},mode=0755 tmpfs {STATE}
cd /var/tmp/real-state && for f in * .[!.]*; do [ -e "$f" ] && [ "$f" != bin ] && cp -a "$f" {STATE}/; done; true
mkdir {STATE}/bin && mount --bind /var/tmp/real-bin {STATE}/bin
""")
    # the failure's record is kept on the real disk when the tmpfs goes
    return f"""
umount {STATE}/bin
cp -a {STATE}/upgrade.json /var/tmp/real-state/
umount {STATE} && umount /var/tmp/real-bin && umount /var/tmp/real-state
"""


def small_bin_dir(host) -> str:
    """A tmpfs over the bin dir holding its links and slots, with _room() free."""
    size = _bytes_in(host, BIN) + _room(host)
    host.sh(f"""
rm -rf /var/tmp/bin-copy && cp -a {BIN} /var/tmp/bin-copy
mount -t tmpfs -o size={size},mode=0755 tmpfs {BIN}
cp -a /var/tmp/bin-copy/. {BIN}/
""")
    # a failed stage writes nothing there: the real bin dir under the tmpfs is what it was
    return f"umount {BIN} && rm -rf /var/tmp/bin-copy"


# -- the table ---------------------------------------------------------------------------------------------

# (name, URL builder, bounds in the config, disk set-up, reason, words in the message)
ROWS = [
    ("server stalls after the headers", lambda h: h.https_url(f"stall-body/good.tar.gz?sig={SECRET}"),
     {"readTimeoutSeconds": 3, "downloadDeadlineSeconds": 300}, None, "DownloadFailed", "no data for 3 s (read timeout)"),
    ("server trickles slower than the deadline allows", lambda h: h.https_url(f"trickle/good.tar.gz?sig={SECRET}"),
     {"readTimeoutSeconds": 60, "downloadDeadlineSeconds": 4}, None, "DownloadFailed",
     "did not finish within the 4 s deadline"),
    ("Content-Length shorter than the body", lambda h: h.https_url(f"short-length/good.tar.gz?sig={SECRET}"), {},
     None, "InvalidArchive", "gzip stream is truncated"),
    ("Content-Length longer than the body", lambda h: h.https_url(f"truncate/good.tar.gz?sig={SECRET}"), {}, None,
     "DownloadFailed", "the connection closed after"),
    ("redirect loop", lambda h: h.https_url(f"loop/0?sig={SECRET}"), {}, None, "DownloadFailed",
     "more than 5 redirects"),
    ("state dir fills during the download", lambda h: h.urls["big"] + f"?sig={SECRET}", {}, small_state_dir,
     "InsufficientSpace", "cannot store the downloaded archive: No space left on device"),
    ("bin dir fills during the extraction", lambda h: h.urls["understated"] + f"?sig={SECRET}", {}, small_bin_dir,
     "InsufficientSpace", "No space left on device"),
]


@pytest.mark.parametrize("name,url,bounds,disk,reason,words", ROWS, ids=[r[0] for r in ROWS])
def test_a_hostile_release_ends_in_its_reason_and_leaves_the_host_unchanged(host, name, url, bounds, disk, reason,
                                                                           words):
    configure(host, **bounds)
    teardown = disk(host) if disk else None
    try:
        r = upgrade(host, url(host), "--wait")
        rec = record(host)
    finally:
        if teardown:
            host.sh(teardown)
        configure(host)
    assert r.returncode == EXIT[reason], r.stdout + r.stderr
    assert reason in r.stderr and words in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert rec["phase"] == "failed" and rec["reason"] == reason and words in rec["message"]
    assert_unchanged(host)
    assert SECRET not in r.stdout + r.stderr + json.dumps(rec)
    assert host.run(["findmnt", "-n", STATE], check=False).returncode != 0  # the small disks are gone again


def test_an_agent_whose_daemon_claims_another_version_is_rolled_back(host):
    r = upgrade(host, host.urls["liar"], "--wait")
    assert r.returncode == EXIT["DaemonFailed"], r.stdout + r.stderr
    rec = record(host)
    assert rec["phase"] == "rolled-back" and rec["reason"] == "DaemonFailed", rec
    assert rec["failure"]["cause"] == "VersionMismatch"
    assert "claims version '0.0.1-liar'" in rec["message"] and "printed '9.0.0'" in rec["message"]
    assert_unchanged(host, daemon_restarted=True)
    quarantine = json.loads(host.read(f"{STATE}/quarantine.json"))
    assert rec["to"]["digest"] in json.dumps(quarantine)


def test_a_machine_operation_whose_release_server_stalls_fails_and_leaves_the_host_unchanged(host, tmp_path):
    """Through the watcher, the queue and the dispatcher: `kubectl apply`, then Failed/DownloadFailed."""
    kube = KubeLink.start(host, tmp_path)
    try:
        kube.configure_agent(host, config=AGENT_CONFIG + "readTimeoutSeconds: 3\ndownloadDeadlineSeconds: 300\n")
        host.before = look(host)  # the daemon was restarted to take the kubeconfig
        url = host.https_url(f"stall-body/good.tar.gz?sig={SECRET}")
        kube.apply(mop("stalled", host.name, "AgentUpgrade", downloadURL=url))
        wait_until("the operation to fail",
                   lambda: ((kube.get("stalled") or {}).get("status") or {}).get("phase") == "Failed", timeout=240)
        cond = kube.condition("stalled")
        assert (cond["status"], cond["reason"]) == ("False", "DownloadFailed"), cond
        assert "no data for 3 s (read timeout)" in cond["message"]
        assert SECRET not in json.dumps(kube.get("stalled")["status"])  # the spec has it: the user wrote it there
        assert_unchanged(host)
        assert not any(host.path(f"{OPS}/spool/requests").iterdir())
    finally:
        kube.stop()
