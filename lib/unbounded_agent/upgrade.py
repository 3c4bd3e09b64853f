"""AgentUpgrade state: the upgrade record and its phases, the upgrade lock, the quarantine of
rolled-back releases, and the small public API that the CLI and the MachineOperation watcher call.

The record (``<state dir>/upgrade.json``) is the one source of truth every step reads first and
writes before it acts; each step is a separate executable in its own unit (units/, STYLE.md):

    requested ─► staging ─► staged ─► preflighted ─► switching ─► probation ─► committed
        │           │          │           │             │            │
        └───────────┴──────────┴─────┬─────┴─────────────┘            ▼
                                     ▼ (current never touched)    recovering ─► rolled-back
                                   failed

``failed``, ``committed`` and ``rolled-back`` are terminal: the record then describes the last finished
operation (its reason comes from reasons.Reason) until the next request replaces it. A record
left in any other phase by a ``kill -9`` or a power loss is *interrupted*; upgrade_resume decides
from the record and the links whether it failed (before the switch) or goes back on probation.

Secrets: the record holds only redacted URLs. The full URL of a request made through this API
waits in ``upgrade-request.json`` (mode 0600) until the stage step consumes it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import os
import secrets
import time
from pathlib import Path

from . import log, state
from .config import Config
from .reasons import OpsError, Reason

FORMAT = 1
LOCK_PATH = "/run/unbounded-agent-upgrade.lock"  # the upstream agent's name
ENV_LOCK = "UNBOUNDED_AGENT_UPGRADE_LOCK"  # tests point it elsewhere
REQUEST_FILE = "upgrade-request.json"
QUARANTINE_FILE = "quarantine.json"
SIGNAL_FILE = "rollback-signal.json"
HOLD_DIR = "test-hold"

# Phases
REQUESTED, STAGING, STAGED, PREFLIGHTED = "requested", "staging", "staged", "preflighted"
SWITCHING, PROBATION, RECOVERING = "switching", "probation", "recovering"
COMMITTED, FAILED, ROLLED_BACK = "committed", "failed", "rolled-back"
PHASES = (REQUESTED, STAGING, STAGED, PREFLIGHTED, SWITCHING, PROBATION, RECOVERING, COMMITTED, FAILED, ROLLED_BACK)
TERMINAL = frozenset({COMMITTED, FAILED, ROLLED_BACK})
BEFORE_SWITCH = frozenset({REQUESTED, STAGING, STAGED, PREFLIGHTED})

# Units (units/); the chain of one request is the four units of its instance.
ROLLBACK_INSTANCE = "rollback"
PROBATION_UNIT = "unbounded-upgrade-probation.service"
RECOVERY_UNIT = "unbounded-agent-daemon-recovery.service"
RESUME_UNIT = "unbounded-upgrade-resume.service"
MAX_UNIT_NAME = 255


def chain_units(instance: str) -> list[str]:
    """The units that move a request forward (the entry unit only waits for the outcome)."""
    return [f"unbounded-upgrade-{step}@{instance}.service" for step in ("stage", "preflight", "switch")]


def entry_unit(instance: str) -> str:
    return f"unbounded-upgrade@{instance}.service"


# -- systemd unit-name escaping (systemd-escape without --path; %I undoes it) ----------------

_VALID = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def escape(text: str) -> str:
    out = []
    for i, b in enumerate(text.encode()):
        if b == ord("/"):
            out.append("-")
        elif b in _VALID and not (i == 0 and b == ord(".")):
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def unescape(name: str) -> str:
    out = bytearray()
    i = 0
    while i < len(name):
        c = name[i]
        if c == "-":
            out += b"/"
        elif c == "\\" and name[i + 1 : i + 2] == "x" and len(name) >= i + 4:
            out.append(int(name[i + 2 : i + 4], 16))
            i += 3
        else:
            out += c.encode()
        i += 1
    return out.decode(errors="replace")


# -- time and digests ---------------------------------------------------------------------------


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def short(digest: str | None) -> str:
    return digest[:12] if digest else "?"


# -- the store: record, request, quarantine, rollback signal ----------------------------------------


class Store:
    """The upgrade's files under the state dir. Every write is atomic (fsutil via state)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.state_dir)
        self.record_path = self.dir / state.UPGRADE_RECORD
        self.request_path = self.dir / REQUEST_FILE
        self.quarantine_path = self.dir / QUARANTINE_FILE
        self.signal_path = self.dir / SIGNAL_FILE

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            return state.read_json(path)
        except ValueError as e:
            # A corrupt file cannot come from our atomic writes; treat it as absent but say so.
            log.warn(f"ignoring {e}")
            return None

    # record
    def read(self) -> dict | None:
        return self._read(self.record_path)

    def write(self, rec: dict) -> dict:
        rec["format"] = FORMAT
        rec["updated_at"] = now()
        state.write_json(self.record_path, rec, mode=0o644)
        return rec

    def advance(self, rec: dict, phase: str, **fields) -> dict:
        """Move rec to phase (appending to its history) and persist it."""
        rec.update(fields)
        if rec.get("phase") != phase:
            rec["phase"] = phase
            rec.setdefault("history", []).append({"phase": phase, "at": now(), "t": round(time.time(), 3)})
        return self.write(rec)

    def finish(self, rec: dict, phase: str, reason: Reason, message: str, **fields) -> dict:
        assert phase in TERMINAL
        rec = self.advance(rec, phase, reason=reason.value, message=message, finished_at=now(), **fields)
        self.request_path.unlink(missing_ok=True)
        return rec

    # request (holds the unredacted URL; 0600)
    def write_request(self, req: dict) -> None:
        state.write_json(self.request_path, req, mode=0o600)

    def read_request(self) -> dict | None:
        return self._read(self.request_path)

    # quarantine
    def quarantine(self) -> list[dict]:
        return list((self._read(self.quarantine_path) or {}).get("entries", []))

    def quarantined(self, *digests: str | None) -> dict | None:
        wanted = {d for d in digests if d}
        for entry in self.quarantine():
            if entry.get("digest") in wanted or entry.get("archive_sha256") in wanted:
                return entry
        return None

    def quarantine_add(self, entry: dict) -> None:
        entries = [e for e in self.quarantine() if e.get("digest") != entry.get("digest")]
        entries.append(entry)
        state.write_json(self.quarantine_path, {"entries": entries}, mode=0o644)

    def quarantine_remove(self, digest: str | None) -> bool:
        entries = self.quarantine()
        kept = [e for e in entries if e.get("digest") != digest]
        if len(kept) != len(entries):
            state.write_json(self.quarantine_path, {"entries": kept}, mode=0o644)
            return True
        return False

    # rollback signal
    def write_signal(self, signal: dict) -> None:
        state.write_json(self.signal_path, signal, mode=0o644)

    def read_signal(self) -> dict | None:
        return self._read(self.signal_path)


