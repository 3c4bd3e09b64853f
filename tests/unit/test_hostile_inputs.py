"""Hostile inputs, one table: each ends in its own reason and leaves the host as it was.

Releases come from real servers on loopback that misbehave on purpose (tests/support/https_server.py's hostile
routes, over HTTPS with a test CA, plain HTTP, and a certificate for another name). The upgrade runs as the
dispatcher runs it (upgrade.api.run) with the real download, archive, stage and preflight code and real files
in a temp dir; only systemd is faked, its units run in-process (upgrade_fakes.FakeSystemd.run_units).

"The host as it was": both links and the bytes of every slot, every state file but the upgrade record (which
records the failure, with the reason expected), the quarantine, no hidden temporary file in the bin or state
dir, no restart of the daemon, and no secret of the URL in a message, a state file or a log line.

Deadlines are generous against the hostile behaviour (a stall of 600 s or a trickle of minutes against a 3 s
deadline), and no assertion depends on how long anything took.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import releases
import upgrade_fakes
from archives import MALFORMED, valid_archive
from hostile_release import ReleaseServers
from upgrade_fakes import ID, agent_body, hidden_files, links, make_cfg, seed, slots, state_files

from unbounded_agent import layout, systemd
from unbounded_agent.reasons import OpsError, Reason
from unbounded_agent.upgrade import api, probation, record, units
from unbounded_agent.upgrade.record import Store

cfg = upgrade_fakes.cfg
fake_systemd = upgrade_fakes.fake_systemd
host_lock = upgrade_fakes.host_lock

SECRET = "hostile-secret-token"
SIG = f"?sig={SECRET}"
GOOD = agent_body("2.0.0")
LIMITS = {"connect_timeout_seconds": 3, "read_timeout_seconds": 2, "download_deadline_seconds": 3,
          "preflight_timeout_seconds": 2, "max_archive_bytes": 8 << 20, "max_extracted_bytes": 8 << 20}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    with ReleaseServers(work) as s:
        s.put("good.tar.gz", valid_archive(work / "good.tar.gz", GOOD))
        s.put("page.html", b"<html>maintenance</html>\n")
        for name in ("traversal ../", "symlink", "hard link", "gzip bomb in tar padding", "member declaring 8 GiB",
                     "absolute path", "duplicate member"):
            path = work / f"{name.replace(' ', '-').replace('/', '')}.tar.gz"
            MALFORMED[name](path, LIMITS["max_extracted_bytes"])
            s.put(path.name, path)
        s.put("exit42.tar.gz", releases.script_release(work / "exit42.tar.gz", version_behaviour="exit42"))
        s.put("hang.tar.gz", releases.script_release(work / "hang.tar.gz", version_behaviour="hang"))
        s.put("arm64.tar.gz", releases.wrong_arch_release(work / "arm64.tar.gz"))
        s.put("text.tar.gz", valid_archive(work / "text.tar.gz", b"this is not a program\n"))
        s.put("no-interp.tar.gz", valid_archive(work / "no-interp.tar.gz", b"#!/nonexistent/interpreter\n"))
        s.put("big.tar.gz", valid_archive(work / "big.tar.gz", b"#!/bin/sh\n" + os.urandom(2 << 20)))
        s.put("understated.tar.gz", understated_isize(work / "understated.tar.gz", 4 << 20))
        yield s


def understated_isize(path: Path, size: int) -> Path:
    """An agent of ``size`` bytes whose gzip trailer claims 100: the free-space check before extraction is
    satisfied, and only the extraction finds out (zlib would only check the trailer at the very end)."""
    valid_archive(path, b"#!/bin/sh\n" + bytes(size))
    data = bytearray(path.read_bytes())
    data[-4:] = (100).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


@dataclasses.dataclass
class Host:
    cfg: object
    lay: layout.Layout
    fake: upgrade_fakes.FakeSystemd
    servers: ReleaseServers
    tmp: Path


@pytest.fixture
def host(tmp_path, monkeypatch, servers, cfg, fake_systemd, host_lock):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", servers.ca)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    cfg = make_cfg(tmp_path, **LIMITS)  # the same dirs as the cfg fixture's, with short bounds
    lay = seed(cfg, tmp_path)
    host_lock.hold(ID)
    return Host(cfg, lay, fake_systemd.run_units(cfg), servers, tmp_path)


@pytest.fixture
def tmpfs():
    """mount(dir, size): a small tmpfs on dir (a disk that fills), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(directory: Path, size: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)], check=True)
        mounted.append(directory)

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def snapshot(h: Host) -> dict:
    files = state_files(h.cfg)
    files.pop(record.RECORD_FILE, None)  # the one file a failure writes: checked on its own
    selected = {name: (h.lay.resolves(name).read_bytes() if h.lay.resolves(name) else None)
                for name in (layout.CURRENT, layout.LAST_GOOD)}
    # the quarantine is a state file
    return {"links": links(h.lay), "selected": selected, "slots": slots(h.lay), "state": files}


