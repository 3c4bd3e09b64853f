"""``unbounded-upgrade-stage@<id>.service``: put the candidate into the inactive slot.

Download (streamed, bounded, optional sha256 of the archive), validate and extract the one
``unbounded-agent`` member into a hidden temp file in the bin dir, then — after pointing
``unbounded-agent-last-good`` at the binary now current, so the slot being overwritten is never the one a
rollback needs — rename it onto the inactive slot. ``current`` is never touched here.

For a rollback the candidate is the binary last-good points to: nothing is downloaded and no slot is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import time
import typing

from .. import fsutil, holdpoint, hostlock, layout, log, program, records
from ..config import Config
from ..reasons import OpsError, Reason
from . import record
from .record import Binary, Download, Store, UpgradeRecord


def main(argv: list[str] | None = None) -> int:
    return program.instance_main("unbounded-upgrade-stage", __doc__, run, argv)


def _redacting(url: str, message: str) -> str:
    from .. import urls

    return message.replace(url, urls.redact(url)) if url else message


def run(cfg: Config, id: str) -> UpgradeRecord:
    """Stage operation id. Returns the record (``staged``, or ``committed`` when the content is already
    current). Raises OpsError after recording the failure."""
    hostlock.require(id, "stage")
    store = Store(cfg)
    rec = store.for_step(id, record.REQUESTED, "stage")
    if rec.terminal:  # e.g. the same content as current: nothing to do
        return rec
    request = store.read_request(id) if rec.kind == record.UPGRADE else None
    store.remove_request()  # from here the full URL lives only in this process
    url = request.url if request else ""
    lay = layout.Layout(cfg.bin_dir)
    _remove_stage_temps(lay)
    try:
        if rec.kind == record.ROLLBACK:
            return _stage_rollback(store, lay, rec)
        if not url:
            raise OpsError(Reason.EXECUTION_FAILED, "the request's URL is gone (the stage step ran before for it)")
        return _stage_download(store, lay, rec, url, request.sha256 if request else None)
    except OpsError as e:
        msg = _redacting(url, e.message)
        rec = store.finish(rec, record.FAILED, e.reason, msg)
        restore_last_good(lay, rec)
        raise OpsError(e.reason, msg) from None
    except Exception as e:
        reason, msg = Reason.EXECUTION_FAILED, f"internal error while staging: {type(e).__name__}: {e}"
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # e.g. the record's progress, written while the download fills the state dir's disk
            reason, msg = Reason.INSUFFICIENT_SPACE, f"cannot write the upgrade's state while staging: {e.strerror}"
        msg = _redacting(url, msg)
        store.finish(rec, record.FAILED, reason, msg)
        restore_last_good(lay, rec)
        raise OpsError(reason, msg) from None


def _remove_stage_temps(lay: layout.Layout) -> None:
    """Hidden files in the bin dir are temporaries of an interrupted stage or link update (our operation
    holds the host and no other step runs): remove them."""
    try:
        entries = list(lay.bin_dir.iterdir())
    except FileNotFoundError:
        return
    for p in entries:
        if p.name.startswith(".") and (p.is_symlink() or p.is_file()):
            log.info(f"removing {p.name}, left by an interrupted step")
            p.unlink(missing_ok=True)


def current_binary(lay: layout.Layout) -> tuple[Binary, int]:
    """The binary current selects, and its size. Refuses a layout we cannot switch from."""
    slot = lay.link_target(layout.CURRENT)
    real = lay.resolves(layout.CURRENT)
    if real is None or slot not in layout.SLOTS:
        raise OpsError(Reason.EXECUTION_FAILED,
                       f"{lay.path(layout.CURRENT)} does not select an executable slot ({slot!r}); "
                       "repair it with /usr/libexec/unbounded-agent/unbounded-agent-seed-slots")
    return Binary(slot=slot, digest=record.file_digest(real), version=layout.binary_version(real)), real.stat().st_size


def last_good(lay: layout.Layout) -> Binary:
    real = lay.resolves(layout.LAST_GOOD)
    return Binary(slot=lay.link_target(layout.LAST_GOOD), digest=record.file_digest(real) if real else None)


def restore_last_good(lay: layout.Layout, rec: UpgradeRecord) -> None:
    """After a failure before the switch: point last-good back where it was, if that slot still holds the
    same binary (the stage moved it to current before overwriting the inactive slot)."""
    before = rec.last_good_before
    if not before or not before.slot or not before.digest or before.slot not in layout.SLOTS:
        return
    if lay.link_target(layout.LAST_GOOD) == before.slot:
        return
    try:
        same = record.file_digest(lay.path(before.slot)) == before.digest
    except OSError:
        same = False
    if same:
        fsutil.atomic_symlink(before.slot, lay.path(layout.LAST_GOOD))
        log.info(f"pointed {layout.LAST_GOOD} back at {before.slot}, as before this {rec.kind}")


def _other(slot: str) -> str:
    return layout.GREEN if slot == layout.BLUE else layout.BLUE


def _stage_rollback(store: Store, lay: layout.Layout, rec: UpgradeRecord) -> UpgradeRecord:
    frm, _ = current_binary(lay)
    lg = last_good(lay)
    if lg.digest is None or lg.slot not in layout.SLOTS:
        raise OpsError(Reason.EXECUTION_FAILED, f"nothing to roll back to: {lay.path(layout.LAST_GOOD)} selects no executable slot")
    if lg.slot == frm.slot or lg.digest == frm.digest:
        raise OpsError(Reason.EXECUTION_FAILED,
                       f"nothing to roll back to: last-good ({lg.slot}) holds the binary that is already current")
    entry = store.quarantined(lg.digest)
    if entry and not rec.force:
        raise OpsError(Reason.QUARANTINED, entry.message())
    rec = store.advance(rec, record.STAGED, started_at=rec.started_at or records.now(), reason=None, message="", from_=frm,
                        to=Binary(slot=lg.slot, digest=lg.digest), last_good_before=lg)
    log.info(f"rollback {rec.operation}: candidate is last-good {lg.slot} (sha256 {record.short(lg.digest)})")
    return rec


def _peak_rss_kib() -> int:
    """This process's peak resident memory: streaming must keep it flat whatever the archive size."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def gzip_isize(f) -> int | None:
    """The uncompressed size a gzip stream announces in its trailer (mod 2**32), or None."""
    try:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]
    except OSError:
        return None
    finally:
        f.seek(0)


