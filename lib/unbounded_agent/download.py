"""Download of the release archive for the download-stage step.

The body is streamed into a file the caller owns, in constant memory, while its SHA-256 is computed.
Every bound is enforced here, not left to the server's good behaviour: connect and read timeouts, an
overall deadline that also interrupts a read that is making slow progress, the archive size (announced
and actual), and the number and direction of redirects.

Messages name URLs only through ``urls.redact``. The exception text of requests and urllib3 holds the
full URL (query included), so it is never put into a message: failures are described from the
exception's type and a few fields known to be free of the URL.
"""

import dataclasses
import errno
import hashlib
import hmac
import http
import http.client
import os
import socket
import ssl
import time
import typing
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from . import deadline, urls
from .reasons import OpsError, Reason

CHUNK_BYTES = 256 * 1024
MAX_REDIRECTS = 5
PROGRESS_INTERVAL_SECONDS = 0.25
_REDIRECTS = {301, 302, 303, 307, 308}


@dataclasses.dataclass(frozen=True)
class Limits:
    max_archive_bytes: int
    connect_timeout: float
    read_timeout: float
    deadline_seconds: float
    allow_http: bool

    @classmethod
    def from_config(cls, cfg) -> "Limits":
        return cls(
            max_archive_bytes=cfg.max_archive_bytes,
            connect_timeout=cfg.connect_timeout_seconds,
            read_timeout=cfg.read_timeout_seconds,
            deadline_seconds=cfg.download_deadline_seconds,
            allow_http=cfg.allow_insecure_http,
        )


def download(
    url: str,
    dest: typing.BinaryIO,
    *,
    limits: Limits,
    expected_sha256: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    ca_bundle: str | None = None,
) -> str:
    """Stream ``url`` into ``dest`` and return the archive's SHA-256 (hex).

    Raises OpsError: InvalidParameters (the URL or digest), DownloadFailed (network, TLS, HTTP status,
    redirects, deadline), InvalidArchive (larger than max_archive_bytes), ChecksumMismatch,
    InsufficientSpace (dest is on a full disk). ``dest`` holds partial data after a failure; the
    caller discards it, and flushes and fsyncs it after a success.

    ``progress(bytes_so_far, total_or_None)`` is called when the body starts, at most every
    PROGRESS_INTERVAL_SECONDS while it arrives, and once at the end. Whatever it raises propagates as is.
    """
    url = urls.validate(url, allow_http=limits.allow_http)
    expected = urls.parse_sha256(expected_sha256)
    transfer = _Transfer(url, limits, ca_bundle, progress)
    digest = transfer.run(dest)
    if expected is not None and not hmac.compare_digest(digest, expected):
        raise OpsError(
            Reason.CHECKSUM_MISMATCH,
            f"agent archive SHA-256 does not match the expected digest: expected {expected}, got {digest} "
            f"({transfer.received} bytes from {urls.redact(transfer.url)})",
        )
    return digest


