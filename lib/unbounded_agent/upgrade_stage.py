"""Step 1 of an upgrade, ``unbounded-upgrade-stage@<url>.service``: put the candidate into the inactive slot.

Download (streamed, bounded, optional sha256 of the archive), validate and extract the one
``unbounded-agent`` member into a hidden temp file in the bin dir, then — after pointing
``unbounded-agent-last-good`` at the binary now current, so the slot being overwritten is never the
one a rollback needs — rename it onto the inactive slot. ``current`` is never touched here.

For a rollback (instance ``rollback``) the candidate is the binary last-good points to: nothing is
downloaded and no slot is written.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time

from . import fsutil, layout, log, upgrade
from .config import Config
from .reasons import OpsError, Reason
from .upgrade import Store


def _redacting(url: str, message: str) -> str:
    from . import urls

    return message.replace(url, urls.redact(url)) if url else message


def run(cfg: Config, instance: str, url_arg: str | None = None) -> dict:
    """Stage the request of unit instance ``instance`` (escaped as in the unit name, ``%i``; ``url_arg``
    is the unit's ``%I``, the same unescaped; a request made through the API carries the full URL,
    which may hold a query the unit name must not show). Returns the
    record (``staged``, or ``committed`` when the content is already current). Raises OpsError after
    recording the failure."""
    store = Store(cfg)
    rec = store.read()
    # Refuse a second request at once, without waiting for the lock held through a long download.
    if upgrade.in_flight(rec) and not _is_request_of(rec, instance) and upgrade.busy_units(rec):
        raise OpsError(Reason.UPGRADE_IN_PROGRESS, f"{upgrade.describe(rec)}; one upgrade at a time — retry when it has finished")
    with upgrade.UpgradeLock(wait=30.0):
        rec = store.read()
        request = None
        if _is_request_of(rec, instance):
            request = store.read_request()
            if not request or request.get("operation") != rec.get("operation"):
                request = None
            store.request_path.unlink(missing_ok=True)  # the secret URL lives only in this process now
        else:
            upgrade.refuse_if_in_flight(store, rec)
            rec = None
        kind = "rollback" if instance == upgrade.ROLLBACK_INSTANCE else "upgrade"
        url = (request or {}).get("url") or (url_arg or upgrade.unescape(instance) if kind == "upgrade" else "")
        if rec is None:  # started directly: `systemctl start unbounded-upgrade@<escaped URL>.service`
            from . import urls

            rec = {"operation": upgrade.new_operation_name("systemctl"), "kind": kind, "instance": instance,
                   "url": urls.redact(url) if url else "", "force": False, "requested_at": upgrade.now(), "history": []}
        force = bool((request or {}).get("force") or rec.get("force"))
        lay = layout.Layout(cfg.bin_dir)
        _remove_stage_temps(lay)
        try:
            if kind == "rollback":
                return _stage_rollback(store, lay, rec, force)
            return _stage_download(store, lay, rec, url, (request or {}).get("sha256"), force)
        except OpsError as e:
            msg = _redacting(url, e.message)
            rec = store.finish(rec, upgrade.FAILED, e.reason, msg)
            upgrade.restore_last_good(lay, rec)
            raise OpsError(e.reason, msg) from None
        except Exception as e:
            msg = _redacting(url, f"internal error while staging: {type(e).__name__}: {e}")
            store.finish(rec, upgrade.FAILED, Reason.EXECUTION_FAILED, msg)
            upgrade.restore_last_good(lay, rec)
            raise OpsError(Reason.EXECUTION_FAILED, msg) from None


def _is_request_of(rec: dict | None, instance: str) -> bool:
    return bool(rec) and rec.get("phase") == upgrade.REQUESTED and rec.get("instance") == instance


def _remove_stage_temps(lay: layout.Layout) -> None:
    """Hidden files in the bin dir are temporaries of an interrupted stage or link update (we hold
    the lock and no step is running): remove them."""
    try:
        entries = list(lay.bin_dir.iterdir())
    except FileNotFoundError:
        return
    for p in entries:
        if p.name.startswith(".") and (p.is_symlink() or p.is_file()):
            log.info(f"removing {p.name}, left by an interrupted step")
            p.unlink(missing_ok=True)


def current_binary(lay: layout.Layout) -> dict:
    """The binary current selects: slot, digest and version. Refuses a layout we cannot switch from."""
    slot = lay.link_target(layout.CURRENT)
    real = lay.resolves(layout.CURRENT)
    if real is None or slot not in layout.SLOTS:
        raise OpsError(Reason.EXECUTION_FAILED,
                       f"{lay.path(layout.CURRENT)} does not select an executable slot ({slot!r}); "
                       "repair it with /usr/libexec/unbounded-agent/unbounded-agent-seed-slots")
    return {"slot": slot, "digest": upgrade.file_digest(real), "version": layout.binary_version(real),
            "size": real.stat().st_size}


def _last_good(lay: layout.Layout) -> dict:
    slot = lay.link_target(layout.LAST_GOOD)
    real = lay.resolves(layout.LAST_GOOD)
    return {"slot": slot, "digest": upgrade.file_digest(real) if real else None}


def _other(slot: str) -> str:
    return layout.GREEN if slot == layout.BLUE else layout.BLUE


def _stage_rollback(store: Store, lay: layout.Layout, rec: dict, force: bool) -> dict:
    frm = current_binary(lay)
    lg = _last_good(lay)
    if lg["digest"] is None or lg["slot"] not in layout.SLOTS:
        raise OpsError(Reason.EXECUTION_FAILED, f"nothing to roll back to: {lay.path(layout.LAST_GOOD)} selects no executable slot")
    if lg["slot"] == frm["slot"] or lg["digest"] == frm["digest"]:
        raise OpsError(Reason.EXECUTION_FAILED,
                       f"nothing to roll back to: last-good ({lg['slot']}) holds the binary that is already current")
    entry = store.quarantined(lg["digest"])
    if entry and not force:
        raise OpsError(Reason.QUARANTINED, upgrade.quarantine_message(entry))
    frm.pop("size", None)
    rec = store.advance(rec, upgrade.STAGED, started_at=upgrade.now(), reason=None, message="",
                        **{"from": frm, "to": {"slot": lg["slot"], "digest": lg["digest"], "version": None},
                           "last_good_before": lg})
    log.info(f"rollback {rec['operation']}: candidate is last-good {lg['slot']} (sha256 {upgrade.short(lg['digest'])})")
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


def _stage_download(store: Store, lay: layout.Layout, rec: dict, url: str, sha256: str | None, force: bool) -> dict:
    from . import archive, download, urls

    cfg = store.cfg
    url = urls.validate(url, allow_http=cfg.allow_insecure_http)
    expected = urls.parse_sha256(sha256)
    frm = current_binary(lay)
    size_hint = frm.pop("size")
    to_slot = _other(frm["slot"])
    rec = store.advance(rec, upgrade.STAGING, started_at=upgrade.now(), reason=None, message="",
                        expected_sha256=expected, progress={"bytes": 0, "total": None},
                        **{"from": frm, "to": {"slot": to_slot}, "last_good_before": _last_good(lay)})
    log.info(f"{rec['kind']} {rec['operation']}: staging {rec['url']} into {to_slot} "
             f"(current {frm['slot']}, version {frm['version'] or 'unknown'})")
    entry = store.quarantined(expected)
    if entry and not force:
        raise OpsError(Reason.QUARANTINED, upgrade.quarantine_message(entry))
    # Without the archive's size yet, require room for one more binary of today's size in each place.
    download.check_free_space(cfg.state_dir, size_hint)
    download.check_free_space(cfg.bin_dir, size_hint)

    last_write = [0.0]

    def progress(received: int, total: int | None) -> None:
        t = time.monotonic()
        if t - last_write[0] >= 0.5 or (total is not None and received >= total):
            last_write[0] = t
            store.write(dict(rec, progress={"bytes": received, "total": total}))

    # An unnamed temp file (O_TMPFILE): the kernel frees it whatever kills us.
    with tempfile.TemporaryFile(dir=cfg.state_dir, prefix=".archive-") as f:
        archive_sha = download.download(url, f, limits=download.Limits.from_config(cfg), expected_sha256=expected,
                                        progress=progress)
        f.flush()
        size = f.tell()
        rec = store.write(dict(store.read() or rec, progress={"bytes": size, "total": size}))
        entry = store.quarantined(archive_sha)
        if entry and not force:
            raise OpsError(Reason.QUARANTINED, upgrade.quarantine_message(entry))
        isize = gzip_isize(f)
        download.check_free_space(cfg.bin_dir, min(isize or cfg.max_extracted_bytes, cfg.max_extracted_bytes))
        upgrade.hold_point(store, "stage-before-extract")
        tmp = archive.extract_agent(f"/proc/self/fd/{f.fileno()}", cfg.bin_dir, max_extracted_bytes=cfg.max_extracted_bytes)
    try:
        digest = upgrade.file_digest(tmp)
        if digest == frm["digest"]:
            tmp.unlink()
            log.info(f"{rec['kind']} {rec['operation']}: {rec['url']} holds the binary already current; nothing to do")
            return store.finish(rec, upgrade.COMMITTED, Reason.SUCCEEDED,
                                f"already running this content (version {frm['version'] or 'unknown'}, sha256 "
                                f"{upgrade.short(digest)}): nothing changed, no restart",
                                to=dict(frm, archive_sha256=archive_sha), same_content=True)
        entry = store.quarantined(digest)
        if entry and not force:
            raise OpsError(Reason.QUARANTINED, upgrade.quarantine_message(entry))
        # Never overwrite the binary a rollback would need: last-good follows current first.
        if lay.link_target(layout.LAST_GOOD) != frm["slot"]:
            fsutil.atomic_symlink(frm["slot"], lay.path(layout.LAST_GOOD))
            log.info(f"pointed {layout.LAST_GOOD} at {frm['slot']} (the current binary) before writing {to_slot}")
        upgrade.hold_point(store, "stage-before-rename")
        os.rename(tmp, lay.path(to_slot))
        fsutil.fsync_dir(lay.bin_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rec = store.advance(rec, upgrade.STAGED,
                        to={"slot": to_slot, "digest": digest, "archive_sha256": archive_sha, "version": None},
                        progress={"bytes": size, "total": size}, stage_peak_rss_kib=_peak_rss_kib())
    log.info(f"{rec['kind']} {rec['operation']}: staged {to_slot} (sha256 {upgrade.short(digest)}, archive sha256 "
             f"{upgrade.short(archive_sha)}, {size} bytes downloaded)")
    return rec
