"""The reset's own files: the request of a run, the "resetting" checkpoint, and one report per step.

    <ops dir>/reset/request.json       the run the dispatcher asked for: its id (the request id) and flags
    <ops dir>/reset/checkpoint.json    "resetting": written by the begin step before any step runs, removed
                                       by the verify step last, only when everything succeeded and nothing is
                                       left; it records where the agent's files were, because step 7 deletes
                                       the config that said so
    <ops dir>/reset/reports/NN-<step>.json   what each step removed, found absent, or failed on

They live in the toolset's directory, not the agent's: a reset does not remove them, so the last reset's
reports can still be read afterwards, and a reset interrupted after step 7 still knows what to clean.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from pathlib import Path

from .. import records
from ..config import ops_dir
from ..reasons import OpsError, Reason

REQUEST = "request.json"
CHECKPOINT = "checkpoint.json"
REPORTS = "reports"


def reset_dir() -> Path:
    return ops_dir() / "reset"


@dataclasses.dataclass
class ResetRequest:
    run_id: str  # the request id of the operation; every report of the run carries it
    all_wg: bool = False
    requested_by: str = ""  # the operation's name
    uid: str = ""  # the MachineOperation's uid, when one asked for it (for the journal's fields)
    requested_at: str = ""


@dataclasses.dataclass
class Recorded:
    """Where the agent's files were when the reset began (from its config)."""

    config_path: str = ""
    machine_name: str = ""
    bin_dir: str = ""
    state_dir: str = ""
    config_error: str | None = None


@dataclasses.dataclass
class Checkpoint:
    checkpoint: str = "resetting"
    created_at: str = ""
    run_id: str = ""
    all_wg: bool = False
    recorded: Recorded = field(default_factory=Recorded)
    # The routing tables that are the agent's: those its wg<N> links go with. remove-links records them here
    # before it deletes the links, so the routing step (and a resumed reset) still knows them afterwards.
    tables: list[int] = field(default_factory=list)


@dataclasses.dataclass
class FailedItem:
    item: str | None
    reason: str
    error: str


@dataclasses.dataclass
class StepReport:
    step: str
    number: int
    phase: int
    run_id: str | None
    result: str  # "succeeded" or "failed"
    reason: str
    title: str = ""
    unit: str = ""
    removed: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    failed: list[FailedItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)  # machines that had to be terminated
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.result == "succeeded"

    def first_failure(self) -> FailedItem:
        return self.failed[0] if self.failed else FailedItem(None, self.reason, "failed")


def write_request(req: ResetRequest, directory: Path | None = None) -> None:
    req.requested_at = req.requested_at or records.now()
    records.save(req, (directory or reset_dir()) / REQUEST)


def read_request(directory: Path | None = None) -> ResetRequest | None:
    try:
        return records.load(ResetRequest, (directory or reset_dir()) / REQUEST)
    except records.CorruptRecord:
        return None


def read_checkpoint(directory: Path | None = None) -> Checkpoint | None:
    try:
        return records.load(Checkpoint, (directory or reset_dir()) / CHECKPOINT)
    except records.CorruptRecord as e:
        # A corrupt checkpoint must not be taken for "no reset in progress".
        raise OpsError(Reason.EXECUTION_FAILED, f"{e}; remove it only if no reset is in progress") from None


def write_checkpoint(cp: Checkpoint, directory: Path | None = None) -> None:
    records.save(cp, (directory or reset_dir()) / CHECKPOINT)


def remember_tables(tables, directory: Path | None = None) -> None:
    """Add tables to the checkpoint's record of the agent's routing tables (durably, before acting on them)."""
    cp = read_checkpoint(directory)
    if cp is None:
        raise OpsError(Reason.EXECUTION_FAILED, "no reset in progress (no checkpoint) to record routing tables in")
    new = sorted(set(cp.tables) | set(tables))
    if new != cp.tables:
        cp.tables = new
        write_checkpoint(cp, directory)


def report_path(number: int, name: str, directory: Path | None = None) -> Path:
    return (directory or reset_dir()) / REPORTS / f"{number:02d}-{name}.json"


def read_report(number: int, name: str, directory: Path | None = None) -> StepReport | None:
    try:
        return records.load(StepReport, report_path(number, name, directory))
    except records.CorruptRecord:
        return None  # cannot come from our atomic writes: treat a foreign file as missing


def write_report(report: StepReport, directory: Path | None = None) -> None:
    records.save(report, report_path(report.number, report.step, directory))


def report_mtime(number: int, name: str, directory: Path | None = None) -> int | None:
    try:
        return os.stat(report_path(number, name, directory)).st_mtime_ns
    except FileNotFoundError:
        return None