class _Transfer:
    def __init__(self, url: str, limits: Limits, ca_bundle: str | None, progress):
        self.url = url  # the URL being fetched: changes with each redirect, named in every message
        self.limits = limits
        self.verify = ca_bundle or True  # True: the system CA bundle (Debian's requests uses it)
        self.progress = progress
        self.received = 0
        self.total: int | None = None
        self.watchdog: deadline.Watchdog | None = None
        self.deadline = 0.0
        self.responded = False  # headers of the final response arrived: a timeout now is in the body

    def run(self, dest: typing.BinaryIO) -> str:
        import requests
        import urllib3

        network_errors = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)
        self.deadline = time.monotonic() + self.limits.deadline_seconds
        self.watchdog = deadline.Watchdog(self.limits.deadline_seconds)
        session = deadline.session(self.watchdog)
        try:
            response = self._open(session)
            with response:
                return self._receive(response, dest, self.watchdog)
        except OpsError:
            raise
        except _ProgressFailed as e:
            raise e.error from None  # the caller's own failure, not a network one
        except network_errors as e:
            if self.watchdog.fired:
                raise self._deadline_error() from None
            raise OpsError(
                Reason.DOWNLOAD_FAILED,
                f"download from {urls.redact(self.url)} failed: {_describe(e, self.limits, self.responded)} "
                f"[{type(e).__name__}]",
            ) from None
        finally:
            self.watchdog.cancel()
            session.close()

    def _open(self, session):
        """Send the request, following at most MAX_REDIRECTS redirects, each checked before it is followed."""
        headers = {
            # The digest is of the file as published: ask for it unencoded and never decode what arrives,
            # which also keeps a Content-Encoding bomb out of the size accounting.
            "Accept-Encoding": "identity",
            "User-Agent": "unbounded-agent-upgrade",
        }
        timeout = (self.limits.connect_timeout, self.limits.read_timeout)
        for hop in range(MAX_REDIRECTS + 1):
            response = session.get(
                self.url, headers=headers, timeout=timeout, verify=self.verify, stream=True, allow_redirects=False
            )
            if response.status_code not in _REDIRECTS:
                return response
            location = response.headers.get("Location")
            status = response.status_code
            response.close()
            if hop == MAX_REDIRECTS:
                raise OpsError(
                    Reason.DOWNLOAD_FAILED,
                    f"download from {urls.redact(self.url)} failed: more than {MAX_REDIRECTS} redirects",
                )
            self.url = self._redirect_target(status, location)
        raise AssertionError("unreachable")

    def _redirect_target(self, status: int, location: str | None) -> str:
        if not location or not location.strip():
            raise OpsError(
                Reason.DOWNLOAD_FAILED, f"HTTP {status} redirect without a Location from {urls.redact(self.url)}"
            )
        target = urljoin(self.url, location.strip())
        try:
            downgrade = urlsplit(target).scheme.lower() == "http"
        except ValueError:
            downgrade = False
        if downgrade and urlsplit(self.url).scheme == "https":
            # Refused even when allowInsecureHTTP is on: that switch is for an operator who asked for an
            # http URL, not for a server that strips TLS from an https one.
            raise OpsError(
                Reason.DOWNLOAD_FAILED,
                f"refused redirect from https to plain http: {urls.redact(self.url)} -> {urls.redact(target)}",
            )
        try:
            return urls.validate(target, allow_http=self.limits.allow_http)
        except OpsError as e:
            message = f"refused redirect from {urls.redact(self.url)}: {e.message}"
            raise OpsError(Reason.DOWNLOAD_FAILED, message) from None

    def _receive(self, response, dest: typing.BinaryIO, watchdog: deadline.Watchdog) -> str:
        self.responded = True
        status = response.status_code
        if status != 200:
            try:
                phrase = http.HTTPStatus(status).phrase  # never the server's own reason text
            except ValueError:
                phrase = "unknown status"
            raise OpsError(
                Reason.DOWNLOAD_FAILED,
                f"download from {urls.redact(self.url)} failed: the server answered HTTP {status} {phrase}, not 200",
            )
        self.total = self._announced_length(response)
        digest = hashlib.sha256()
        limit = self.limits.max_archive_bytes
        last_report = time.monotonic()
        self._report()
        # urllib3's raw stream: bytes as they came off the wire (no Content-Encoding decoding), with
        # chunked transfer-encoding handled.
        for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
            if self.received + len(chunk) > limit:
                raise OpsError(
                    Reason.INVALID_ARCHIVE,
                    f"archive at {urls.redact(self.url)} is larger than maxArchiveBytes ({limit} bytes): "
                    f"more than {limit} bytes arrived",
                )
            _write(dest, chunk)
            digest.update(chunk)
            self.received += len(chunk)
            now = time.monotonic()
            if watchdog.fired or now > self.deadline:
                raise self._deadline_error()
            if now - last_report >= PROGRESS_INTERVAL_SECONDS:
                self._report()
                last_report = now
        if watchdog.fired:  # the shutdown may end a read as a clean end of stream
            raise self._deadline_error()
        if self.total is not None and self.received != self.total:
            # http.client does not raise when a body is shorter than its Content-Length: it just ends.
            raise OpsError(
                Reason.DOWNLOAD_FAILED,
                f"download from {urls.redact(self.url)} failed: the connection closed after {self.received} "
                f"of {self.total} bytes",
            )
        self._report()
        return digest.hexdigest()

    def _report(self) -> None:
        if self.progress is None:
            return
        try:
            self.progress(self.received, self.total)
        except Exception as e:
            # Set apart so that, say, an OSError from writing a status file is not taken for a network error.
            raise _ProgressFailed(e) from e

    def _announced_length(self, response) -> int | None:
        if "chunked" in response.headers.get("Transfer-Encoding", "").lower():
            return None  # a Content-Length beside chunked encoding is meaningless (RFC 9112 §6.3)
        value = response.headers.get("Content-Length")
        if value is None:
            return None
        if not value.strip().isdigit():
            raise OpsError(
                Reason.DOWNLOAD_FAILED,
                f"download from {urls.redact(self.url)} failed: invalid Content-Length {value[:40]!r}",
            )
        length = int(value)
        if length > self.limits.max_archive_bytes:
            # Refused before reading a byte of the body.
            raise OpsError(
                Reason.INVALID_ARCHIVE,
                f"archive at {urls.redact(self.url)} is larger than maxArchiveBytes "
                f"({self.limits.max_archive_bytes} bytes): Content-Length is {length}",
            )
        return length

    def _deadline_error(self) -> OpsError:
        return OpsError(
            Reason.DOWNLOAD_FAILED,
            f"download from {urls.redact(self.url)} did not finish within the {self.limits.deadline_seconds:g} s "
            f"deadline ({self.received} bytes received)",
        )


