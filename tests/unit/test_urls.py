"""Download URLs are checked before anything is fetched, and messages never show a credential."""

import pytest

from unbounded_agent import urls
from unbounded_agent.reasons import OpsError, Reason

DIGEST = "ab" * 32


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://example.com/rel/agent.tar.gz", "https://example.com/rel/agent.tar.gz"),
        ("https://example.com/a.tgz?sig=secret&se=2030", "https://example.com/a.tgz"),
        ("https://user:secret@example.com:8443/a.tgz", "https://example.com:8443/a.tgz"),
        ("https://a@secret@example.com/a.tgz", "https://example.com/a.tgz"),
        ("https://example.com/a.tgz#secret", "https://example.com/a.tgz"),
        ("HTTPS://Example.com/A.tgz?x=secret", "https://Example.com/A.tgz"),
        ("  https://example.com/a.tgz?secret  ", "https://example.com/a.tgz"),
        ("https://[::1]:8443/a.tgz?secret", "https://[::1]:8443/a.tgz"),
        ("ftp://example.com/a.tgz?secret", "ftp://example.com/a.tgz"),
        ("https://example.com", "https://example.com"),
    ],
)
def test_redact_keeps_scheme_host_port_and_path_only(url, shown):
    assert urls.redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        None,
        "user:secret@example.com/a.tgz",  # no '//': would parse as scheme "user" and echo the password
        "example.com/a.tgz?secret",
        "https://example.com/a\nsecret",  # a newline would forge a second log line
        "https://example.com/a\x1b[31msecret",
        "https://[::1/a?secret",
        "https:///a.tgz?secret",
        "https://user:secret@/a.tgz",
        "https://x/" + "a" * 9000,
    ],
)
def test_redact_gives_a_placeholder_for_what_does_not_parse(url):
    assert urls.redact(url) == urls.INVALID


def test_validate_strips_whitespace_and_normalises_the_scheme():
    assert urls.validate("  HTTPS://example.com/a.tgz?sig=x \n", allow_http=False) == "https://example.com/a.tgz?sig=x"
    assert urls.validate("http://10.0.0.1:8199/a.tgz", allow_http=True) == "http://10.0.0.1:8199/a.tgz"
    assert urls.validate("https://[fd00::1]/a.tgz", allow_http=False) == "https://[fd00::1]/a.tgz"
    assert urls.validate("https://release-host_1.example.com./a", allow_http=False)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("", 'missing required parameter "downloadURL"'),
        ("  ", 'missing required parameter "downloadURL"'),
        (None, 'missing required parameter "downloadURL"'),
        ("http://example.com/a.tgz?secret", "plain http is refused"),
        ("HTTP://example.com/a.tgz?secret", "plain http is refused"),
        ("ftp://example.com/a.tgz?secret", "scheme must be https, got 'ftp'"),
        ("file:///etc/passwd", "scheme must be https, got 'file'"),
        ("example.com/a.tgz?secret", "not an absolute http(s) URL"),
        ("/a.tgz?secret", "not an absolute http(s) URL"),
        ("https://user:secret@example.com/a.tgz", "must not contain user info"),
        ("https://secret@example.com/a.tgz", "must not contain user info"),
        ("https://example.com/a.tgz#secret", "must not contain a fragment"),
        ("https://example.com/a.tgz?secret#", "must not contain a fragment"),
        ("https://exa mple.com/a.tgz?secret", "whitespace or control characters"),
        ("https://example.com/a\tb?secret", "whitespace or control characters"),
        ("https://example.com/a\u2028b?secret", "whitespace or control characters"),
        ("https://example.com\\@evil.com/?secret", "backslash"),
        ("https://example.com:99999/a?secret", "not a valid URL"),
        ("https://example.com:https/a?secret", "not a valid URL"),
        ("https://example.com:0/a?secret", "invalid port"),
        ("https://[::1/a?secret", "not a valid URL"),
        ("https://[fe80::1%25eth0]/a?secret", "not a valid host"),
        ("https://exa%6dple.com/a?secret", "not a valid host"),
        ("https://bücher.example/a?secret", "must be ASCII"),
        ("https://:443/a?secret", "has no host"),
        ("https://x/" + "a" * 9000, "longer than 8192"),
    ],
)
def test_validate_refuses_unusable_urls_without_showing_secrets(url, problem):
    with pytest.raises(OpsError) as e:
        urls.validate(url, allow_http=False)
    assert e.value.reason == Reason.INVALID_PARAMETERS
    assert problem in e.value.message
    assert "secret" not in str(e.value)


def test_validate_names_the_redacted_url_in_the_message():
    with pytest.raises(OpsError) as e:
        urls.validate("https://user:secret@example.com/rel/a.tgz?sig=secret", allow_http=False)
    assert e.value.message.endswith(": https://example.com/rel/a.tgz")


def test_ftp_is_refused_even_when_http_is_allowed():
    with pytest.raises(OpsError, match="must be https or http, got 'ftp'"):
        urls.validate("ftp://example.com/a.tgz", allow_http=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, None),
        ("", None),
        ("  \n", None),
        (DIGEST, DIGEST),
        (DIGEST.upper(), DIGEST),
        (f"sha256:{DIGEST}", DIGEST),
        (f"  SHA256:{DIGEST.upper()}\n", DIGEST),
    ],
)
def test_parse_sha256_accepts_upstream_forms(text, expected):
    assert urls.parse_sha256(text) == expected


@pytest.mark.parametrize(
    "text",
    [DIGEST[:-1], DIGEST + "a", "g" * 64, f"sha512:{DIGEST}", f"sha256: {DIGEST}", f"{DIGEST[:32]} {DIGEST[32:]}",
     "sha256:"],
)
def test_parse_sha256_refuses_anything_else(text):
    with pytest.raises(OpsError) as e:
        urls.parse_sha256(text)
    assert e.value.reason == Reason.INVALID_PARAMETERS
    assert "64 hexadecimal characters" in e.value.message


def test_parse_sha256_refuses_a_non_string():
    # A YAML or JSON number in the parameters must not be read as a digest.
    with pytest.raises(OpsError, match="must be a string, got int"):
        urls.parse_sha256(12345)
