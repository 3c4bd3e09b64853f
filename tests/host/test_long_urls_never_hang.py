"""Names that cannot break: the chain's units are named by short request ids, whatever the URL. Through
`systemctl start unbounded-upgrade@<escaped URL>.service`, in the 10-character gap where the entry unit's name
fits and `unbounded-upgrade-preflight@<escaped URL>` (the old chain) would not have: a name the journal takes
(up to 254 characters) runs, a name of 255 — which the journal refuses as a stream's unit — is refused at once
by the unit with its reason in the journal; a longer one is refused at once by systemctl. Through the CLI any
URL up to its bound runs, and a longer one is refused at once with InvalidParameters. Never a hang, and
nothing queued by a refusal. The URL never appears in a unit's Description=."""

from pathlib import Path

import pytest
import releases
from upgrade_host import escape, prepare, settle, upgrade

pytestmark = pytest.mark.testhost
REPO = Path(__file__).resolve().parents[2]
MAX_NAME = 255  # systemd's limit on a unit name
ENTRY = "unbounded-upgrade@{}.service"
GAP = range(MAX_NAME - len(ENTRY.format("")) - 9, MAX_NAME - len(ENTRY.format("")) + 1)  # fits the entry, not preflight@


@pytest.fixture(scope="module")
def host(testhost_factory, tmp_path_factory):
    with testhost_factory("long-urls", installed=True) as h:
        prepare(h)
        h.url = h.serve(releases.real_release(REPO, "2.0.0", tmp_path_factory.mktemp("v2")), "agent.tar.gz")
        r = upgrade(h, h.url, "--wait")  # from here on the same release again: it runs, and changes nothing
        assert r.returncode == 0, r.stdout + r.stderr
        yield h


def padded(host, escaped_length: int) -> str:
    """The release's URL with a query that makes its escaped form exactly escaped_length long."""
    base = host.url + "?pad="
    n = escaped_length - len(escape(host, base))
    assert n > 0
    url = base + "a" * n
    assert len(escape(host, url)) == escaped_length
    return url


@pytest.mark.parametrize("length", [GAP.start, GAP.stop - 2])
def test_a_url_in_the_gap_runs_through_systemctl_start(host, length):
    url = padded(host, length)
    unit = ENTRY.format(escape(host, url))
    assert len(unit) <= MAX_NAME < len(unit.replace("unbounded-upgrade@", "unbounded-upgrade-preflight@"))
    r = host.run(["systemctl", "start", unit], check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = settle(host)
    assert rec["phase"] == "committed" and rec["same_content"] and "pad=" not in rec["url"]
    assert url not in host.run(["systemctl", "show", "-p", "Description", "--value", unit]).stdout


def test_a_name_the_journal_refuses_is_refused_at_once_by_the_unit(host):
    before = settle(host)["id"]
    unit = ENTRY.format(escape(host, padded(host, GAP.stop - 1)))
    assert len(unit) == MAX_NAME
    r = host.run(["systemctl", "start", unit], check=False, timeout=60)
    assert r.returncode != 0
    status = host.run(["systemctl", "status", "--no-pager", "-n", "5", unit], check=False).stdout
    assert "InvalidParameters: the unit name is 255 characters long" in status and "unbounded-agent upgrade URL" in status
    assert settle(host)["id"] == before  # nothing was queued


@pytest.mark.parametrize("length", [GAP.stop, GAP.stop + 40, 2000])
def test_a_url_too_long_for_a_unit_name_is_refused_at_once_by_systemctl(host, length):
    before = settle(host)["id"]
    r = host.run(["systemctl", "start", ENTRY.format(escape(host, padded(host, length)))], check=False, timeout=60)
    said = r.stderr.rsplit(".service", 1)[-1]  # what systemctl says after the name it could not take
    assert r.returncode != 0 and r.stderr.startswith("Failed to start") and said.strip(), r.stderr[-300:]
    assert settle(host)["id"] == before  # nothing was queued


@pytest.mark.parametrize("length", [GAP.start, 2000, 8000])
def test_any_url_within_its_bound_runs_through_the_cli(host, length):
    url = host.url + "?pad=" + "a" * (length - len(host.url) - 5)
    r = upgrade(host, url, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert settle(host)["same_content"]


def test_a_url_longer_than_its_bound_is_refused_at_once_by_the_cli(host):
    r = upgrade(host, host.url + "?pad=" + "a" * 9000, "--wait", timeout=60)
    assert r.returncode == 4 and "longer than 8192 characters" in r.stderr