def quarantine_message(entry: dict) -> str:
    what = f"version {entry.get('version') or 'unknown'} (sha256 {short(entry.get('digest'))})"
    return (
        f"{what} was rolled back by operation {entry.get('operation')} at {entry.get('at')}: "
        f"{entry.get('failure') or 'daemon failed'}; it is quarantined — request it with --force to try it again"
    )


# -- the lock: one upgrade step at a time, released by process death --------------------------


class UpgradeLock:
    """An exclusive flock(2) on /run/unbounded-agent-upgrade.lock.

    ``wait`` > 0 retries for that many seconds (steps of one chain follow each other closely); the
    kernel drops the lock when its holder dies, so a killed step never leaves it behind. Opened
    read-only when the file system is (the sandboxed preflight unit); flock needs no write access.
    """

    def __init__(self, wait: float = 0.0, path: str | None = None):
        self.path = path or os.environ.get(ENV_LOCK) or LOCK_PATH
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "UpgradeLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise OpsError(
                        Reason.UPGRADE_IN_PROGRESS,
                        f"another upgrade step holds {self.path}; one upgrade at a time — retry when it has finished",
                    ) from None
                time.sleep(0.1)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "UpgradeLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- test hold points -----------------------------------------------------------------------------

ENV_HOLD = "UNBOUNDED_AGENT_TEST_HOLD"


