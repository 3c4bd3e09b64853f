"""Recover requests: the rollback of a committed upgrade whose daemon keeps failing (upgrade/crashes.py).

Two things queue one, each only when none is queued or running for that upgrade, and never while a reset is
on its way (the spool refuses it):

- ``unbounded-agent-daemon-exited``, the daemon unit's ``ExecStopPost=``: it keeps each crash, and on the
  ``CRASHES``-th within ``WINDOW_SECONDS`` of the commit queues the request;
- the dispatcher, whenever it starts (at boot, for a request, or started by the recovery unit when the
  daemon's ``OnFailure=`` fired): a daemon whose last run crashed and that systemd no longer restarts (its start
  limit) while a committed upgrade has a last-good to go back to.

The dispatcher runs the request like any host operation (api.recover): one at a time, under the host lock.
"""

from __future__ import annotations

import os
import time

from .. import layout, log, program, systemd
from ..config import Config
from ..reasons import OpsError
from ..upgrade import crashes
from ..upgrade.record import Store, UpgradeRecord
from .spool import Request, Spool, new_id


def main(argv: list[str] | None = None) -> int:
    return program.plain_main("unbounded-agent-daemon-exited", __doc__, exited, argv)


def exited(cfg: Config, env=os.environ, now=time.time) -> str | None:
    """ExecStopPost= of the daemon: keep a crash; the recover request's id when this crash makes the committed
    binary failing."""
    if not crashes.crashed(env, crashes.stop_requested()):
        return None  # stopped on request (a restart, a stop, the host going down): not the binary's failure
    store = Store(cfg)
    last, exits = crashes.record_exit(store, env, now())
    rec = store.read()
    failing = crashes.after_commit(rec, exits, now())
    if rec is None or failing is None:
        return None
    return submit(store, rec, f"the committed daemon crashed {len(failing)} times within "
                              f"{crashes.WINDOW_SECONDS:g} s of its commit (the last: {last.text()})")


def check_daemon(cfg: Config, spool: Spool | None = None) -> str | None:
    """At the dispatcher's start: a committed upgrade's daemon that crashed last and that systemd gave up on."""
    try:
        snap = systemd.service_snapshot(systemd.DAEMON_UNIT)
    except systemd.SystemdError:
        return None
    if snap["active_state"] != "failed" or snap["job"] or not snap["invocation"]:
        return None
    store = Store(cfg)
    rec = store.read()
    exits = crashes.read_exits(store)
    last = exits[-1] if exits else None
    if rec is None or not rec.committed or rec.same_content or rec.to is None or last is None \
            or last.invocation != snap["invocation"] or last.digest != rec.to.digest:
        return None  # not a crash of the committed binary (e.g. an operator's stop that timed out)
    return submit(store, rec, f"the committed daemon crashed ({last.text()}) and systemd stopped restarting it "
                              "(its start limit)", spool)


def submit(store: Store, rec: UpgradeRecord, detail: str, spool: Spool | None = None) -> str | None:
    """Queue a recover request for rec; its id (or the one already queued), None when there is no last-good to
    go back to or the queue refused it."""
    if crashes.last_good(layout.Layout(store.cfg.bin_dir), rec) is None:
        log.warn(f"{detail}; no last-good binary other than it to roll back to: left to systemd's restart policy")
        return None
    spool = spool or Spool()
    try:
        waiting = next((r for _, r in spool.queue() if r.kind == "recover" and r.target == rec.id), None)
        if waiting is not None:
            log.info(f"{detail}; recover request {waiting.id} is queued already")
            return waiting.id
        req = spool.submit(Request(id=new_id("recover"), kind="recover", operation=rec.operation, source="daemon",
                                   target=rec.id, detail=detail))
    except (OpsError, OSError) as e:
        log.error(f"{detail}; cannot queue a recover request: {e}")
        return None
    log.error(f"{detail}: queued recover request {req.id} to roll back to last-good")
    return req.id