def leftovers(h: Host) -> list[str]:
    state_hidden = sorted(p.name for p in Path(h.cfg.state_dir).iterdir() if p.name.startswith("."))
    return hidden_files(h.lay) + state_hidden


# -- the table -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    url: Callable[[ReleaseServers], str]
    reason: Reason
    words: str = ""  # in the failure's message
    sha256: str | None = None
    prepare: Callable[[Host, Callable], None] | None = None  # e.g. a small disk under the state dir
    limits: tuple[tuple[str, float], ...] = ()  # config bounds of this row's own


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]  # closed on return: nothing listens there any more


def served(name: str, route: str = "") -> Callable[[ReleaseServers], str]:
    return lambda s: s.https(f"{route}{name}{SIG}")


def fill_state_dir(h: Host, tmpfs) -> None:
    """The state dir (where the archive is downloaded) on a 512 KiB disk; the archive is 2 MiB."""
    keep = state_files(h.cfg)
    tmpfs(Path(h.cfg.state_dir), "512k")
    for name, data in keep.items():
        (Path(h.cfg.state_dir) / name).write_bytes(data)


def fill_bin_dir(h: Host, tmpfs) -> None:
    """The bin dir (where the agent is extracted) on a 1 MiB disk holding the seeded layout; the agent is 4 MiB
    and its archive's gzip trailer says 100 bytes."""
    saved = {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in h.lay.bin_dir.iterdir()}
    tmpfs(h.lay.bin_dir, "1m")
    for name, content in saved.items():
        if isinstance(content, str):
            (h.lay.bin_dir / name).symlink_to(content)
        else:
            (h.lay.bin_dir / name).write_bytes(content)
            (h.lay.bin_dir / name).chmod(0o755)


