"""Download URLs and digests from an upgrade request: validation, and redaction for every message.

A release URL may carry credentials: a pre-signed query (``?sig=...``) or user info
(``https://user:token@host/``). Nothing this project logs, stores in a state file or publishes in a
MachineOperation status may contain them, so every message names a URL only through ``redact``.
User info is refused outright rather than redacted: a credential that is never accepted can never
leak through a redirect, a proxy log or a traceback either.
"""

import ipaddress
import re
from urllib.parse import urlsplit

from .reasons import OpsError, Reason

INVALID = "<invalid URL>"
MAX_URL_LENGTH = 8192  # far above any real release URL; bounds what we parse, store and print

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# DNS names as resolvers accept them (letters, digits, '-' and '_' in dot-separated labels, an optional
# trailing dot). Anything else, such as '%' escapes, is refused rather than left to a parser to interpret.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _printable(text: str) -> bool:
    # str.isprintable() is False for control, format and separator characters (newline, tab, U+2028...)
    # except the ASCII space, which a URL must not hold either: a newline in a URL would forge a log line.
    return text.isprintable() and " " not in text


def redact(url: str) -> str:
    """``scheme://host[:port]/path`` of a URL: user info, query and fragment removed.

    Anything that does not parse as an absolute URL gives ``<invalid URL>``: a string such as
    ``user:token@host/x`` must not be echoed just because it failed to parse.
    """
    if not isinstance(url, str):
        return INVALID
    url = url.strip()
    if not url or len(url) > MAX_URL_LENGTH or not _printable(url):
        return INVALID
    try:
        parts = urlsplit(url)
    except ValueError:
        return INVALID
    host = parts.netloc.rpartition("@")[2]  # drop user info; the last '@' ends it
    if not parts.scheme or not host:
        return INVALID
    return f"{parts.scheme.lower()}://{host}{parts.path}"


def _invalid(what: str, url: str) -> OpsError:
    return OpsError(Reason.INVALID_PARAMETERS, f"{what}: {redact(url)}")


def validate(url: str, *, allow_http: bool) -> str:
    """The download URL, stripped of surrounding whitespace; OpsError(InvalidParameters) if unusable."""
    if not isinstance(url, str) or not url.strip():
        raise OpsError(Reason.INVALID_PARAMETERS, 'missing required parameter "downloadURL"')
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise OpsError(Reason.INVALID_PARAMETERS, f"URL is longer than {MAX_URL_LENGTH} characters")
    if not _printable(url):
        raise _invalid("URL contains whitespace or control characters", url)
    if "\\" in url:
        # Parsers disagree on backslashes (browsers read them as '/'): the host we check could differ
        # from the host we connect to.
        raise _invalid("URL contains a backslash", url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise _invalid("not a valid URL", url) from None
    scheme = parts.scheme.lower()
    # Without "://" what looks like a scheme may be a user name ("user:token@host/x"): never echo it.
    if not scheme or "://" not in url:
        raise _invalid("not an absolute http(s) URL", url)
    if scheme == "http" and not allow_http:
        raise _invalid("plain http is refused (allowInsecureHTTP is off in the agent config); use https", url)
    if scheme not in ("https", "http"):
        allowed = "https or http" if allow_http else "https"
        raise _invalid(f"URL scheme must be {allowed}, got {scheme!r}", url)
    if "@" in parts.netloc:
        raise _invalid(
            "URL must not contain user info (user:password@); credentials in URLs are refused so they "
            "can never reach a log or a status",
            url,
        )
    if "#" in url:
        raise _invalid("URL must not contain a fragment (#...)", url)
    host = parts.hostname
    if not host:
        raise _invalid("URL has no host", url)
    if not _valid_host(host, bracketed=parts.netloc.startswith("[")):
        if not host.isascii():
            raise _invalid("URL host must be ASCII (write an international domain name in its xn-- form)", url)
        raise _invalid("URL host is not a valid host name or IP address", url)
    if port == 0:
        raise _invalid("URL has an invalid port", url)
    # The scheme is case-insensitive; give the HTTP client and the redirect checks one spelling.
    return scheme + url[len(parts.scheme):]


def _valid_host(host: str, *, bracketed: bool) -> bool:
    if bracketed:
        if "%" in host:  # an IPv6 zone id ("%25eth0") names a local interface, never a release server
            return False
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME.fullmatch(host))


def parse_sha256(text: str | None) -> str | None:
    """The expected archive digest as 64 lowercase hex characters, or None when none is given.

    Accepts an optional ``sha256:`` prefix and surrounding whitespace, as upstream does.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise OpsError(Reason.INVALID_PARAMETERS, f"sha256 must be a string, got {type(text).__name__}")
    value = text.strip()
    if not value:
        return None
    if value[:7].lower() == "sha256:":
        value = value[7:]
    if not _HEX64.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise OpsError(
            Reason.INVALID_PARAMETERS,
            f"sha256 must be 64 hexadecimal characters, optionally prefixed by 'sha256:'; got {len(value)} "
            f"characters: {shown!r}",
        )
    return value.lower()
