"""Build and cache the Debian 12 root tree that test hosts boot from.

The tree is made once per package list and reused read-only: every test host
boots an overlay on top of it (see testhost.py). Building takes about a minute
and needs the network to reach the Debian mirror; booting from the cache does not.

    python3 tests/testhost_tree.py     # build (or find) the tree, print its path

The cache lives in /var/cache/unbounded-agent-tests (override with the
environment variable UNBOUNDED_TESTHOST_CACHE), one directory per cache key:
tree-<key>/root. A build runs in a scratch directory next to it and is renamed
into place only when complete, so an interrupted build never looks valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SUITE = "bookworm"
# Enough to boot systemd, run nested nspawn machines, make links and trust a test CA.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "iproute2",
    "systemd-container", "ca-certificates", "procps",
)
# The project's runtime dependencies.
RUNTIME_PACKAGES = (
    "python3-pystemd", "python3-pyroute2", "python3-requests",
    "python3-kubernetes", "python3-systemd", "python3-yaml",
)
# Bump when the way the tree is made changes, so old caches are not reused.
TREE_FORMAT = 2

DEFAULT_CACHE = Path("/var/cache/unbounded-agent-tests")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
TREE_HOSTNAME = "testhost"


def cache_key() -> str:
    text = "\n".join([SUITE, " ".join(BASE_PACKAGES), " ".join(RUNTIME_PACKAGES),
                      f"format {TREE_FORMAT}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_default() -> Path:
    return Path(os.environ.get("UNBOUNDED_TESTHOST_CACHE") or DEFAULT_CACHE)


def _apt_sources(etc_apt: Path):
    """Yield (uri, suites) for every 'deb' source configured in etc_apt."""
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for f in one_line:
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] != ["deb"]:
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # options, e.g. [arch=amd64 signed-by=...]
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = words[1:]
            if len(words) >= 2:
                yield words[0], [words[1]]
    for f in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        # deb822: paragraphs separated by blank lines, "Key: value" fields.
        for paragraph in f.read_text(errors="replace").split("\n\n"):
            fields = {}
            for line in paragraph.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
            if fields.get("enabled") == ["no"] or "deb" not in fields.get("types", []):
                continue
            for uri in fields.get("uris", []):
                yield uri, fields.get("suites", [])


def debian_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for the suite itself (not security)."""
    for uri, suites in _apt_sources(etc_apt):
        if SUITE in suites and "security" not in uri:
            return uri.rstrip("/")
    for uri, suites in _apt_sources(etc_apt):
        if any(s.startswith(SUITE) for s in suites) and "security" not in uri:
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_interrupt_handlers() -> None:
    """Make SIGTERM/SIGHUP unwind like Ctrl-C, so cleanup in finally blocks runs."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise_interrupt)


def _run(cmd: list[str], log: Path) -> None:
    """Run a build step, appending its output to log; raise with the log's tail on failure."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        # Its own process group: if the build is interrupted, all of the step goes too
        # (its dpkg runs must not go on writing into a tree being removed).
        step = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = step.wait()
        except BaseException:
            os.killpg(step.pid, signal.SIGKILL)
            step.wait()
            raise
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"test host tree build step failed (exit {rc}): {' '.join(cmd)}\n"
                           f"--- last lines of {log} ---\n{tail}")


def _in_tree(root: Path, args: list[str]) -> list[str]:
    """A command line running args inside root (not booted), with the host's network.

    systemd-nspawn rather than chroot: it mounts /proc, /sys and /dev privately and
    cleans them up even when killed. No host systemd is needed with these flags.
    """
    return ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--console=pipe",
            "--resolv-conf=replace-host", "--timezone=off", "--link-journal=no",
            "--setenv=DEBIAN_FRONTEND=noninteractive", "-D", str(root), *args]


def _remove_tree(path: Path) -> None:
    """Remove a scratch build dir, never crossing into a file system mounted below it."""
    if not path.exists():
        return
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _make_tree(root: Path, log: Path) -> None:
    mirror = debian_mirror()
    # A private mount namespace: whatever mmdebstrap mounts inside the target (/proc, /sys) goes away with
    # it even if the build is killed. mmdebstrap rather than debootstrap: apt resolves every package in one
    # step (the virtual packages debootstrap cannot) and fetches them in parallel, in half the time (25 s
    # against 55 s here). The merged-usr hook makes /usr merged as debootstrap does (usr-is-merged), not with
    # the usrmerge package and the perl it brings; the package set is debootstrap's plus the runtime ones.
    _run(["unshare", "--mount", "--propagation", "private",
          "mmdebstrap", "--variant=minbase", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
          f"--include={','.join(BASE_PACKAGES + RUNTIME_PACKAGES)}", SUITE, str(root), mirror], log)

    etc = root / "etc"
    # minbase has no /etc/hosts; without one Python cannot resolve localhost.
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (etc / "hostname").write_text(TREE_HOSTNAME + "\n")
    # The private network has no DNS; don't carry this machine's resolver along.
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text("")
    # Empty machine-id: each boot gets a fresh one instead of all hosts sharing one.
    (etc / "machine-id").write_text("")
    for lists in (root / "var/lib/apt/lists").glob("*"):
        if lists.is_file():
            lists.unlink()
    for f in (root / "var/log").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


def cached_tree(cache_dir: Path | None = None) -> Path | None:
    """The root of the cached tree if it has been built, else None."""
    root = (Path(cache_dir) if cache_dir else cache_dir_default()) / f"tree-{cache_key()}/root"
    return root if root.is_dir() else None


def build_tree(cache_dir: Path | None = None) -> Path:
    """Return the root of the cached test host tree, building it first if needed."""
    if cached_tree(cache_dir):
        return cached_tree(cache_dir)
    install_interrupt_handlers()
    cache_dir = Path(cache_dir) if cache_dir else cache_dir_default()
    key = cache_key()
    final = cache_dir / f"tree-{key}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One builder at a time (e.g. a CI pre-build racing a test session).
    with open(cache_dir / f"tree-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "root").is_dir():
            return final / "root"
        for stale in cache_dir.glob(f"build-{key}-*"):
            _remove_tree(stale)
        scratch = cache_dir / f"build-{key}-{os.getpid()}"
        scratch.mkdir()
        try:
            _make_tree(scratch / "root", scratch / "build.log")
            scratch.rename(final)
        except BaseException:
            _remove_tree(scratch)
            raise
    return final / "root"


def main() -> int:
    started = time.monotonic()
    root = build_tree()
    print(root)
    print(f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