ROWS = [
    # the transfer
    # (a stall of 600 s against a 1 s read timeout, the deadline far off; one byte every 0.1 s against a 2 s
    # deadline, the read timeout far off: which bound ends each one does not depend on the machine's speed)
    Row("server stalls after the headers", served("good.tar.gz", "stall-body/"), Reason.DOWNLOAD_FAILED,
        "no data for 1 s (read timeout)", limits=(("read_timeout_seconds", 1), ("download_deadline_seconds", 60))),
    Row("server trickles the body slower than the deadline allows", served("good.tar.gz", "trickle/"),
        Reason.DOWNLOAD_FAILED, "did not finish within the 2 s deadline",
        limits=(("read_timeout_seconds", 30), ("download_deadline_seconds", 2))),
    Row("Content-Length longer than the body", served("good.tar.gz", "truncate/"), Reason.DOWNLOAD_FAILED,
        "the connection closed after"),
    Row("Content-Length shorter than the body", served("good.tar.gz", "short-length/"), Reason.INVALID_ARCHIVE,
        "truncated"),
    Row("Content-Length shorter than the body, with a digest", served("good.tar.gz", "short-length/"),
        Reason.CHECKSUM_MISMATCH, "does not match", sha256=upgrade_fakes.sha(b"")),
    Row("Content-Length of a petabyte", lambda s: s.https(f"huge-length{SIG}"), Reason.INVALID_ARCHIVE,
        "larger than maxArchiveBytes"),
    Row("negative Content-Length", lambda s: s.https(f"negative-length{SIG}"), Reason.DOWNLOAD_FAILED,
        "invalid Content-Length"),
    Row("redirect loop", lambda s: s.https(f"loop/0{SIG}"), Reason.DOWNLOAD_FAILED, "more than 5 redirects"),
    Row("redirect from https to plain http", served("good.tar.gz", "redirect-http/"), Reason.DOWNLOAD_FAILED,
        "refused redirect from https to plain http"),
    Row("TLS certificate for another name", lambda s: s.wrong_name(f"good.tar.gz{SIG}"), Reason.DOWNLOAD_FAILED,
        "Hostname mismatch"),
    Row("nothing listens at the port", lambda s: f"https://127.0.0.1:{closed_port()}/good.tar.gz{SIG}",
        Reason.DOWNLOAD_FAILED, "connection refused"),
    Row("HTTP 404", lambda s: s.https(f"status/404{SIG}"), Reason.DOWNLOAD_FAILED, "HTTP 404 Not Found"),
    Row("HTTP 500", lambda s: s.https(f"status/500{SIG}"), Reason.DOWNLOAD_FAILED, "HTTP 500 Internal Server Error"),
    Row("HTML page served as the release", served("page.html"), Reason.INVALID_ARCHIVE, "not gzip-compressed"),
    Row("wrong sha256", served("good.tar.gz"), Reason.CHECKSUM_MISMATCH, "does not match", sha256="ab" * 32),
    # what the request says
    Row("plain http URL (https is required)", lambda s: s.http(f"good.tar.gz{SIG}"), Reason.INVALID_PARAMETERS,
        "plain http is refused"),
    Row("user info in the URL", lambda s: s.https("good.tar.gz", host=f"agent:{SECRET}@127.0.0.1"),
        Reason.INVALID_PARAMETERS, "user info"),
    Row("URL of 9000 characters", lambda s: s.https("good.tar.gz?pad=" + "x" * 9000), Reason.INVALID_PARAMETERS,
        "longer than 8192"),
    Row("URL with a newline (a forged log line)", lambda s: s.https("good.tar.gz\nreason=Succeeded"),
        Reason.INVALID_PARAMETERS, "control characters"),
    Row("URL with a non-ASCII host", lambda s: "https://релизы.example/good.tar.gz" + SIG, Reason.INVALID_PARAMETERS,
        "ASCII"),
    Row("URL with port 99999", lambda s: "https://127.0.0.1:99999/good.tar.gz" + SIG, Reason.INVALID_PARAMETERS,
        "not a valid URL"),
    Row("sha256 of 63 characters", served("good.tar.gz"), Reason.INVALID_PARAMETERS, "64 hexadecimal",
        sha256="a" * 63),
    Row("sha256 that is not hex", served("good.tar.gz"), Reason.INVALID_PARAMETERS, "64 hexadecimal",
        sha256="z" * 64),
    # the archive
    Row("tarball path traversal", served("traversal-...tar.gz"), Reason.INVALID_ARCHIVE, "path traversal"),
    Row("tarball absolute path", served("absolute-path.tar.gz"), Reason.INVALID_ARCHIVE, "absolute path"),
    Row("tarball symlink member", served("symlink.tar.gz"), Reason.INVALID_ARCHIVE, "symbolic link"),
    Row("tarball hardlink member", served("hard-link.tar.gz"), Reason.INVALID_ARCHIVE, "hard link"),
    Row("tarball bomb (zeros in the tar padding)", served("gzip-bomb-in-tar-padding.tar.gz"), Reason.INVALID_ARCHIVE,
        "gzip bomb"),
    Row("tarball member declaring 8 GiB", served("member-declaring-8-GiB.tar.gz"), Reason.INVALID_ARCHIVE,
        "more than maxExtractedBytes"),
    Row("tarball with the member twice", served("duplicate-member.tar.gz"), Reason.INVALID_ARCHIVE, "duplicate"),
    # the agent
    Row("agent that is not a program", served("text.tar.gz"), Reason.PREFLIGHT_FAILED, "Exec format error"),
    Row("agent whose interpreter does not exist", served("no-interp.tar.gz"), Reason.PREFLIGHT_FAILED,
        "cannot execute it"),
    Row("agent for another architecture", served("arm64.tar.gz"), Reason.PREFLIGHT_FAILED, "Exec format error"),
    Row("agent whose version exits 42", served("exit42.tar.gz"), Reason.PREFLIGHT_FAILED, "exit status 42"),
    Row("agent that hangs on version", served("hang.tar.gz"), Reason.PREFLIGHT_FAILED, "did not exit within 2 s"),
    # the disks
    Row("state dir fills during the download", served("big.tar.gz"), Reason.INSUFFICIENT_SPACE,
        "cannot store the downloaded archive", prepare=fill_state_dir),
    Row("bin dir fills during the extraction (gzip trailer understating the size)", served("understated.tar.gz"),
        Reason.INSUFFICIENT_SPACE, "No space left on device", prepare=fill_bin_dir),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_hostile_input_ends_in_its_reason_and_leaves_the_host_as_it_was(host, row, tmpfs, capfd):
    host.cfg = dataclasses.replace(host.cfg, **dict(row.limits))
    host.fake.run_units(host.cfg)  # the units run with it too
    if row.prepare:
        row.prepare(host, tmpfs)
    before = snapshot(host)
    record_before = Store(host.cfg).read()
    url = row.url(host.servers)
    spec = api.Spec(id=ID, operation="hostile", url=url, sha256=row.sha256)
    try:
        rec = api.run(host.cfg, spec)
    except OpsError as e:  # refused before anything was recorded or started
        reason, message = e.reason, e.message
        assert Store(host.cfg).read() == record_before and host.fake.calls == []
    else:
        reason, message = Reason(rec.reason), rec.message
        assert rec.phase == record.FAILED and rec.id == ID
        assert host.fake.calls == [("start", units.chain_start(ID))]  # the chain, and never the daemon
        assert rec.from_.slot == layout.BLUE and rec.from_.digest == upgrade_fakes.sha(agent_body("1.0.0"))
    assert reason == row.reason, message
    assert row.words in message
    after = snapshot(host)
    if reason == Reason.PREFLIGHT_FAILED:
        # the candidate that failed stays in the inactive slot, which nothing selects (as upstream leaves it)
        inactive = layout.GREEN
        assert after["slots"][inactive] is not None and inactive not in after["links"].values()
        after["slots"][inactive] = before["slots"][inactive]
    assert after == before
    assert leftovers(host) == []
    assert not Store(host.cfg).request_path.exists()  # the full URL is gone from disk
    out, err = capfd.readouterr()
    everything = message + out + err + "".join(v.decode(errors="replace") for v in state_files(host.cfg).values())
    assert SECRET not in everything


def test_the_table_is_long_enough_and_every_name_is_its_own():
    assert len(ROWS) >= 30 and len({r.name for r in ROWS}) == len(ROWS)


def test_an_agent_whose_daemon_claims_another_version_is_rolled_back(host):
    """`version` prints 2.0.0; the daemon it runs says "unbounded-agent 1.0.0-liar" in its status. Probation
    rolls it back: DaemonFailed, current and its digest as before, the binary quarantined."""
    before = snapshot(host)
    host.servers.put("liar.tar.gz", valid_archive(host.tmp / "liar.tar.gz", GOOD))

    restarts = []

    def lie(unit):  # the first restart starts the liar; the next one (recovery's) the old, honest daemon
        if unit == systemd.DAEMON_UNIT:
            restarts.append(unit)
            host.fake.daemon["status_text"] = "unbounded-agent 1.0.0-liar: connected" if len(restarts) == 1 else ""

    host.fake.after_restart = lie
    rec = api.run(host.cfg, api.Spec(id=ID, operation="liar", url=host.servers.https(f"liar.tar.gz{SIG}")))
    assert rec.phase == record.ROLLED_BACK and rec.reason == Reason.DAEMON_FAILED.value, rec.describe()
    assert rec.failure.cause == probation.VERSION_MISMATCH
    assert "claims version '1.0.0-liar'" in rec.message and "printed '2.0.0'" in rec.message
    assert links(host.lay) == before["links"]
    assert host.lay.resolves(layout.CURRENT).read_bytes() == agent_body("1.0.0")
    assert Store(host.cfg).quarantined(rec.to.digest) is not None
    assert leftovers(host) == []
