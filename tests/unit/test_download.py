"""Downloads against real local servers: HTTPS with a test CA made by openssl, plain HTTP, and servers
that misbehave on purpose (stall, trickle, lie about lengths, redirect badly).

Every URL a failing test fetches carries a query secret (`?sig=secret`), and every failure is checked
for it: requests puts the full URL into its exception text, and none of it may reach our messages.
"""

import dataclasses
import hashlib
import http.server
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from unbounded_agent import config, download
from unbounded_agent.download import Limits
from unbounded_agent.reasons import OpsError, Reason

LIMITS = Limits(max_archive_bytes=1 << 20, connect_timeout=2, read_timeout=2, deadline_seconds=20, allow_http=False)
BODY = os.urandom(300 * 1024)
SECRET = "?sig=secret"


# --- test PKI and servers ----------------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_cert(d: Path, name: str, ca: str, san: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    _openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


@dataclasses.dataclass
class PKI:
    dir: Path
    ca: str  # the bundle that trusts the servers
    rogue_ca: str  # a bundle that does not

    def cert(self, name):
        return str(self.dir / f"{name}.crt"), str(self.dir / f"{name}.key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "test-ca")
    _make_ca(d, "rogue-ca")
    _make_cert(d, "server", "test-ca", "DNS:localhost,IP:127.0.0.1")
    _make_cert(d, "wrong-name", "test-ca", "DNS:release.example")
    return PKI(d, str(d / "test-ca.crt"), str(d / "rogue-ca.crt"))


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes (the server's ``files`` maps names to bodies):

    /file/<name>             200 with Content-Length
    /chunked/<name>          200, chunked, no Content-Length
    /encoded/<name>          200 with Content-Encoding: gzip (the body is the file as is)
    /slow/<name>?pieces=&delay=   200 with Content-Length, sent in pieces with a delay between
    /truncate/<name>         announces the full length, sends half, closes
    /status/<code>           that status, empty body
    /length/<n>              announces n bytes, sends none
    /bad-length              Content-Length: banana
    /hops/<n>/<name>         n relative 302 redirects in all, the last to /file/<name>
    /redirect?to=<url>&code= a redirect to <url> (code 302 unless given)
    /no-location             302 without a Location header
    /stall-body              headers, then nothing
    /stall-response          reads the request, then nothing
    /trickle                 Content-Length 1000, one byte every 50 ms
    /trickle-headers         the status line and headers, one byte every 50 ms
    """

    protocol_version = "HTTP/1.1"
    timeout = 30

    def setup(self):
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in the request's thread: a failed handshake fails only it

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, dict(self.headers)))
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        route, _, rest = parts.path.lstrip("/").partition("/")
        self.close_connection = True
        try:
            getattr(self, "route_" + route.replace("-", "_"))(rest, query)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client gave up, which is what several tests want

    def _headers(self, status=200, length=None, **extra):
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in extra.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Connection", "close")
        self.end_headers()

    def route_file(self, name, q):
        body = self.server.files[name]
        self._headers(200, len(body))
        self.wfile.write(body)

    def route_encoded(self, name, q):
        body = self.server.files[name]
        self._headers(200, len(body), Content_Encoding="gzip")
        self.wfile.write(body)

    def route_chunked(self, name, q):
        body = self.server.files[name]
        self._headers(200, Transfer_Encoding="chunked")
        for i in range(0, len(body), 64 * 1024):
            piece = body[i : i + 64 * 1024]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def route_slow(self, name, q):
        body = self.server.files[name]
        pieces, delay = int(q["pieces"]), float(q["delay"])
        self._headers(200, len(body))
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            self.wfile.flush()
            if self.server.stop.wait(delay):
                return

    def route_truncate(self, name, q):
        body = self.server.files[name]
        self._headers(200, len(body))
        self.wfile.write(body[: len(body) // 2])

    def route_status(self, code, q):
        self._headers(int(code), 0)

    def route_length(self, n, q):
        self._headers(200, int(n))

    def route_bad_length(self, _, q):
        self._headers(200, Content_Length="banana")

    def route_hops(self, rest, q):
        n, _, name = rest.partition("/")
        target = f"/hops/{int(n) - 1}/{name}" if int(n) > 1 else f"/file/{name}"
        self._headers(302, 0, Location=target)

    def route_redirect(self, _, q):
        self._headers(int(q.get("code", 302)), 0, Location=q["to"])

    def route_no_location(self, _, q):
        self._headers(302, 0)

    def route_stall_body(self, _, q):
        self._headers(200, 1000)
        self.wfile.flush()
        self.server.stop.wait(30)

    def route_stall_response(self, _, q):
        self.server.stop.wait(30)

    def route_trickle(self, _, q):
        self._headers(200, 1000)
        for _ in range(1000):
            self.wfile.write(b"x")
            self.wfile.flush()
            if self.server.stop.wait(0.05):
                return

    def route_trickle_headers(self, _, q):
        for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 1000 + b"\r\n\r\n":
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            if self.server.stop.wait(0.05):
                return


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cert=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list = []
        self.stop = threading.Event()
        self.scheme = "http"
        if cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*cert)
            self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle_error(self, request, client_address):
        pass  # clients that abort (TLS failures, timeouts) are the point of these tests

    def url(self, path, host="127.0.0.1"):
        return f"{self.scheme}://{host}:{self.server_address[1]}{path}"

    def close(self):
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def https(pki):
    s = Server(pki.cert("server"))
    s.files["agent.tar.gz"] = BODY
    yield s
    s.close()


@pytest.fixture(scope="module")
def plain():
    s = Server()
    s.files["agent.tar.gz"] = BODY
    yield s
    s.close()


@pytest.fixture(scope="module")
def wrong_name(pki):
    s = Server(pki.cert("wrong-name"))
    s.files["agent.tar.gz"] = BODY
    yield s
    s.close()


def fetch(url, tmp_path, *, pki, limits=LIMITS, ca=True, **kw):
    dest = tmp_path / "download.tar.gz"
    with open(dest, "wb") as f:
        digest = download.download(url, f, limits=limits, ca_bundle=pki.ca if ca is True else ca, **kw)
    return digest, dest.read_bytes()


def failure(url, tmp_path, *, pki, **kw) -> OpsError:
    """The OpsError a download of url raises, checked for the secret it must never show."""
    with pytest.raises(OpsError) as e:
        fetch(url, tmp_path, pki=pki, **kw)
    exc = e.value
    # What a log line or a traceback would print: the message and every exception shown with it.
    shown = exc
    while shown is not None:
        assert "secret" not in str(shown)
        shown = shown.__cause__ or (None if shown.__suppress_context__ else shown.__context__)
    return exc


def written(tmp_path) -> int:
    return (tmp_path / "download.tar.gz").stat().st_size


# --- success -----------------------------------------------------------------------------------------


def test_download_streams_the_body_and_returns_its_digest(https, pki, tmp_path):
    digest, data = fetch(https.url("/file/agent.tar.gz" + SECRET), tmp_path, pki=pki,
                         expected_sha256="sha256:" + hashlib.sha256(BODY).hexdigest().upper())
    assert data == BODY
    assert digest == hashlib.sha256(BODY).hexdigest()


def test_localhost_name_is_verified_against_the_certificate(https, pki, tmp_path):
    _, data = fetch(https.url("/file/agent.tar.gz", host="localhost"), tmp_path, pki=pki)
    assert data == BODY


def test_chunked_body_without_content_length(https, pki, tmp_path):
    digest, data = fetch(https.url("/chunked/agent.tar.gz"), tmp_path, pki=pki)
    assert data == BODY and digest == hashlib.sha256(BODY).hexdigest()


def test_content_encoding_is_neither_requested_nor_decoded(https, pki, tmp_path):
    # A server labelling a .tar.gz "Content-Encoding: gzip" must not make us store the inner tar:
    # the digest is of the file as published.
    digest, data = fetch(https.url("/encoded/agent.tar.gz"), tmp_path, pki=pki)
    assert data == BODY
    path, headers = https.requests[-1]
    assert path == "/encoded/agent.tar.gz"
    assert headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("hops", [1, download.MAX_REDIRECTS])
def test_redirects_on_the_same_server_are_followed(https, pki, tmp_path, hops):
    _, data = fetch(https.url(f"/hops/{hops}/agent.tar.gz"), tmp_path, pki=pki)
    assert data == BODY


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_every_redirect_status_is_followed(https, pki, tmp_path, code):
    target = https.url("/file/agent.tar.gz")
    _, data = fetch(https.url(f"/redirect?code={code}&to={target}"), tmp_path, pki=pki)
    assert data == BODY


def test_plain_http_works_when_allowed(plain, pki, tmp_path):
    limits = dataclasses.replace(LIMITS, allow_http=True)
    _, data = fetch(plain.url("/file/agent.tar.gz"), tmp_path, pki=pki, limits=limits)
    assert data == BODY


def test_http_to_http_redirect_is_followed_when_http_is_allowed(plain, pki, tmp_path):
    limits = dataclasses.replace(LIMITS, allow_http=True)
    target = plain.url("/file/agent.tar.gz")
    _, data = fetch(plain.url(f"/redirect?to={target}"), tmp_path, pki=pki, limits=limits)
    assert data == BODY


def test_http_to_https_redirect_is_followed(plain, https, pki, tmp_path):
    limits = dataclasses.replace(LIMITS, allow_http=True)
    target = https.url("/file/agent.tar.gz")
    _, data = fetch(plain.url(f"/redirect?to={target}"), tmp_path, pki=pki, limits=limits)
    assert data == BODY


def test_progress_is_reported_a_few_times_a_second(https, pki, tmp_path):
    calls = []
    start = time.monotonic()
    fetch(https.url("/slow/agent.tar.gz?pieces=30&delay=0.04"), tmp_path, pki=pki,
          progress=lambda n, total: calls.append((n, total)))
    elapsed = time.monotonic() - start
    assert calls[0] == (0, len(BODY))
    assert calls[-1] == (len(BODY), len(BODY))
    counts = [n for n, _ in calls]
    assert counts == sorted(counts)
    assert len(calls) >= 3  # start, at least one while the body arrives (about 1.2 s), the end
    assert len(calls) <= 2 + elapsed / download.PROGRESS_INTERVAL_SECONDS + 1  # not once per chunk


def test_an_error_in_the_progress_callback_is_not_taken_for_a_network_error(https, pki, tmp_path):
    def progress(n, total):
        raise PermissionError(13, "Permission denied", "/var/lib/unbounded-agent/upgrade.json")

    with pytest.raises(PermissionError):
        fetch(https.url("/file/agent.tar.gz"), tmp_path, pki=pki, progress=progress)


def test_progress_total_is_none_without_content_length(https, pki, tmp_path):
    calls = []
    fetch(https.url("/chunked/agent.tar.gz"), tmp_path, pki=pki, progress=lambda n, t: calls.append((n, t)))
    assert calls[-1] == (len(BODY), None)


# --- refusals before any request ---------------------------------------------------------------------


def test_http_url_is_refused_unless_allowed(plain, pki, tmp_path):
    before = len(plain.requests)
    e = failure(plain.url("/file/agent.tar.gz" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.INVALID_PARAMETERS
    assert "plain http is refused" in e.message
    assert len(plain.requests) == before  # nothing was fetched


def test_url_with_user_info_is_refused(https, pki, tmp_path):
    before = len(https.requests)
    e = failure(https.url("/file/agent.tar.gz", host="user:secret@127.0.0.1"), tmp_path, pki=pki)
    assert e.reason == Reason.INVALID_PARAMETERS
    assert "user info" in e.message
    assert len(https.requests) == before


def test_malformed_digest_is_refused_before_downloading(https, pki, tmp_path):
    before = len(https.requests)
    e = failure(https.url("/file/agent.tar.gz"), tmp_path, pki=pki, expected_sha256="abc")
    assert e.reason == Reason.INVALID_PARAMETERS
    assert len(https.requests) == before


# --- failures ----------------------------------------------------------------------------------------


def test_checksum_mismatch_names_both_digests(https, pki, tmp_path):
    expected = "0" * 64
    e = failure(https.url("/file/agent.tar.gz" + SECRET), tmp_path, pki=pki, expected_sha256=expected)
    assert e.reason == Reason.CHECKSUM_MISMATCH
    assert expected in e.message
    assert hashlib.sha256(BODY).hexdigest() in e.message


@pytest.mark.parametrize("code, phrase", [(404, "Not Found"), (500, "Internal Server Error"), (204, "No Content")])
def test_status_other_than_200_fails(https, pki, tmp_path, code, phrase):
    e = failure(https.url(f"/status/{code}" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert f"HTTP {code} {phrase}" in e.message
    assert f"{https.url(f'/status/{code}')}" in e.message  # the redacted URL is named


def test_untrusted_certificate_fails_with_the_system_bundle(https, pki, tmp_path):
    e = failure(https.url("/file/agent.tar.gz" + SECRET), tmp_path, pki=pki, ca=None)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "TLS certificate verification failed" in e.message


def test_certificate_from_another_ca_fails(https, pki, tmp_path):
    e = failure(https.url("/file/agent.tar.gz" + SECRET), tmp_path, pki=pki, ca=pki.rogue_ca)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "TLS certificate verification failed" in e.message
    assert "[SSLError]" in e.message


def test_certificate_for_another_name_fails(wrong_name, pki, tmp_path):
    e = failure(wrong_name.url("/file/agent.tar.gz" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "Hostname mismatch" in e.message


def test_https_to_http_redirect_is_refused_even_when_http_is_allowed(https, plain, pki, tmp_path):
    target = quote(plain.url("/file/agent.tar.gz" + SECRET))
    for allow_http in (False, True):
        before = len(plain.requests)
        limits = dataclasses.replace(LIMITS, allow_http=allow_http)
        e = failure(https.url(f"/redirect?to={target}&sig=secret"), tmp_path, pki=pki, limits=limits)
        assert e.reason == Reason.DOWNLOAD_FAILED
        assert "refused redirect from https to plain http" in e.message
        assert plain.url("/file/agent.tar.gz") in e.message
        assert len(plain.requests) == before  # the downgrade was never followed


@pytest.mark.parametrize(
    "target, problem",
    [
        ("https://user:secret@127.0.0.1/x", "must not contain user info"),
        ("ftp://127.0.0.1/x?secret", "scheme must be https"),
        ("https://127.0.0.1/x#secret", "must not contain a fragment"),
    ],
)
def test_redirect_to_an_unacceptable_url_is_refused(https, pki, tmp_path, target, problem):
    e = failure(https.url(f"/redirect?to={quote(target)}"), tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "refused redirect" in e.message and problem in e.message


def test_too_many_redirects_fail(https, pki, tmp_path):
    e = failure(https.url(f"/hops/{download.MAX_REDIRECTS + 1}/agent.tar.gz" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert f"more than {download.MAX_REDIRECTS} redirects" in e.message


def test_redirect_without_location_fails(https, pki, tmp_path):
    e = failure(https.url("/no-location" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "redirect without a Location" in e.message


def test_content_length_over_the_bound_is_refused_before_reading(https, pki, tmp_path):
    e = failure(https.url(f"/length/{LIMITS.max_archive_bytes + 1}" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.INVALID_ARCHIVE
    assert "larger than maxArchiveBytes" in e.message and "Content-Length" in e.message
    assert written(tmp_path) == 0


def test_streamed_body_over_the_bound_is_refused(https, pki, tmp_path):
    https.files["big"] = os.urandom(3 * LIMITS.max_archive_bytes)
    e = failure(https.url("/chunked/big" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.INVALID_ARCHIVE
    assert "larger than maxArchiveBytes" in e.message
    assert written(tmp_path) <= LIMITS.max_archive_bytes


def test_invalid_content_length_fails(https, pki, tmp_path):
    e = failure(https.url("/bad-length" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "Content-Length" in e.message


def test_body_shorter_than_its_content_length_fails(https, pki, tmp_path):
    # http.client ends such a body quietly; only our own count catches it.
    e = failure(https.url("/truncate/agent.tar.gz" + SECRET), tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert f"closed after {len(BODY) // 2} of {len(BODY)} bytes" in e.message


def test_server_stalling_after_headers_hits_the_read_timeout(https, pki, tmp_path):
    limits = dataclasses.replace(LIMITS, read_timeout=0.3)
    e = failure(https.url("/stall-body" + SECRET), tmp_path, pki=pki, limits=limits)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "no data for 0.3 s (read timeout)" in e.message


def test_server_that_never_answers_hits_the_read_timeout(https, pki, tmp_path):
    limits = dataclasses.replace(LIMITS, read_timeout=0.3)
    e = failure(https.url("/stall-response" + SECRET), tmp_path, pki=pki, limits=limits)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "timed out waiting for the server's response" in e.message


def test_trickling_body_is_cut_off_by_the_deadline(https, pki, tmp_path):
    # One byte every 50 ms never trips the read timeout; only the deadline stops it, and it must stop
    # it mid-body (a read of 256 KiB would otherwise wait for all 1000 bytes).
    limits = dataclasses.replace(LIMITS, read_timeout=2, deadline_seconds=1)
    e = failure(https.url("/trickle" + SECRET), tmp_path, pki=pki, limits=limits)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "did not finish within the 1 s deadline" in e.message
    received = int(re.search(r"\((\d+) bytes received\)", e.message).group(1))
    assert received < 1000


def test_trickling_headers_are_cut_off_by_the_deadline(https, pki, tmp_path):
    limits = dataclasses.replace(LIMITS, read_timeout=2, deadline_seconds=1)
    e = failure(https.url("/trickle-headers" + SECRET), tmp_path, pki=pki, limits=limits)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "did not finish within the 1 s deadline (0 bytes received)" in e.message


def test_stalled_tls_handshake_is_bounded_by_the_connect_timeout(pki, tmp_path):
    # A TCP server that never speaks TLS.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        limits = dataclasses.replace(LIMITS, connect_timeout=0.3, read_timeout=30, deadline_seconds=30)
        e = failure(f"https://127.0.0.1:{port}/agent.tar.gz" + SECRET, tmp_path, pki=pki, limits=limits)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "timed out waiting for the server's response (connect timeout 0.3 s" in e.message


def test_connection_refused_fails(pki, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again below: nothing listens there any more
    e = failure(f"https://127.0.0.1:{port}/agent.tar.gz" + SECRET, tmp_path, pki=pki)
    assert e.reason == Reason.DOWNLOAD_FAILED
    assert "connection refused" in e.message
    assert f"https://127.0.0.1:{port}/agent.tar.gz" in e.message


def test_full_disk_is_insufficient_space(https, pki):
    # /dev/full fails every write with ENOSPC: a real full disk, without filling one.
    with open("/dev/full", "wb", buffering=0) as dest:
        with pytest.raises(OpsError) as e:
            download.download(https.url("/file/agent.tar.gz"), dest, limits=LIMITS, ca_bundle=pki.ca)
    assert e.value.reason == Reason.INSUFFICIENT_SPACE


def test_requests_own_messages_would_have_leaked_the_secret(pki):
    # Why messages are built from exception types only: requests quotes the URL with its query.
    import requests

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(requests.RequestException) as e:
        requests.get(f"https://127.0.0.1:{port}/a{SECRET}", timeout=2)
    assert "secret" in str(e.value)


# --- limits and free space ---------------------------------------------------------------------------


def test_limits_come_from_the_config(tmp_path):
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(
        "maxArchiveBytes: 1000\nconnectTimeoutSeconds: 1.5\nreadTimeoutSeconds: 2\n"
        "downloadDeadlineSeconds: 30\nallowInsecureHTTP: true\n"
    )
    assert Limits.from_config(config.load(str(cfg_file))) == Limits(
        max_archive_bytes=1000, connect_timeout=1.5, read_timeout=2, deadline_seconds=30, allow_http=True
    )
