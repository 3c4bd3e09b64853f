"""Release tarballs for the AgentUpgrade tests: real ones from `make release`, and misbehaving agents.

    real_release(repo_root, "2.0.0", out_dir)          # make release VERSION=2.0.0 DIST=out_dir
    padded_release(repo_root, "2.0.0", out, 50 << 20)  # a real agent grown to ~50 MB (bench)
    script_release(path, daemon="crash")               # a small Python agent that misbehaves on cue
    wrong_arch_release(path)                           # an aarch64 ELF: the kernel refuses to exec it

A script agent answers `version` and `daemon` like the real one, and talks sd_notify itself (the daemon
unit is Type=notify with NotifyAccess=main), so each failure mode is exactly the one named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

from archives import valid_archive

TARBALL = "unbounded-agent-linux-amd64.tar.gz"

VERSION_BEHAVIOUR = {
    "ok": 'print(f"unbounded-agent {VERSION}")',
    "exit42": 'print("refusing: broken build", file=sys.stderr); sys.exit(42)',
    "hang": "time.sleep(3600)",
}
DAEMON_BEHAVIOUR = {
    "healthy": "notify('READY=1'); time.sleep(1e9)",
    "crash": "print('fatal: cannot start (simulated)', file=sys.stderr, flush=True); sys.exit(3)",
    "crash-after": "notify('READY=1'); print('ready, will crash', flush=True); time.sleep({seconds}); "
                   "print('fatal: crashed after ready (simulated)', file=sys.stderr, flush=True); sys.exit(4)",
    "never-ready": "print('starting, never ready', flush=True); time.sleep(1e9)",
    "segfault": "notify('READY=1'); time.sleep({seconds}); os.kill(os.getpid(), signal.SIGSEGV)",
    # ready and healthy, but claiming (as the real daemon's STATUS= does) another version than `version` prints
    "liar": "notify('READY=1\\nSTATUS=unbounded-agent 0.0.1-liar: connected'); time.sleep(1e9)",
    # ready, then exit 1 some seconds later, every run: long enough to pass probation, too short to live
    "late-crash": "notify('READY=1'); print('ready', flush=True); time.sleep({seconds}); "
                  "print('fatal: crashed late (simulated)', file=sys.stderr, flush=True); sys.exit(1)",
    # healthy, but stops only when killed: SIGTERM is ignored
    "ignores-sigterm": "signal.signal(signal.SIGTERM, signal.SIG_IGN); notify('READY=1'); "
                       "print('ready; ignoring SIGTERM', flush=True); time.sleep(1e9)",
}

SCRIPT = '''#!/usr/bin/python3
"""A misbehaving stand-in for unbounded-agent (tests/releases.py): version={vb}, daemon={db}."""
import os, signal, socket, sys, time
VERSION = "{version}"

def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        addr = "\\0" + addr[1:] if addr.startswith("@") else addr
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(msg.encode())

cmd = sys.argv[1] if len(sys.argv) > 1 else ""
if cmd == "version":
    {version_code}
elif cmd == "daemon":
    {daemon_code}
else:
    print(f"unbounded-agent {{VERSION}} (test script): unknown command {{cmd!r}}", file=sys.stderr)
    sys.exit(2)
'''


def real_release(repo_root: Path, version: str, out_dir: Path) -> Path:
    """`make release VERSION=version DIST=out_dir`; returns the tarball."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["make", "-s", "release", f"VERSION={version}", f"DIST={out_dir}"], cwd=repo_root,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"make release VERSION={version} failed:\n{r.stdout}{r.stderr}")
    return out_dir / TARBALL


def padded_release(repo_root: Path, version: str, out_dir: Path, size: int) -> Path:
    """A real release whose zipapp carries `size` bytes of incompressible padding (it still runs: the
    padding is one more stored member of the zip)."""
    real_release(repo_root, version, out_dir)
    app = out_dir / "unbounded-agent"
    padded = out_dir / "unbounded-agent.padded"
    shutil.copy(app, padded)
    with zipfile.ZipFile(padded, "a") as z:
        with z.open(zipfile.ZipInfo("padding.bin"), "w", force_zip64=True) as f:
            left = size
            while left > 0:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
    padded.chmod(0o755)
    tarball = out_dir / f"padded-{version}.tar.gz"
    # streamed, and gzip level 1: random padding does not compress, level 9 would only be slow
    info = tarfile.TarInfo("unbounded-agent")
    info.size, info.mode, info.uname, info.gname = padded.stat().st_size, 0o755, "root", "root"
    with tarfile.open(tarball, "w:gz", compresslevel=1, format=tarfile.GNU_FORMAT) as tar, open(padded, "rb") as f:
        tar.addfile(info, f)
    return tarball


def script_release(path: Path, *, version: str = "9.0.0", version_behaviour: str = "ok",
                   daemon: str = "healthy", seconds: float = 3) -> Path:
    code = SCRIPT.format(version=version, vb=version_behaviour, db=daemon,
                         version_code=VERSION_BEHAVIOUR[version_behaviour],
                         daemon_code=DAEMON_BEHAVIOUR[daemon].format(seconds=seconds))
    return valid_archive(path, code.encode())


def wrong_arch_release(path: Path) -> Path:
    """An ELF executable for aarch64 (e_machine 0xb7): exec fails with ENOEXEC on amd64."""
    elf = bytearray(b"\x7fELF\x02\x01\x01\x00" + bytes(8))
    elf += (2).to_bytes(2, "little") + (0xB7).to_bytes(2, "little") + (1).to_bytes(4, "little")
    elf += bytes(64 - len(elf)) + os.urandom(4096)
    return valid_archive(path, bytes(elf))
