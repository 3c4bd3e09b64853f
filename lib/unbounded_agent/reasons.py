"""The one enumeration of failure reasons, shared by the CLI, the journal, state files and
MachineOperation status (the reason of its ``Completed`` condition)."""

import enum


class Reason(str, enum.Enum):
    SUCCEEDED = "Succeeded"
    INVALID_CONFIG = "InvalidConfig"
    INVALID_PARAMETERS = "InvalidParameters"
    EXECUTION_FAILED = "ExecutionFailed"
    UNSUPPORTED_OPERATION = "UnsupportedOperation"
    # AgentUpgrade
    DOWNLOAD_FAILED = "DownloadFailed"
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    INVALID_ARCHIVE = "InvalidArchive"
    INSUFFICIENT_SPACE = "InsufficientSpace"
    PREFLIGHT_FAILED = "PreflightFailed"
    DAEMON_FAILED = "DaemonFailed"
    DAEMON_FAILED_AFTER_COMMIT = "DaemonFailedAfterCommit"  # kept failing within the window after its commit
    DAEMON_NOT_RESTARTED = "DaemonNotRestarted"  # rolled back, but systemd would not start the daemon again
    UPGRADE_IN_PROGRESS = "UpgradeInProgress"
    QUARANTINED = "Quarantined"
    STATE_UNWRITABLE = "StateUnwritable"  # the state dir refused writes (read-only, full) past a bounded retry
    # AgentReset
    HOST_LOCKED = "HostLocked"
    INVENTORY_FAILED = "InventoryFailed"
    UNSAFE_REMOVAL = "UnsafeRemoval"
    MACHINE_STILL_RUNNING = "MachineStillRunning"
    RESET_INCOMPLETE = "ResetIncomplete"
    # the queue
    SUPERSEDED = "Superseded"

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


# Distinct exit codes let scripts tell failures apart without parsing messages; 0 is success,
# 1 is left for unexpected errors (a Python traceback) and 2 for command-line usage errors.
_EXIT_CODES = {
    Reason.SUCCEEDED: 0,
    Reason.INVALID_CONFIG: 3,
    Reason.INVALID_PARAMETERS: 4,
    Reason.EXECUTION_FAILED: 5,
    Reason.UNSUPPORTED_OPERATION: 6,
    Reason.DOWNLOAD_FAILED: 10,
    Reason.CHECKSUM_MISMATCH: 11,
    Reason.INVALID_ARCHIVE: 12,
    Reason.INSUFFICIENT_SPACE: 13,
    Reason.PREFLIGHT_FAILED: 14,
    Reason.DAEMON_FAILED: 15,
    Reason.UPGRADE_IN_PROGRESS: 16,
    Reason.QUARANTINED: 17,
    Reason.DAEMON_FAILED_AFTER_COMMIT: 18,
    Reason.DAEMON_NOT_RESTARTED: 19,
    Reason.HOST_LOCKED: 20,
    Reason.INVENTORY_FAILED: 21,
    Reason.UNSAFE_REMOVAL: 22,
    Reason.MACHINE_STILL_RUNNING: 23,
    Reason.RESET_INCOMPLETE: 24,
    Reason.SUPERSEDED: 25,
    Reason.STATE_UNWRITABLE: 26,
}


def describe_error(e: BaseException) -> str:
    """A short, readable text for a library error inside our messages: pystemd's D-Bus errors carry the
    bus error name and message (their str() adds a long joke); OSError and netlink errors carry strerror."""
    name, message = getattr(e, "err_name", None), getattr(e, "err_message", None)
    if name or message:
        dec = [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in (message, name) if x]
        return f"{dec[0]} ({dec[1]})" if len(dec) == 2 else dec[0]
    strerror = getattr(e, "strerror", None)
    if strerror:
        return f"{strerror} (errno {getattr(e, 'errno', None)})"
    return str(e).split("\n")[0] or type(e).__name__


class OpsError(Exception):
    """A failure with a reason from the shared enumeration and a human message (already redacted)."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"