def hold_point(store: Store, name: str) -> None:
    """Crash-point injection for the test host: when the environment names this point, announce
    it in <state dir>/test-hold/<name> and wait until that file is removed (or we are killed).
    Costs one environment lookup otherwise."""
    wanted = os.environ.get(ENV_HOLD)
    if not wanted or name not in wanted.split(","):
        return
    marker = store.dir / HOLD_DIR / name
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()}\n")
    log.info(f"test hold point {name}: waiting until {marker} is removed")
    while marker.exists():
        time.sleep(0.05)


# -- liveness: is an in-flight record still being worked on? ----------------------------------------


def own_unit() -> str | None:
    """The systemd unit this process runs in, from its cgroup (None outside a service)."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[-1]
    except (OSError, IndexError):
        return None
    last = line.rsplit("/", 1)[-1]
    return last if last.endswith(".service") else None


def busy_units(rec: dict) -> list[str]:
    """The units that may still move rec forward: its chain's steps, probation and recovery — those
    that are active, activating or have a job queued. The caller's own unit (and, for a stage step,
    its own chain) is not counted, nor the entry unit, which only waits for the outcome."""
    from . import systemd

    me = own_unit()
    names = [PROBATION_UNIT, RECOVERY_UNIT]
    instance = rec.get("instance")
    if instance and not (me and me.startswith("unbounded-upgrade-stage@") and me == chain_units(instance)[0]):
        names = chain_units(instance) + names
    return [n for n in systemd.busy(names) if n != me]


def in_flight(rec: dict | None) -> bool:
    return bool(rec) and rec.get("phase") not in TERMINAL


def describe(rec: dict) -> str:
    """One line for the journal, the CLI and errors (URLs in records are already redacted)."""
    phase = rec.get("phase")
    frm, to = rec.get("from") or {}, rec.get("to") or {}
    what = f"{rec.get('kind', 'upgrade')} {rec.get('operation')}"
    versions = f"{frm.get('version') or '?'} → {to.get('version') or '?'}"
    if phase in TERMINAL:
        return f"{what} {phase} ({versions}): {rec.get('reason')}: {rec.get('message')}"
    return f"{what} in phase {phase} ({versions}) since {rec.get('updated_at')}"


def refuse_if_in_flight(store: Store, rec: dict | None, *, resolve: bool = True) -> dict | None:
    """Under the lock: refuse with UPGRADE_IN_PROGRESS when rec is being worked on; converge it first
    when it was interrupted. Returns the record as it is afterwards."""
    if not in_flight(rec):
        return rec
    busy = busy_units(rec)
    if not busy and resolve:
        from . import upgrade_resume

        log.info(f"found interrupted {describe(rec)}; resolving it first")
        rec = upgrade_resume.resolve(store, rec)
        if not in_flight(rec):
            return rec
        busy = busy_units(rec)
    raise OpsError(
        Reason.UPGRADE_IN_PROGRESS,
        f"{describe(rec)}" + (f" ({', '.join(busy)} running)" if busy else "") + "; one upgrade at a time — retry when it has finished",
    )


# -- public API (CLI and, later, the MachineOperation watcher) ---------------------------------------


def new_operation_name(prefix: str = "local") -> str:
    return f"{prefix}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def _fail_request(store: Store, base: dict, err: OpsError) -> None:
    rec = dict(base, requested_at=now(), history=[])
    store.finish(rec, FAILED, err.reason, err.message)
    log.error(f"{base['kind']} {base['operation']} refused: {err}")


def start_upgrade(cfg: Config, url: str | None, sha256: str | None = None, force: bool = False,
                  operation: str | None = None) -> dict:
    """Start an AgentUpgrade from url: checks what can be checked at once, records the request and
    starts ``unbounded-upgrade@<escaped redacted URL>.service``; returns the record (phase
    ``requested``). The outcome arrives later in the record (current_outcome / follow).

    Idempotent per operation name: asking again for the operation in the record returns that record.
    Raises OpsError: UPGRADE_IN_PROGRESS (nothing recorded), or INVALID_PARAMETERS / QUARANTINED
    (recorded as the failed outcome of this operation).
    """
    from . import systemd, urls

    store = Store(cfg)
    operation = operation or new_operation_name()
    url = (url or "").strip()
    with UpgradeLock(wait=5.0):
        rec = store.read()
        if rec and rec.get("operation") == operation:
            return rec
        refuse_if_in_flight(store, rec)
        base = {"operation": operation, "kind": "upgrade", "url": urls.redact(url) if url else "", "force": force}
        try:
            if not url:
                raise OpsError(Reason.INVALID_PARAMETERS, 'missing required parameter "downloadURL"')
            urls.validate(url, allow_http=cfg.allow_insecure_http)
            expected = urls.parse_sha256(sha256)
            base["expected_sha256"] = expected
            entry = store.quarantined(expected)
            if entry and not force:
                raise OpsError(Reason.QUARANTINED, quarantine_message(entry))
            instance = escape(base["url"])
            unit = entry_unit(instance)
            if len(unit) > MAX_UNIT_NAME:
                raise OpsError(Reason.INVALID_PARAMETERS, f"URL too long: its unit name would exceed {MAX_UNIT_NAME} characters")
        except OpsError as e:
            _fail_request(store, base, e)
            raise
        store.write_request({"operation": operation, "url": url, "sha256": expected, "force": force, "instance": instance})
        rec = store.advance(dict(base, instance=instance, requested_at=now(), history=[]), REQUESTED, reason=None, message="")
        try:
            systemd.start_unit(unit)
        except systemd.SystemdUnavailable as e:
            err = OpsError(Reason.EXECUTION_FAILED, f"cannot start {unit}: {e}")
            store.finish(rec, FAILED, err.reason, err.message)
            raise err from None
        log.info(f"upgrade {operation} requested from {base['url']}: started {unit}")
        return rec


def start_rollback(cfg: Config, operation: str | None = None, force: bool = False) -> dict:
    """Go back to unbounded-agent-last-good on purpose, through the same preflight, switch,
    probation and commit as an upgrade (``unbounded-upgrade@rollback.service``)."""
    from . import systemd

    store = Store(cfg)
    operation = operation or new_operation_name()
    with UpgradeLock(wait=5.0):
        rec = store.read()
        if rec and rec.get("operation") == operation:
            return rec
        refuse_if_in_flight(store, rec)
        unit = entry_unit(ROLLBACK_INSTANCE)
        store.write_request({"operation": operation, "url": None, "sha256": None, "force": force, "instance": ROLLBACK_INSTANCE})
        rec = store.advance(
            {"operation": operation, "kind": "rollback", "url": "", "force": force, "instance": ROLLBACK_INSTANCE,
             "requested_at": now(), "history": []},
            REQUESTED, reason=None, message="")
        try:
            systemd.start_unit(unit)
        except systemd.SystemdUnavailable as e:
            err = OpsError(Reason.EXECUTION_FAILED, f"cannot start {unit}: {e}")
            store.finish(rec, FAILED, err.reason, err.message)
            raise err from None
        log.info(f"rollback {operation} requested: started {unit}")
        return rec


def outcome(rec: dict | None) -> dict | None:
    """What a reporter needs from a record: is it finished, did it succeed, with which reason."""
    if not rec:
        return None
    phase = rec.get("phase")
    return {
        "operation": rec.get("operation"),
        "kind": rec.get("kind"),
        "phase": phase,
        "finished": phase in TERMINAL,
        "succeeded": phase == COMMITTED,
        "reason": rec.get("reason"),
        "message": rec.get("message") or describe(rec),
        "from_version": (rec.get("from") or {}).get("version"),
        "to_version": (rec.get("to") or {}).get("version"),
        "failure": rec.get("failure"),
        "updated_at": rec.get("updated_at"),
    }


def current_outcome(cfg: Config) -> dict | None:
    """The outcome of the operation in the record (in flight or last finished), or None."""
    return outcome(Store(cfg).read())


def follow(cfg: Config, operation: str, on_change=None, timeout: float | None = None,
           poll: float = 0.2) -> dict:
    """Wait until the record of operation is terminal; call on_change(record) whenever it changes.

    Raises OpsError(UPGRADE_IN_PROGRESS) when timeout passes first, and EXECUTION_FAILED when the
    record is replaced by another operation."""
    store = Store(cfg)
    if timeout is None:
        timeout = (cfg.download_deadline_seconds + cfg.preflight_timeout_seconds + 2 * cfg.ready_timeout_seconds
                   + cfg.probation_seconds + 180)
    deadline = time.monotonic() + timeout
    last = None
    while True:
        rec = store.read()
        if rec is None or rec.get("operation") != operation:
            raise OpsError(Reason.EXECUTION_FAILED, f"the upgrade record no longer describes operation {operation}")
        key = (rec.get("phase"), rec.get("updated_at"))
        if key != last:
            last = key
            if on_change:
                on_change(rec)
        if rec.get("phase") in TERMINAL:
            return rec
        if time.monotonic() > deadline:
            raise OpsError(Reason.UPGRADE_IN_PROGRESS, f"still in progress after {timeout:.0f} s: {describe(rec)}")
        time.sleep(poll)


def exit_code(rec: dict) -> int:
    if rec.get("phase") == COMMITTED:
        return 0
    try:
        return Reason(rec.get("reason")).exit_code
    except ValueError:
        return Reason.EXECUTION_FAILED.exit_code


def restore_last_good(lay, rec: dict) -> None:
    """After a failure before the switch: point last-good back where it was, if that slot still holds
    the same binary (the stage moved it to current before overwriting the inactive slot)."""
    from . import fsutil, layout

    before = rec.get("last_good_before") or {}
    slot, digest = before.get("slot"), before.get("digest")
    if not slot or not digest or slot not in layout.SLOTS or lay.link_target(layout.LAST_GOOD) == slot:
        return
    try:
        same = file_digest(lay.path(slot)) == digest
    except OSError:
        same = False
    if same:
        fsutil.atomic_symlink(slot, lay.path(layout.LAST_GOOD))
        log.info(f"pointed {layout.LAST_GOOD} back at {slot}, as before this {rec.get('kind', 'upgrade')}")


def step_main(name: str, fn, *args) -> int:
    """The body of every bin/ step: config, one library call, the reason as exit code and journal line."""
    from . import config

    log.set_prefix(name)
    try:
        fn(config.load(), *args)
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code
    return 0


def await_outcome(cfg: Config, instance: str) -> dict:
    """For the entry unit ``unbounded-upgrade@<url>.service``: wait until this request's record is
    terminal; raise OpsError with its reason unless it was committed."""
    rec = Store(cfg).read()
    if not rec or rec.get("instance") != instance:
        raise OpsError(Reason.EXECUTION_FAILED, "the upgrade record does not describe this request: "
                       + (describe(rec) if rec else "no upgrade record"))
    rec = follow(cfg, rec["operation"])
    if rec.get("phase") != COMMITTED:
        raise OpsError(Reason(rec.get("reason") or Reason.EXECUTION_FAILED.value), describe(rec))
    log.info(describe(rec))
    return rec
