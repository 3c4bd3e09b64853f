"""Every bad release fails with its own reason — in the CLI's exit code, in `status` and in the journal —
and leaves the current binary byte-identical and the daemon running, not even restarted. A request the CLI
can judge at once (a URL that is no usable https URL) is refused before anything is queued; the others run
through the queue and end with a failed record and a failed result."""

import json

import pytest
import releases
from archives import MALFORMED
from upgrade_host import OPS, journal, look, prepare, queued, request_id, result, upgrade

pytestmark = pytest.mark.testhost

EXIT = {"InvalidParameters": 4, "DownloadFailed": 10, "ChecksumMismatch": 11, "InvalidArchive": 12,
        "PreflightFailed": 14}
SECRET = "hunter2secret"
MAX_EXTRACTED = 16 << 20  # upgrade_host.TEST_CONFIG

ARCHIVE_CASES = ["truncated gzip", "gzip bomb in tar padding", "traversal ../", "symlink", "duplicate member",
                 "empty member", "wrong name"]


@pytest.fixture(scope="module")
def host(testhost_factory, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("bad-releases")
    good = releases.real_release(repo_root, "2.0.0", out / "good")
    files = {"good": good}
    for case in ARCHIVE_CASES:
        files[case] = MALFORMED[case](out / f"{case.replace(' ', '-').replace('/', '')}.tar.gz", MAX_EXTRACTED)
    files["version exits 42"] = releases.script_release(out / "v42.tar.gz", version_behaviour="exit42")
    files["version hangs"] = releases.script_release(out / "hang.tar.gz", version_behaviour="hang")
    files["wrong architecture"] = releases.wrong_arch_release(out / "arm64.tar.gz")
    with testhost_factory("badrel", installed=True) as h:
        prepare(h)
        h.urls = {name: h.serve(path, f"{i}.tar.gz") for i, (name, path) in enumerate(files.items())}
        h.before = look(h)
        yield h


def url_of(host, name):
    return host.urls[name]


# (case, url builder, extra args, reason, words the error must hold)
CASES = [
    ("missing URL", lambda h: "", [], "InvalidParameters", 'missing required parameter "downloadURL"'),
    ("not a URL", lambda h: "agent.tar.gz", [], "InvalidParameters", ""),
    ("ftp URL", lambda h: "ftp://localhost/agent.tar.gz", [], "InvalidParameters", "ftp"),
    ("credentials in the URL", lambda h: f"https://user:{SECRET}@localhost:8443/0.tar.gz", [], "InvalidParameters", ""),
    ("plain http refused by default", lambda h: h.http_url("0.tar.gz"), [], "InvalidParameters", "http"),
    ("404", lambda h: h.https_url(f"status/404?sig={SECRET}"), [], "DownloadFailed", "404"),
    ("TLS failure (certificate for another name)", lambda h: "https://127.0.1.1:8443/0.tar.gz", [], "DownloadFailed",
     "TLS"),
    ("redirect to http", lambda h: h.https_url(f"redirect-http/0.tar.gz?sig={SECRET}"), [], "DownloadFailed", "http"),
    ("body shorter than announced", lambda h: h.https_url("truncate/0.tar.gz"), [], "DownloadFailed", ""),
    ("checksum mismatch", lambda h: url_of(h, "good"), ["--sha256", "ab" * 32], "ChecksumMismatch", "SHA-256"),
    *[(case, (lambda c: lambda h: url_of(h, c))(case), [], "InvalidArchive", MALFORMED[case].message)
      for case in ARCHIVE_CASES],
    ("version exits 42", lambda h: url_of(h, "version exits 42"), [], "PreflightFailed", "exit status 42"),
    ("version hangs", lambda h: url_of(h, "version hangs"), [], "PreflightFailed", "did not exit within 5 s"),
    ("wrong architecture", lambda h: url_of(h, "wrong architecture"), [], "PreflightFailed", "Exec format error"),
]


@pytest.mark.parametrize("name,url,args,reason,words", CASES, ids=[c[0] for c in CASES])
def test_bad_release_fails_with_its_reason_and_changes_nothing(host, name, url, args, reason, words):
    record_before = look(host)["record"]
    results_before = sorted(p.name for p in host.path(f"{OPS}/results").glob("*.json"))
    r = upgrade(host, url(host), *args, "--wait")
    assert r.returncode == EXIT[reason], r.stdout + r.stderr
    assert reason in r.stderr and words in r.stdout + r.stderr, (r.stdout, r.stderr)
    after = look(host)
    before = host.before
    assert after["current"] == before["current"] and after["current_sha"] == before["current_sha"]
    assert after["version"] == before["version"]
    assert (after["daemon_state"], after["daemon_pid"], after["daemon_invocation"]) == \
           (before["daemon_state"], before["daemon_pid"], before["daemon_invocation"])
    assert after["hidden_files"] == [] and queued(host) == []
    if reason == "InvalidParameters":
        # refused by the CLI itself: nothing was queued, recorded or run
        assert "queued" not in r.stdout
        assert after["record"] == record_before
        assert sorted(p.name for p in host.path(f"{OPS}/results").glob("*.json")) == results_before
        return
    id = request_id(r)
    rec = after["record"]
    assert rec["id"] == id and rec["phase"] == "failed" and rec["reason"] == reason and words in rec["message"]
    res = result(host, id)
    assert (res["succeeded"], res["reason"]) == (False, reason) and words in res["message"]
    if reason == "PreflightFailed":
        assert "verify agent binary" in rec["message"]
    status = host.run(["unbounded-agent", "status"]).stdout
    assert f"upgrade {id} failed ({reason})" in status  # the last results
    upgrade_line = next(line for line in status.splitlines() if line.startswith("upgrade:"))
    assert f"upgrade {id} failed" in upgrade_line and f"): {reason}: " in upgrade_line
    # the step that failed said why in its own unit's journal
    steps = journal(host, f"unbounded-upgrade-stage@{id}.service", f"unbounded-upgrade-preflight@{id}.service")
    assert reason in steps


def test_no_secret_reaches_the_journal_the_record_or_status(host):
    # the whole journal but the test's own HTTPS server, whose access log shows what it was asked
    entries = [json.loads(line) for line in host.run(["journalctl", "--no-pager", "-o", "json"]).stdout.splitlines()]
    ours = [e for e in entries if e.get("_SYSTEMD_UNIT") != "testhost-https.service"]
    assert len(ours) > 100 and any("unbounded-upgrade-stage" in str(e.get("MESSAGE")) for e in ours)
    everything = json.dumps(ours) + json.dumps(look(host)) + host.run(["unbounded-agent", "status"]).stdout
    everything += "".join(p.read_text() for p in host.path("/var/lib/unbounded-agent").glob("*.json"))
    everything += "".join(p.read_text() for p in host.path(f"{OPS}/results").glob("*.json"))
    assert SECRET not in everything