class _ProgressFailed(Exception):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error


def _write(dest: typing.BinaryIO, chunk: bytes) -> None:
    try:
        dest.write(chunk)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OpsError(Reason.INSUFFICIENT_SPACE, f"cannot store the downloaded archive: {e.strerror}") from None
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot store the downloaded archive: {e.strerror}") from None


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and everything it wraps: causes, contexts, urllib3's ``reason``, exception args."""
    seen: list[BaseException] = []
    queue = [exc]
    while queue and len(seen) < 32:
        e = queue.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        linked = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        queue.extend(x for x in linked if isinstance(x, BaseException))
    return seen


def _describe(exc: BaseException, limits: Limits, responded: bool) -> str:
    """What went wrong, from exception types and URL-free fields only (never ``str(exception)``)."""
    import requests
    import urllib3

    chain = _causes(exc)

    def find(*types):
        return next((e for e in chain if isinstance(e, types)), None)

    try:  # urllib3 matches host names itself when OpenSSL does not, with its own exception
        from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch
    except ImportError:  # pragma: no cover - other urllib3 versions
        HostnameMismatch = ssl.CertificateError

    if (e := find(ssl.SSLCertVerificationError)) is not None:
        return f"TLS certificate verification failed ({e.verify_message})"
    if find(HostnameMismatch):
        return "TLS certificate verification failed (Hostname mismatch: the certificate is for another name)"
    if find(ConnectionRefusedError):
        return "connection refused"
    if find(ConnectionResetError):
        return "connection reset by the server"
    if find(socket.gaierror):
        return "cannot resolve the host name"
    # Before the generic timeouts: urllib3's NewConnectionError (refused, unreachable) subclasses its
    # ConnectTimeoutError, which is why only requests' own classification is trusted here.
    if find(requests.exceptions.ConnectTimeout):
        return f"could not connect within {limits.connect_timeout:g} s"
    if find(requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout):
        if responded:
            return f"no data for {limits.read_timeout:g} s (read timeout)"
        # urllib3 reports a stalled TLS handshake as a read timeout too, hence both values.
        return (
            f"timed out waiting for the server's response (connect timeout {limits.connect_timeout:g} s, "
            f"read timeout {limits.read_timeout:g} s)"
        )
    if (e := find(ssl.SSLError)) is not None:
        return f"TLS error ({e.reason or type(e).__name__})"
    if find(http.client.IncompleteRead, urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError):
        return "the connection broke during the transfer"
    if (e := find(OSError)) is not None and e.errno:
        return os.strerror(e.errno)
    return "request failed"