@contextlib.contextmanager
def _scratch_file(directory) -> typing.Iterator[typing.BinaryIO]:
    """An unnamed temp file (O_TMPFILE): the kernel frees it whatever kills us. Its close never raises: the
    file is discarded, and the flush of a full disk's last buffered bytes must not replace the error that
    stopped the download (InsufficientSpace) with a bare OSError."""
    import tempfile  # here: switch, preflight and resume import this module for restore_last_good only

    f = tempfile.TemporaryFile(dir=directory, prefix=".archive-")
    try:
        yield f
    finally:
        try:
            f.close()
        except OSError:
            pass


def _stage_download(store: Store, lay: layout.Layout, rec: UpgradeRecord, url: str, sha256: str | None) -> UpgradeRecord:
    from .. import archive, download, urls

    cfg = store.cfg
    url = urls.validate(url, allow_http=cfg.allow_insecure_http)
    expected = urls.parse_sha256(sha256)
    frm, size_hint = current_binary(lay)
    from_slot = typing.cast(str, frm.slot)  # never None: current_binary refuses a current that selects no slot
    to_slot = _other(from_slot)
    rec = store.advance(rec, record.STAGING, started_at=records.now(), reason=None, message="", expected_sha256=expected,
                        progress=Download(0, None), from_=frm, to=Binary(slot=to_slot), last_good_before=last_good(lay))
    log.info(f"{rec.kind} {rec.operation}: staging {rec.url} into {to_slot} "
             f"(current {frm.slot}, version {frm.version or 'unknown'})")
    entry = store.quarantined(expected)
    if entry and not rec.force:
        raise OpsError(Reason.QUARANTINED, entry.message())
    # Without the archive's size yet, require room for one more binary of today's size in each place.
    fsutil.check_free_space(cfg.state_dir, size_hint)
    fsutil.check_free_space(cfg.bin_dir, size_hint)

    last_write = [0.0]

    def progress(received: int, total: int | None) -> None:
        t = time.monotonic()
        if t - last_write[0] >= 0.5 or (total is not None and received >= total):
            last_write[0] = t
            rec.progress = Download(received, total)
            try:
                store.write(rec)
            except OSError as e:
                # The archive filling the state dir's disk: let the archive's own write say so (InsufficientSpace)
                # rather than fail on what is only a progress report.
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise

    with _scratch_file(cfg.state_dir) as f:
        archive_sha = download.download(url, f, limits=download.Limits.from_config(cfg), expected_sha256=expected,
                                        progress=progress)
        f.flush()
        size = f.tell()
        rec.progress = Download(size, size)
        store.write(rec)
        entry = store.quarantined(archive_sha)
        if entry and not rec.force:
            raise OpsError(Reason.QUARANTINED, entry.message())
        isize = gzip_isize(f)
        fsutil.check_free_space(cfg.bin_dir, min(isize or cfg.max_extracted_bytes, cfg.max_extracted_bytes))
        holdpoint.hold(store.dir, "stage-before-extract")
        tmp = archive.extract_agent(f"/proc/self/fd/{f.fileno()}", cfg.bin_dir, max_extracted_bytes=cfg.max_extracted_bytes)
    try:
        digest = record.file_digest(tmp)
        if digest == frm.digest:
            tmp.unlink()
            log.info(f"{rec.kind} {rec.operation}: {rec.url} holds the binary already current; nothing to do")
            to = Binary(slot=frm.slot, digest=frm.digest, version=frm.version, archive_sha256=archive_sha)
            return store.finish(rec, record.COMMITTED, Reason.SUCCEEDED,
                                f"already running this content (version {frm.version or 'unknown'}, sha256 "
                                f"{record.short(digest)}): nothing changed, no restart", to=to, same_content=True)
        entry = store.quarantined(digest)
        if entry and not rec.force:
            raise OpsError(Reason.QUARANTINED, entry.message())
        # Never overwrite the binary a rollback would need: last-good follows current first.
        if lay.link_target(layout.LAST_GOOD) != from_slot:
            fsutil.atomic_symlink(from_slot, lay.path(layout.LAST_GOOD))
            log.info(f"pointed {layout.LAST_GOOD} at {from_slot} (the current binary) before writing {to_slot}")
        holdpoint.hold(store.dir, "stage-before-rename")
        os.rename(tmp, lay.path(to_slot))
        fsutil.fsync_dir(lay.bin_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rec = store.advance(rec, record.STAGED, to=Binary(slot=to_slot, digest=digest, archive_sha256=archive_sha),
                        progress=Download(size, size), stage_peak_rss_kib=_peak_rss_kib())
    log.info(f"{rec.kind} {rec.operation}: staged {to_slot} (sha256 {record.short(digest)}, archive sha256 "
             f"{record.short(archive_sha)}, {size} bytes downloaded)", result="succeeded")
    return rec
