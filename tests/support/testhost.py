"""A real systemd host for tests: Debian 12 booted in systemd-nspawn.

    with boot_testhost(name="testhost") as host:
        host.run(["systemctl", "start", "unbounded-agent-daemon.service"])
        url = host.serve(dist / "unbounded-agent-linux-amd64.tar.gz")

Each boot gets a fresh overlay on top of the cached read-only tree
(testhost_tree.py), so nothing a test does survives the host; a host booted
with a layer (testhost_layer.py: the .deb installed, a test CA trusted) has it
between the two. The host has a private network namespace (only `lo`, no DNS)
and its own systemd 252 as PID 1; commands run inside with nsenter, so no host
systemd or D-Bus is needed.

Needs root, systemd-nspawn (package systemd-container), mmdebstrap, openssl and
overlayfs. Files are exchanged through the overlay's merged directory; note that
nspawn mounts fresh file systems on /tmp, /run, /dev, /proc and /sys inside the
host, so those are not visible from outside (path() refuses them; use run()).

Teardown always happens: the context manager's finally, an atexit hook, and
SIGTERM/SIGHUP turned into KeyboardInterrupt. A host left behind by a killed test
process is reaped by the next boot (reap_stale).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import testhost_tree
from testhost_layer import TRUSTED_CA, Layer, make_test_pki

WORK_ROOT = Path("/var/tmp/unbounded-agent-testhosts")  # not /tmp: may be a small tmpfs
BOOT_TIMEOUT = 60
POWEROFF_TIMEOUT = 30
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HTTPS_PORT = 8443
HTTP_PORT = 8080
RELEASES_DIR = "/srv/releases"
HTTPS_UNIT = "testhost-https.service"
# Mounted fresh inside the host by nspawn: writing there from outside is invisible inside.
PRIVATE_MOUNTS = ("/tmp", "/run", "/dev", "/proc", "/sys")

_live_hosts: list[TestHost] = []


class TestHostError(RuntimeError):
    """The test host could not boot, or could not be torn down cleanly."""


class CommandFailed(subprocess.CalledProcessError):
    """A command inside the test host exited non-zero; str() shows all of it."""

    def __str__(self) -> str:
        return (f"command {self.cmd!r} in test host exited {self.returncode}\n"
                f"--- stdout ---\n{self.stdout or ''}--- stderr ---\n{self.stderr or ''}")


def _mount_points_under(path: Path) -> list[str]:
    """Mount points at or below path in our mount namespace, deepest first."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline, backslash octal-escaped.
            point = line.split()[4]
            for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(esc, ch)
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _unmount_all_under(path: Path) -> None:
    for point in _mount_points_under(path):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)


