"""The session layer: the .deb installed once on the cached tree, for test hosts that only need the package
installed (testhost_factory(installed=True)), and a test CA the layer's hosts trust.

Installing the .deb on every host cost each one about 1.7 s of CPU (dpkg, py3compile, four daemon-reloads
running our generator), and trusting a CA of its own another 1.2 s (update-ca-certificates). A layer does
both once: dpkg -i runs in an overlay on the tree with no systemd as PID 1 (systemd-nspawn without --boot),
so the maintainer scripts enable the units but start none, as in an image build; a host then boots with
the layer's upper directory as a lower layer above the tree, and its systemd starts the daemon, the path
unit and the metrics at boot (and the dispatcher once, as at every boot), as after an install and a reboot.

    layer = acquire(deb, tree)    # built if missing; held (shared) until this process exits

The cache: <cache>/layers/layer-<key>/{root,pki} beside layer-<key>.lock, where the key names the tree,
the .deb's SHA-256, this file's format and the week (the layer's certificates outlive every run that uses
it). A build runs in a scratch directory renamed into place when complete, one build at a time on the
machine. After a build, the layers of other keys are removed unless a process holds theirs: every process
using a layer holds a shared lock on its lock file, a remover takes it exclusively without waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import testhost_tree

LAYER_FORMAT = 1  # bump when the way a layer is made changes
PKI_DAYS = 16  # a layer is used only in the week it was built in
WEEK = 7 * 86400
TRUSTED_CA = "/usr/local/share/ca-certificates/unbounded-agent-test-ca.crt"  # where test hosts trust a test CA
PKGS_DIR = "/var/tmp/pkgs"  # where TestHost.install_deb puts a package, too
DAEMON = "unbounded-agent-daemon.service"
DISPATCH = "unbounded-agent-dispatch.service"
SETTLE_SECONDS = 60
ATTEMPTS = 5

_held: dict[Path, tuple[Layer, int]] = {}  # layer dir -> the layer this process uses, its lock's fd


@dataclass(frozen=True)
class Layer:
    root: Path  # the lower layer to stack above the tree
    pki: Path  # ca.crt (trusted in root), server.crt and server.key for localhost

    def settle(self, host) -> None:
        """After a boot from the layer: the host as right after `dpkg -i`. The daemon is up (its start was a
        boot job, done when the boot is), and the dispatcher's run at boot, with nothing queued, has ended:
        a run still going when a test arms a hold point or queues a request would take it unheld."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            state = _show(host, DISPATCH, "ActiveState", "Result")
            if state["ActiveState"] in ("inactive", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        daemon = _show(host, DAEMON, "ActiveState")
        if daemon["ActiveState"] != "active" or state != {"ActiveState": "inactive", "Result": "success"}:
            raise RuntimeError(f"test host {host.name} booted from the layer: {DAEMON} {daemon}, {DISPATCH} {state}\n"
                               + host.journal(lines=80))


def _show(host, unit: str, *props: str) -> dict[str, str]:
    out = host.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def layer_key(deb: Path, now: float | None = None) -> str:
    h = hashlib.sha256()
    with open(deb, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    week = int((time.time() if now is None else now) // WEEK)
    text = f"tree {testhost_tree.cache_key()}\ndeb {h.hexdigest()}\nformat {LAYER_FORMAT}\nweek {week}\n"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def acquire(deb: Path, tree: Path, cache_dir: Path | None = None,
            install: Callable[[Path, Path, Path, Path], None] | None = None) -> Layer:
    """The layer of deb on tree, built first if missing, and held by this process until it exits."""
    layers = (Path(cache_dir) if cache_dir else testhost_tree.cache_dir_default()) / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    final = layers / f"layer-{layer_key(deb)}"
    if final in _held:
        return _held[final][0]
    for _ in range(ATTEMPTS):
        fd = _lock(_lock_path(final), fcntl.LOCK_SH)
        if fd is not None and (final / "root").is_dir():
            _held[final] = (Layer(final / "root", final / "pki"), fd)
            return _held[final][0]
        if fd is not None:
            os.close(fd)
        _build(final, deb, tree, install or _install)
    raise RuntimeError(f"the test host layer {final} was removed again each time it was built")


def release_all() -> None:
    """Stop holding the layers this process uses (for tests: a process's locks go when it exits)."""
    for _, fd in _held.values():
        os.close(fd)
    _held.clear()


def _lock_path(layer: Path) -> Path:
    return layer.with_name(layer.name + ".lock")


def _lock(path: Path, how: int) -> int | None:
    """Lock file path (made if missing). None if LOCK_NB was asked and another holds it, or if the file is
    not at path any more (its remover unlinked it between our open and our lock): the caller looks again."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, how)
        held, now = os.fstat(fd), os.stat(path)
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _build(final: Path, deb: Path, tree: Path, install: Callable[[Path, Path, Path, Path], None]) -> None:
    layers = final.parent
    testhost_tree.install_interrupt_handlers()
    with open(layers / "build.lock", "w") as build_lock:  # one build or removal at a time on this machine
        fcntl.flock(build_lock, fcntl.LOCK_EX)
        if (final / "root").is_dir():
            return
        for stale in (*layers.glob("build-*"), *layers.glob("trash-*")):  # of builds and removals cut short
            testhost_tree._remove_tree(stale)
        scratch = layers / f"build-{final.name}-{os.getpid()}"
        scratch.mkdir()
        try:
            make_test_pki(scratch / "pki", days=PKI_DAYS)
            for name in ("ca.key", "ca.srl", "server.csr", "server.ext"):  # the layer's hosts need no more
                (scratch / "pki" / name).unlink()
            (scratch / "root").mkdir()
            install(tree, deb, scratch / "pki" / "ca.crt", scratch)
            scratch.rename(final)
        except BaseException:
            testhost_tree._remove_tree(scratch)
            raise
        _remove_others(layers, keep=final)


def _remove_others(layers: Path, keep: Path) -> None:
    """Remove every layer but keep that no process holds (nor waits to use once it is built)."""
    for name in sorted({p.name.removesuffix(".lock") for p in layers.glob("layer-*")} - {keep.name}):
        layer = layers / name
        fd = _lock(_lock_path(layer), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            continue  # in use
        try:
            if layer.exists():
                trash = layers / f"trash-{name}-{os.getpid()}"
                layer.rename(trash)  # gone at once for anyone looking; removed at leisure
                testhost_tree._remove_tree(trash)
            _lock_path(layer).unlink()
        finally:
            os.close(fd)


# The install, in a mount namespace of its own: the overlay goes with it even if the build is killed.
INSTALL_SCRIPT = """\
set -e
tree=$1 upper=$2 work=$3 merged=$4 deb=$5 ca=$6 machine=$7 pkgs=$8 trusted=$9
mount -t overlay overlay -o "lowerdir=$tree,upperdir=$upper,workdir=$work" "$merged"
mkdir -p "$merged$pkgs" "$(dirname "$merged$trusted")"
cp "$deb" "$merged$pkgs/"
cp "$ca" "$merged$trusted"
exec systemd-nspawn --quiet --register=no --keep-unit --console=pipe --private-network --resolv-conf=off \\
    --timezone=off --link-journal=no --setenv=DEBIAN_FRONTEND=noninteractive --machine="$machine" -D "$merged" \\
    /bin/sh -ec 'dpkg -i "$1"; update-ca-certificates' sh "$pkgs/$(basename "$deb")"
"""


def _install(tree: Path, deb: Path, ca: Path, scratch: Path) -> None:
    """dpkg -i deb and trust ca in an overlay on tree, with no systemd running: scratch/root gets the changes."""
    work, merged = scratch / "work", scratch / "merged"
    work.mkdir()
    merged.mkdir()
    machine = f"unbounded-layer-{os.getpid()}"
    try:
        testhost_tree._run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", INSTALL_SCRIPT,
                            "install", str(tree), str(scratch / "root"), str(work), str(merged), str(deb), str(ca),
                            machine, PKGS_DIR, TRUSTED_CA], scratch / "build.log")
    finally:
        with contextlib.suppress(OSError):  # nspawn leaves it when /run is not a tmpfs
            Path("/run/systemd/nspawn/propagate", machine).rmdir()
    testhost_tree._remove_tree(work)
    merged.rmdir()


def make_test_pki(pki: Path, days: int = 7) -> None:
    """A throwaway CA and a server certificate for localhost and 127.0.0.1."""
    pki.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days),
            "-subj", "/CN=unbounded-agent test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (pki / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", str(days), "-extfile", "server.ext", "-out", "server.crt")
