"""The upgrade steps in-process, with systemd and the network faked: what each step writes to the
record, the slots and the links, and what it leaves alone when it fails."""

import os

import pytest

from archives import MALFORMED, valid_archive
from upgrade_fakes import agent_body, cfg, fake_download, fake_systemd, seed, sha  # noqa: F401
from unbounded_agent import layout, upgrade, upgrade_preflight, upgrade_probation, upgrade_stage, upgrade_switch
from unbounded_agent.reasons import OpsError, Reason

URL = "https://releases.example/v2/unbounded-agent-linux-amd64.tar.gz"
SECRET_URL = URL + "?sig=secret-token"


def instance(url=URL):
    return upgrade.escape(url)


@pytest.fixture
def release(tmp_path, monkeypatch):
    """Serve v2 at URL (and at SECRET_URL) through a fake download."""
    archives = {}

    def make(version="2.0.0", url=URL, body=None):
        path = valid_archive(tmp_path / f"rel-{len(archives)}.tar.gz", body or agent_body(version))
        archives[url] = path
        fake_download(monkeypatch, archives)
        return path

    return make


def bytes_of(lay, link):
    return lay.resolves(link).read_bytes()


def test_stage_writes_the_inactive_slot_and_never_current(cfg, tmp_path, release, fake_systemd):
    lay = seed(cfg, tmp_path)
    before = bytes_of(lay, layout.CURRENT)
    release()
    rec = upgrade_stage.run(cfg, instance())
    assert rec["phase"] == upgrade.STAGED
    assert rec["from"]["slot"] == layout.BLUE and rec["to"]["slot"] == layout.GREEN
    assert rec["from"]["version"] == "1.0.0"
    assert rec["to"]["digest"] == sha(agent_body("2.0.0"))
    assert lay.path(layout.GREEN).read_bytes() == agent_body("2.0.0")
    assert os.stat(lay.path(layout.GREEN)).st_mode & 0o7777 == 0o755
    assert bytes_of(lay, layout.CURRENT) == before and lay.link_target(layout.CURRENT) == layout.BLUE
    assert [p.name for p in lay.bin_dir.iterdir() if p.name.startswith(".")] == []
    assert [h["phase"] for h in rec["history"]] == ["staging", "staged"]