def _process_start_time(pid: int) -> str | None:
    """Start time of pid (clock ticks since boot), to tell a process from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _alive(pid: int, start_time: str | None) -> bool:
    return start_time is not None and _process_start_time(pid) == start_time


def _kill(pid: int, start_time: str | None, sig: int) -> None:
    if _alive(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@atexit.register
def _stop_live_hosts() -> None:
    for host in list(_live_hosts):
        with contextlib.suppress(Exception):
            host.stop()


def _remove_nspawn_leftovers(machine: str) -> None:
    # nspawn leaves this empty directory behind when /run is not a tmpfs.
    with contextlib.suppress(OSError):
        Path("/run/systemd/nspawn/propagate", machine).rmdir()
    for group in host_cgroups(machine):
        _remove_cgroup(group)


def _cgroup_hierarchies() -> list[tuple[Path, str]]:
    """(mount point, this process's path in it) of the hierarchies systemd tracks units in: the named v1
    hierarchy "systemd" and the unified (v2) one, whichever are mounted."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "name=systemd":
                mount = Path("/sys/fs/cgroup/systemd")
            elif controllers == "":
                mount = next((m for m in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
                              if (m / "cgroup.controllers").exists()), None)
            else:
                continue
            if mount is not None and (mount / "cgroup.procs").exists():
                found.append((mount, path))
    return found


def host_cgroups(machine: str) -> list[Path]:
    """The cgroups of one test host's nspawn, one per hierarchy: a child of the test process's own cgroup.

    Each host needs its own. nspawn (--keep-unit) puts the container under <its cgroup>/payload, and the
    host's systemd makes <that>/system.slice/<unit> for each unit: hosts started from one cgroup would
    share those directories, and one host stopping or restarting a unit would remove or kill the cgroup
    that another host's unit of the same name is being started in ("219/CGROUP Failed to attach to
    cgroup", "Failed to kill control group").
    """
    return [mount / path.lstrip("/") / f"unbounded-testhost-{machine}" for mount, path in _cgroup_hierarchies()]


def _remove_cgroup(group: Path) -> None:
    """Remove an emptied cgroup and the ones the host's systemd made below it (deepest first)."""
    if not group.is_dir():
        return
    for sub in sorted((d for d in group.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        group.rmdir()


def reap_stale(work_root: Path = WORK_ROOT) -> None:
    """Tear down hosts whose owning test process died without cleaning up (e.g. SIGKILL)."""
    if not work_root.is_dir():
        return
    for workdir in work_root.iterdir():
        try:
            owner_pid, owner_start = (workdir / "owner").read_text().split()
        except (OSError, ValueError):
            continue
        if _alive(int(owner_pid), owner_start):
            continue
        for process in ("nspawn", "init"):  # init: the host's PID 1, killing all inside
            with contextlib.suppress(OSError, ValueError):
                pid, start_time = (workdir / process).read_text().split()
                _kill(int(pid), start_time, signal.SIGKILL)
        _unmount_all_under(workdir)
        if not _mount_points_under(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        _remove_nspawn_leftovers(workdir.name.rsplit("-", 1)[0])


class TestHost:
    """One booted test host. Use boot_testhost() rather than calling start/stop."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str, tree: Path, layer: Layer | None = None):
        self.name = name  # the host name inside, hence the agent's machine name
        # nspawn's name for it: unique per test process, so parallel test runs never share one
        self.machine = f"{name}-{os.getpid()}"
        self.tree = Path(tree)
        self.layer = layer
        self.workdir: Path | None = None
        self.merged: Path | None = None  # the host's / as seen from outside
        self.console_log: Path | None = None
        self.nspawn: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.boot_seconds: float | None = None
        self.boot_state: str | None = None  # "running" or "degraded"
        self.final_journal: str | None = None  # journal tail captured at teardown
        self._init_start: str | None = None
        self._https_started = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        # SIGTERM/SIGHUP unwind like Ctrl-C, so finally blocks and pytest teardown run.
        testhost_tree.install_interrupt_handlers()
        reap_stale()
        WORK_ROOT.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.machine}-", dir=WORK_ROOT))
        me = os.getpid()
        (self.workdir / "owner").write_text(f"{me} {_process_start_time(me)}\n")
        _live_hosts.append(self)
        try:
            self._mount_overlay()
            self._boot()
            if self.layer is not None:
                self.layer.settle(self)
        except BaseException:
            self.stop()
            raise

    def _mount_overlay(self) -> None:
        upper, work, self.merged = (self.workdir / d for d in ("upper", "work", "merged"))
        for d in (upper, work, self.merged):
            d.mkdir()
        lower = f"{self.layer.root}:{self.tree}" if self.layer else str(self.tree)  # the top one first
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}",
                        str(self.merged)], check=True, capture_output=True, text=True)
        # Per-boot identity: the host name is the machine name (DESIGN: machineName default).
        self.write("/etc/hostname", self.name + "\n")
        self.write("/etc/hosts", f"127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {self.name}\n")

    def _boot(self) -> None:
        self.console_log = self.workdir / "console.log"
        started = time.monotonic()
        # nspawn starts in a cgroup of this host's own (see host_cgroups): the shell moves itself there,
        # then becomes nspawn.
        groups = host_cgroups(self.machine)
        for group in groups:
            group.mkdir(exist_ok=True)
        enter = "".join(f'echo $$ > "{g}/cgroup.procs" && ' for g in groups)
        with open(self.console_log, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["/bin/sh", "-c", f'{enter}exec "$@"', "nspawn",
                 "systemd-nspawn", "-D", str(self.merged), "--boot", "--register=no",
                 "--keep-unit", "--private-network", f"--machine={self.machine}",
                 "--console=pipe", "--link-journal=no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # Ctrl-C must not reach it; teardown decides
        (self.workdir / "nspawn").write_text(
            f"{self.nspawn.pid} {_process_start_time(self.nspawn.pid)}\n")
        deadline = started + BOOT_TIMEOUT
        self._find_init(deadline)
        self.boot_state = self._wait_booted(deadline)
        self.boot_seconds = time.monotonic() - started

    def _find_init(self, deadline: float) -> None:
        """The host's PID 1, seen from outside: nspawn's child running systemd."""
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                self._boot_failed(f"systemd-nspawn exited {self.nspawn.returncode}")
            for pid in _children(self.nspawn.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        self.init_pid, self._init_start = pid, _process_start_time(pid)
                        (self.workdir / "init").write_text(f"{pid} {self._init_start}\n")
                        return
            time.sleep(0.05)
        self._boot_failed("systemd did not start in the container")

    def _wait_booted(self, deadline: float) -> str:
        state = ""
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                self._boot_failed(f"systemd-nspawn exited {self.nspawn.returncode}")
            try:
                # Fails with a connection error until PID 1 listens; then blocks until boot ends.
                result = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                                  timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return state
            # "offline" only means PID 1 does not listen yet: retry. These will not improve:
            if state in ("maintenance", "stopping"):
                break
            time.sleep(0.1)
        self._boot_failed(f"not booted within {BOOT_TIMEOUT} s (state {state!r})")

    def _boot_failed(self, why: str) -> NoReturn:
        tail = "\n".join(self.console_log.read_text(errors="replace").splitlines()[-60:])
        raise TestHostError(f"test host {self.name}: {why}\n--- console ---\n{tail}")

    def power_cycle(self, hard: bool = True) -> None:
        """Stop the host and boot it again on the same overlay: what it wrote stays.

        hard=True is a power loss: every process in the host is SIGKILLed at once, nothing shuts
        down cleanly. hard=False is an orderly poweroff first. Transient units (the HTTPS server)
        are gone afterwards, as after any boot; serve() starts the server again.
        """
        self._halt(hard)
        _remove_nspawn_leftovers(self.machine)
        self.init_pid = self._init_start = None
        self._https_started = False
        self._boot()

    def _halt(self, hard: bool) -> None:
        """End the container: an orderly poweroff (hard=False) or everything SIGKILLed at once."""
        if hard and self.init_pid is not None:  # the host's processes first: nothing runs on
            _kill(self.init_pid, self._init_start, signal.SIGKILL)
        if self.nspawn is not None and self.nspawn.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if hard:
                    os.killpg(self.nspawn.pid, signal.SIGKILL)
                else:  # nspawn turns SIGTERM into an orderly poweroff of the host (about 1 s)
                    self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=POWEROFF_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait()
        if self.init_pid is not None:
            # Killing PID 1 of the container kills everything in its PID namespace.
            _kill(self.init_pid, self._init_start, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.init_pid is not None and _alive(self.init_pid, self._init_start)

    def stop(self) -> None:
        """Keep the journal's tail, kill the host, unmount and remove the overlay. Idempotent.

        No orderly poweroff: the host is thrown away, and its shutdown waited up to POWEROFF_TIMEOUT for
        processes that ignore SIGTERM (20 s on average over a suite run, the test's worker idle meanwhile)."""
        if self.running:
            with contextlib.suppress(Exception):
                self.final_journal = self.journal(lines=200)
        if self.init_pid is not None:  # everything in its PID namespace dies with it; nspawn reaps it and exits
            _kill(self.init_pid, self._init_start, signal.SIGKILL)
        self._halt(hard=False)
        if self.workdir is not None:
            _unmount_all_under(self.workdir)
            leaked = _mount_points_under(self.workdir)
            if leaked:
                raise TestHostError(f"test host {self.name}: still mounted: {leaked}")
            shutil.rmtree(self.workdir, ignore_errors=True)
        _remove_nspawn_leftovers(self.machine)
        # Only now: if teardown itself was interrupted, the atexit hook tries again.
        if self in _live_hosts:
            _live_hosts.remove(self)

    # -- commands ----------------------------------------------------------------------

    def run(self, args: list[str], check: bool = True, timeout: float = 120,
            input: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run args inside the host (all its namespaces), as root, in text mode.

        The environment is a clean one (PATH, LANG, HOME) plus env; nothing of the
        test process leaks in. On timeout the whole command is killed.
        """
        if not self.running:
            raise TestHostError(f"test host {self.name} is not running")
        full_env = {"PATH": PATH_INSIDE, "LANG": "C.UTF-8", "HOME": "/root",
                    "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", **(env or {})}
        cmd = ["nsenter", "-t", str(self.init_pid), "-a", *map(str, args)]
        proc = subprocess.Popen(
            cmd, env=full_env, text=True, encoding="utf-8", errors="replace",
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)  # its own process group, so a timeout kills all of it
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(list(args), timeout, stdout, stderr) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        result = subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, result.args, stdout, stderr)
        return result

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-c", script], **kw)

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        """The last lines of the host's journal (of one unit, if given)."""
        if not self.running:
            return self.final_journal or ""
        args = ["journalctl", "--no-pager", "--lines", str(lines)]
        if unit:
            args += ["--unit", unit]
        result = self.run(args, check=False, timeout=30)
        return result.stdout + result.stderr

    # -- files -------------------------------------------------------------------------

    def path(self, p: str | os.PathLike) -> Path:
        """The outside path of in-host path p.

        Absolute symlinks inside the host are not resolved against it; /tmp, /run,
        /dev, /proc and /sys are the host's own mounts and are refused.
        """
        p = "/" + str(p).lstrip("/")
        for private in PRIVATE_MOUNTS:
            if p == private or p.startswith(private + "/"):
                raise ValueError(f"{p} is on a mount private to the test host; use run()")
        return self.merged / p.lstrip("/")

    def write(self, dest: str, data: str | bytes, mode: int | None = None) -> Path:
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        target.write_bytes(data)
        if mode is not None:
            target.chmod(mode)
        return target

    def put(self, src: str | os.PathLike, dest: str, mode: int | None = None) -> Path:
        """Copy an outside file into the host (keeping its mode unless mode is given)."""
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)
        if mode is not None:
            target.chmod(mode)
        return target

    def read(self, p: str) -> str:
        return self.path(p).read_text()

    def install_deb(self, deb: str | os.PathLike, check: bool = True
                    ) -> subprocess.CompletedProcess:
        dest = f"/var/tmp/pkgs/{Path(deb).name}"
        self.put(deb, dest)
        return self.run(["dpkg", "-i", dest], check=check,
                        env={"DEBIAN_FRONTEND": "noninteractive"})

    # -- HTTPS server ------------------------------------------------------------------

    def start_https(self) -> None:
        """Start the file server (HTTPS :8443, HTTP :8080) with a CA the host trusts."""
        if self._https_started:
            return
        if self.layer is not None:
            pki = self.layer.pki  # its CA is trusted in the layer
        else:
            pki = self.workdir / "pki"
            make_test_pki(pki)
            # Trusted system-wide: Debian's python3-requests uses the system bundle.
            self.put(pki / "ca.crt", TRUSTED_CA)
            self.run(["update-ca-certificates"])
        self.put(pki / "server.crt", "/opt/testhost/tls/server.crt")
        self.put(pki / "server.key", "/opt/testhost/tls/server.key", mode=0o600)
        self.put(Path(__file__).with_name("https_server.py"), "/opt/testhost/https_server.py")
        self.path(RELEASES_DIR).mkdir(parents=True, exist_ok=True)
        # A transient service of the host's systemd: it outlives any test command,
        # logs to the host's journal, and Type=notify means it listens when this returns.
        self.run(["systemd-run", f"--unit={HTTPS_UNIT}", "--property=Type=notify",
                  "--property=NotifyAccess=main",
                  "/usr/bin/python3", "/opt/testhost/https_server.py",
                  "--dir", RELEASES_DIR, "--port", str(HTTPS_PORT),
                  "--http-port", str(HTTP_PORT),
                  "--cert", "/opt/testhost/tls/server.crt",
                  "--key", "/opt/testhost/tls/server.key"])
        self._https_started = True

    def https_url(self, name: str) -> str:
        """URL, as seen inside the host, of RELEASES_DIR/name (or of a test path)."""
        self.start_https()
        return f"https://localhost:{HTTPS_PORT}/{name.lstrip('/')}"

    def http_url(self, name: str) -> str:
        self.start_https()
        return f"http://localhost:{HTTP_PORT}/{name.lstrip('/')}"

    def serve(self, src: str | os.PathLike, name: str | None = None) -> str:
        """Publish an outside file on the host's HTTPS server; return its URL."""
        name = name or Path(src).name
        self.put(src, f"{RELEASES_DIR}/{name}")
        return self.https_url(name)


@contextlib.contextmanager
def boot_testhost(name: str = "testhost", tree: Path | None = None, layer: Layer | None = None) -> Iterator[TestHost]:
    """Boot a fresh test host from tree (default: the cached tree, built if missing), with layer above it."""
    host = TestHost(name, tree or testhost_tree.build_tree(), layer)
    host.start()
    try:
        yield host
    finally:
        host.stop()


NESTED_NSPAWN = """\
[Exec]
Boot=no
Parameters=/usr/bin/sleep infinity

[Files]
BindReadOnly=/usr

[Network]
VirtualEthernet=no
Private=no
"""


def make_nested_machine(host: TestHost, name: str = "kube1", start: bool = True) -> str:
    """Create nspawn machine `name` inside host, as the agent's bootstrap would, and start it.

    The machine's tree is tiny: usr-merge symlinks, os-release, and the host's /usr
    bound read-only. It runs `sleep infinity` in systemd-nspawn@<name>.service, which
    machinectl lists. Returns the in-host path of the machine's tree.
    """
    root = f"/var/lib/machines/{name}"
    host.path(root).mkdir(parents=True, exist_ok=True)
    host.path(f"{root}/usr").mkdir(exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        if not host.path(f"{root}/{link}").is_symlink():
            host.path(f"{root}/{link}").symlink_to(f"usr/{link}")
    host.write(f"{root}/etc/os-release", host.read("/usr/lib/os-release"))
    host.write(f"/etc/systemd/nspawn/{name}.nspawn", NESTED_NSPAWN)
    if start:
        host.run(["systemctl", "start", f"systemd-nspawn@{name}.service"])
    return root
