"""``unbounded-upgrade-preflight@<id>.service`` (sandboxed: no network, read-only system, no new
privileges): run ``<staged slot> version`` with a timeout. Only its exit status decides; a bounded excerpt
of its output goes into the failure message. ``current`` is never touched here.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import subprocess
import time
import typing

from .. import holdpoint, hostlock, layout, log, program
from ..config import Config
from ..reasons import OpsError, Reason
from . import record
from .record import Store, UpgradeRecord
from .stage import restore_last_good

MAX_OUTPUT = 2048  # bytes of the candidate's output kept for the failure message
ETXTBSY_RETRY_SECONDS = 0.1


class CandidateResult:
    def __init__(self, ok: bool, detail: str, output: bytes, version: str | None = None):
        self.ok, self.detail, self.output, self.version = ok, detail, output, version

    def excerpt(self) -> str:
        text = self.output.decode(errors="replace").strip()
        return text if len(text) <= 400 else text[:400] + " …"


def run_candidate(path: str | os.PathLike, timeout: float, max_output: int = MAX_OUTPUT) -> CandidateResult:
    """``path version``: exit 0 within timeout passes. Retries exec while the file is busy (ETXTBSY);
    kills the whole process group on timeout; keeps at most max_output bytes of output and never
    blocks on a candidate that prints without end."""
    deadline = time.monotonic() + timeout
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    while True:
        try:
            proc = subprocess.Popen([str(path), "version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)
            break
        except OSError as e:
            if e.errno == errno.ETXTBSY and time.monotonic() < deadline:
                time.sleep(ETXTBSY_RETRY_SECONDS)
                continue
            if e.errno == errno.ENOEXEC:
                return CandidateResult(False, "cannot execute it: Exec format error (a program for another "
                                              "architecture, or not a program at all)", b"")
            return CandidateResult(False, f"cannot execute it: {e.strerror}", b"")
    stdout = typing.cast(typing.IO[bytes], proc.stdout)  # never None: started with stdout=PIPE
    out = bytearray()
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(left):
                continue
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                break
            if len(out) < max_output:
                out += chunk[: max_output - len(out)]
    try:
        rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()) if not timed_out else 0)
    except subprocess.TimeoutExpired:
        timed_out = True
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        stdout.close()
        return CandidateResult(False, f"did not exit within {timeout:g} s (killed)", bytes(out))
    stdout.close()
    if rc < 0:
        return CandidateResult(False, f"killed by signal {signal.Signals(-rc).name}", bytes(out))
    if rc != 0:
        return CandidateResult(False, f"exit status {rc}", bytes(out))
    words = bytes(out).decode(errors="replace").split()
    return CandidateResult(True, "exit status 0", bytes(out), words[-1] if words else None)


def main(argv: list[str] | None = None) -> int:
    return program.instance_main("unbounded-upgrade-preflight", __doc__, run, argv)


def run(cfg: Config, id: str) -> UpgradeRecord:
    hostlock.require(id, "preflight")
    store = Store(cfg)
    rec = store.for_step(id, record.STAGED, "preflight")
    if rec.terminal:  # e.g. the same content as current: nothing to do
        return rec
    lay = layout.Layout(cfg.bin_dir)
    _, to = rec.binaries()
    path = lay.path(rec.slots()[1])
    try:
        if record.file_digest(path) != to.digest:
            raise OpsError(Reason.PREFLIGHT_FAILED, f"{path} no longer holds the staged binary (sha256 changed)")
        holdpoint.hold(store.dir, "preflight-before-run")
        result = run_candidate(path, cfg.preflight_timeout_seconds)
        if not result.ok:
            msg = f"verify agent binary {path}: {result.detail}"
            if result.output:
                msg += f"; output: {result.excerpt()!r}"
            raise OpsError(Reason.PREFLIGHT_FAILED, msg)
    except OpsError as e:
        rec = store.finish(rec, record.FAILED, e.reason, e.message)
        restore_last_good(lay, rec)
        raise
    except OSError as e:
        rec = store.finish(rec, record.FAILED, Reason.PREFLIGHT_FAILED, f"verify agent binary {path}: {e}")
        restore_last_good(lay, rec)
        raise OpsError(Reason.PREFLIGHT_FAILED, rec.message) from None
    to.version = result.version
    rec = store.advance(rec, record.PREFLIGHTED, to=to)
    log.info(f"{rec.kind} {rec.operation}: {to.slot} passed preflight: {result.excerpt()!r}", result="succeeded")
    return rec