def test_full_chain_commits_and_keeps_the_old_binary_as_last_good(cfg, tmp_path, release, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    upgrade_stage.run(cfg, instance())
    rec = upgrade_preflight.run(cfg, instance())
    assert rec["phase"] == upgrade.PREFLIGHTED and rec["to"]["version"] == "2.0.0"
    rec = upgrade_switch.run(cfg, instance())
    assert rec["phase"] == upgrade.PROBATION
    assert lay.link_target(layout.CURRENT) == layout.GREEN and lay.link_target(layout.LAST_GOOD) == layout.BLUE
    assert ("restart", "unbounded-agent-daemon.service") in fake_systemd.calls
    assert ("start", upgrade.PROBATION_UNIT) in fake_systemd.calls
    # the restarted daemon: a new invocation, ready, stable
    fake_systemd.daemon.update(invocation="inv2", main_pid=200)
    rec = upgrade_probation.run(cfg)
    assert rec["phase"] == upgrade.COMMITTED and rec["reason"] == "Succeeded"
    assert "from 1.0.0 to 2.0.0" in rec["message"]
    assert upgrade.current_outcome(cfg)["succeeded"] is True


def test_same_content_as_current_succeeds_without_touching_anything(cfg, tmp_path, release, fake_systemd):
    lay = seed(cfg, tmp_path, "1.0.0")
    release(body=agent_body("1.0.0"))
    links = {n: lay.link_target(n) for n in (layout.CURRENT, layout.LAST_GOOD)}
    rec = upgrade_stage.run(cfg, instance())
    assert rec["phase"] == upgrade.COMMITTED and rec["same_content"] is True
    assert "no restart" in rec["message"]
    assert not lay.path(layout.GREEN).exists()
    assert {n: lay.link_target(n) for n in links} == links
    # the following steps of the chain have nothing to do and say so without failing
    assert upgrade_preflight.run(cfg, instance())["phase"] == upgrade.COMMITTED
    assert upgrade_switch.run(cfg, instance())["phase"] == upgrade.COMMITTED
    assert fake_systemd.calls == []


def test_api_request_keeps_the_secret_out_of_the_record_and_unit_name(cfg, tmp_path, release, fake_systemd):
    seed(cfg, tmp_path)
    release(url=SECRET_URL)
    rec = upgrade.start_upgrade(cfg, SECRET_URL, operation="op-1")
    assert "secret" not in (cfg.state_dir / "upgrade.json").read_text()
    assert fake_systemd.calls == [("start", f"unbounded-upgrade@{instance()}.service")]
    assert oct(os.stat(cfg.state_dir / upgrade.REQUEST_FILE).st_mode & 0o777) == "0o600"
    rec = upgrade_stage.run(cfg, rec["instance"], URL)  # the unit only knows the redacted URL
    assert rec["phase"] == upgrade.STAGED and rec["operation"] == "op-1"
    # asking again for the same operation returns its record (the watcher's exactly-once)
    assert upgrade.start_upgrade(cfg, SECRET_URL, operation="op-1")["phase"] == upgrade.STAGED


@pytest.mark.parametrize("url,reason", [
    ("", Reason.INVALID_PARAMETERS),
    ("ftp://releases.example/a.tar.gz", Reason.INVALID_PARAMETERS),
    ("http://releases.example/a.tar.gz", Reason.INVALID_PARAMETERS),
])
def test_api_refuses_bad_urls_and_records_the_reason(cfg, tmp_path, fake_systemd, url, reason):
    seed(cfg, tmp_path)
    with pytest.raises(OpsError) as e:
        upgrade.start_upgrade(cfg, url, operation="op-bad")
    assert e.value.reason == reason
    out = upgrade.current_outcome(cfg)
    assert out["operation"] == "op-bad" and out["finished"] and out["reason"] == reason.value
    assert fake_systemd.calls == []


def test_download_failure_leaves_current_and_distinct_last_good(cfg, tmp_path, release, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    # an earlier upgrade: current green (v2), last-good blue (v1)
    upgrade_stage.run(cfg, instance()); upgrade_preflight.run(cfg, instance()); upgrade_switch.run(cfg, instance())
    fake_systemd.daemon.update(invocation="inv2")
    upgrade_probation.run(cfg)
    with pytest.raises(OpsError) as e:
        upgrade_stage.run(cfg, instance("https://releases.example/missing.tar.gz"))
    assert e.value.reason == Reason.DOWNLOAD_FAILED
    assert lay.link_target(layout.CURRENT) == layout.GREEN
    assert lay.link_target(layout.LAST_GOOD) == layout.BLUE  # moved for the stage, restored after the failure
    assert upgrade.current_outcome(cfg)["reason"] == "DownloadFailed"


@pytest.mark.parametrize("case", ["traversal ../", "symlink", "duplicate member", "empty member", "wrong name",
                                  "truncated gzip", "gzip bomb in tar padding"])
def test_malformed_archives_fail_staging_with_invalid_archive(cfg, tmp_path, monkeypatch, fake_systemd, case):
    lay = seed(cfg, tmp_path)
    path = MALFORMED[case](tmp_path / "bad.tar.gz", cfg.max_extracted_bytes)
    fake_download(monkeypatch, {URL: path})
    with pytest.raises(OpsError) as e:
        upgrade_stage.run(cfg, instance())
    assert e.value.reason == Reason.INVALID_ARCHIVE
    assert lay.link_target(layout.CURRENT) == layout.BLUE and not lay.path(layout.GREEN).exists()
    assert [p.name for p in lay.bin_dir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("body,detail", [
    (b"#!/bin/sh\necho broken >&2\nexit 42\n", "exit status 42"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\xb7\x00" + bytes(48), "Exec format error"),
    (b"just text, not a program\n", "Exec format error"),
])
def test_preflight_failure_leaves_current_untouched(cfg, tmp_path, release, fake_systemd, body, detail):
    lay = seed(cfg, tmp_path)
    release(body=body)
    upgrade_stage.run(cfg, instance())
    with pytest.raises(OpsError) as e:
        upgrade_preflight.run(cfg, instance())
    assert e.value.reason == Reason.PREFLIGHT_FAILED and detail in e.value.message
    assert "verify agent binary" in e.value.message
    assert lay.link_target(layout.CURRENT) == layout.BLUE
    assert upgrade.current_outcome(cfg)["reason"] == "PreflightFailed"
    # a switch started anyway (by hand) finds the failed record and changes nothing
    assert upgrade_switch.run(cfg, instance())["phase"] == upgrade.FAILED
    assert lay.link_target(layout.CURRENT) == layout.BLUE and fake_systemd.calls == []


def test_quarantined_digest_is_refused_unless_forced(cfg, tmp_path, release, fake_systemd):
    seed(cfg, tmp_path)
    path = release()
    store = upgrade.Store(cfg)
    store.quarantine_add({"digest": sha(agent_body("2.0.0")), "version": "2.0.0", "operation": "op-0",
                          "at": "yesterday", "failure": "exit code 3"})
    with pytest.raises(OpsError) as e:
        upgrade_stage.run(cfg, instance())
    assert e.value.reason == Reason.QUARANTINED and "--force" in e.value.message and "exit code 3" in e.value.message
    # the archive digest is known before downloading when the request names it
    store.quarantine_add({"digest": "0" * 64, "archive_sha256": sha(path.read_bytes()), "version": "2.0.0"})
    with pytest.raises(OpsError) as e:
        upgrade.start_upgrade(cfg, URL, sha256=sha(path.read_bytes()))
    assert e.value.reason == Reason.QUARANTINED and fake_systemd.calls == []
    rec = upgrade.start_upgrade(cfg, URL, sha256=sha(path.read_bytes()), force=True)
    assert upgrade_stage.run(cfg, rec["instance"])["phase"] == upgrade.STAGED


def test_second_request_is_refused_while_the_first_is_in_flight(cfg, tmp_path, release, fake_systemd):
    seed(cfg, tmp_path)
    release()
    first = upgrade.start_upgrade(cfg, URL, operation="first")
    fake_systemd.busy_units.add(upgrade.chain_units(first["instance"])[0])  # its chain has jobs queued
    with pytest.raises(OpsError) as e:
        upgrade.start_upgrade(cfg, "https://releases.example/v3.tar.gz", operation="second")
    assert e.value.reason == Reason.UPGRADE_IN_PROGRESS and "first" in e.value.message
    with pytest.raises(OpsError) as e:
        upgrade_stage.run(cfg, instance("https://releases.example/v3.tar.gz"))
    assert e.value.reason == Reason.UPGRADE_IN_PROGRESS
    assert upgrade.Store(cfg).read()["operation"] == "first"


def test_interrupted_request_is_resolved_then_the_new_one_runs(cfg, tmp_path, release, fake_systemd):
    seed(cfg, tmp_path)
    release()
    upgrade.start_upgrade(cfg, URL, operation="killed")  # its units died: nothing is busy
    rec = upgrade.start_upgrade(cfg, URL, operation="next")
    assert rec["operation"] == "next" and rec["phase"] == upgrade.REQUESTED


def test_rollback_prepares_last_good_as_the_candidate(cfg, tmp_path, release, fake_systemd):
    lay = seed(cfg, tmp_path)
    release()
    upgrade_stage.run(cfg, instance()); upgrade_preflight.run(cfg, instance()); upgrade_switch.run(cfg, instance())
    fake_systemd.daemon.update(invocation="inv2")
    upgrade_probation.run(cfg)
    rec = upgrade.start_rollback(cfg, operation="rb")
    rec = upgrade_stage.run(cfg, upgrade.ROLLBACK_INSTANCE)
    assert rec["kind"] == "rollback" and rec["to"]["slot"] == layout.BLUE and rec["from"]["slot"] == layout.GREEN
    upgrade_preflight.run(cfg, upgrade.ROLLBACK_INSTANCE)
    upgrade_switch.run(cfg, upgrade.ROLLBACK_INSTANCE)
    assert lay.link_target(layout.CURRENT) == layout.BLUE and lay.link_target(layout.LAST_GOOD) == layout.GREEN
    fake_systemd.daemon.update(invocation="inv3")
    rec = upgrade_probation.run(cfg)
    assert rec["phase"] == upgrade.COMMITTED and "rolled back on request from 2.0.0 to 1.0.0" in rec["message"]


def test_rollback_with_nothing_to_go_back_to_is_refused(cfg, tmp_path, fake_systemd):
    seed(cfg, tmp_path)  # fresh install: last-good is current
    upgrade.start_rollback(cfg)
    with pytest.raises(OpsError) as e:
        upgrade_stage.run(cfg, upgrade.ROLLBACK_INSTANCE)
    assert "nothing to roll back to" in e.value.message
