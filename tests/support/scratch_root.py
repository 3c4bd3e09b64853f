"""A scratch root for `rpm --root`: just enough of a system for the package's scriptlets to run there.

rpm chroots into the root to run %post, %preun and %postun, so the root holds /bin/sh and rm, this
machine's python3 (hard links to its standard library: instant, and nothing in the root writes to
them), /dev/null, and two stubs that log each call instead of acting:

    /usr/bin/systemctl                      (`is-enabled` answers yes, as a preset that enables would)
    /usr/lib/systemd/systemd-update-helper  (what the RHEL/Fedora macros call)

/run/systemd/system exists, so the scriptlets take their "systemd is running" branches. The package's
library lands in the target's site-packages (/usr/lib/python3.X/site-packages), which this python3 does
not read: a .pth file in its own dist-packages adds that directory, so the package's programs (the slot
seeding) run for real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CALLS = "/var/log/scriptlet-calls"
STUB = f'#!/bin/sh\necho "{{name}} $*" >> {CALLS}\n'
SYSTEMCTL = f"""#!/bin/sh
echo "systemctl $*" >> {CALLS}
exit 0
"""
DBPATH = "/var/lib/rpm"  # where the RHEL/Fedora family keeps it (Debian's rpm defaults to ~/.rpmdb)


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    return re.findall(r"(/\S+\.so[^\s]*) \(0x", out)


class ScratchRoot:
    def __init__(self, path: Path, sitelib: str):
        self.path = path
        self.sitelib = sitelib
        python = os.path.realpath("/usr/bin/python3")
        binaries = ["/bin/sh", "/bin/rm", python]
        for b in binaries:
            self._copy(b)
            for lib in _libraries(b):
                self._copy(lib)
        (path / "usr/bin/python3").symlink_to(Path(python).name)
        stdlib = subprocess.run([python, "-I", "-c", "import os; print(os.path.dirname(os.__file__))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        shutil.copytree(stdlib, self.host_path(stdlib), copy_function=os.link, symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages", "dist-packages"))
        dist = self.host_path("/usr/lib/python3/dist-packages")
        dist.mkdir(parents=True)
        (dist / "scratch-root-sitelib.pth").write_text(sitelib + "\n")
        self._script("/usr/bin/systemctl", SYSTEMCTL)
        self._script("/usr/lib/systemd/systemd-update-helper", STUB.format(name="systemd-update-helper"))
        for d in ("/run/systemd/system", "/var/log", "/tmp"):
            self.host_path(d).mkdir(parents=True, exist_ok=True)
        self.host_path("/dev").mkdir(exist_ok=True)
        os.mknod(self.host_path("/dev/null"), 0o20666, os.makedev(1, 3))
        os.chmod(self.host_path("/dev/null"), 0o666)

    def host_path(self, path: str) -> Path:
        """Where a path of the root is, seen from this machine."""
        return self.path / path.lstrip("/")

    def _copy(self, src: str) -> None:
        dest = self.host_path(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copy2(src, dest)  # follows links: the library a soname names

    def _script(self, path: str, text: str) -> None:
        p = self.host_path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(0o755)

    def rpm(self, *args: str) -> subprocess.CompletedProcess:
        """rpm against the root's database; fails the test with rpm's output when it fails."""
        cmd = ["rpm", "--root", str(self.path), "--dbpath", DBPATH, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if r.returncode:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def run(self, *cmd: str) -> str:
        """A command inside the root (chroot); its stdout."""
        r = subprocess.run(["chroot", str(self.path), *cmd], capture_output=True, text=True,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if r.returncode:
            raise AssertionError(f"{' '.join(cmd)} in the scratch root exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r.stdout

    def take_calls(self) -> list[str]:
        """The stubbed systemctl and systemd-update-helper calls since the last take, in order."""
        log = self.host_path(CALLS)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return calls

    def tree(self, *paths: str) -> dict[str, str]:
        """path -> 'dir', 'link -> target' or 'file <mode> <size>' under the given paths of the root."""
        out = {}
        for top in paths:
            base = self.host_path(top)
            if not base.exists() and not base.is_symlink():
                continue
            walk = [base] + sorted(base.rglob("*")) if base.is_dir() and not base.is_symlink() else [base]
            for p in walk:
                rel = "/" + str(p.relative_to(self.path))
                if p.is_symlink():
                    out[rel] = f"link -> {os.readlink(p)}"
                elif p.is_dir():
                    out[rel] = "dir"
                else:
                    out[rel] = f"file {p.stat().st_mode & 0o7777:o} {p.stat().st_size}"
        return out
