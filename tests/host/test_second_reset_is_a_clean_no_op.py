"""`unbounded-agent reset` is safe to run many times: after a reset has removed the agent binary,
/usr/bin/unbounded-agent falls back to the toolset's own CLI, so a second `unbounded-agent reset` exits 0 and
changes nothing, and `unbounded-agent version` and `status` still answer (for the toolset)."""

import json

import pytest
from upgrade_host import BIN, STATE, tree

pytestmark = pytest.mark.testhost
PLACES = (BIN, STATE, "/etc/unbounded", "/etc/systemd/system", "/var/lib/machines", "/etc/wireguard")


@pytest.fixture(scope="module")
def reset_once(testhost_factory):
    """A host with the package, reset once: each test of the module stands on its own (on any worker)."""
    with testhost_factory("reset-twice", installed=True) as h:
        yield h, h.run(["unbounded-agent", "reset"], check=False, timeout=600)


@pytest.fixture
def host(reset_once):
    return reset_once[0]


def test_a_second_reset_exits_0_and_changes_nothing(host, reset_once, version):
    first = reset_once[1]
    assert first.returncode == 0, first.stdout + first.stderr
    assert host.run(["test", "-e", f"{BIN}/unbounded-agent-current"], check=False).returncode != 0
    before = tree(host, *PLACES), host.run(["ip", "-o", "link"]).stdout, host.run(["ip", "rule"]).stdout
    second = host.run(["unbounded-agent", "reset"], check=False, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reset complete" in second.stdout
    assert (tree(host, *PLACES), host.run(["ip", "-o", "link"]).stdout, host.run(["ip", "rule"]).stdout) == before
    # and again, as a script would ask: every step found nothing to remove
    third = host.run(["unbounded-agent", "reset", "--json"], check=False, timeout=600)
    assert third.returncode == 0, third.stdout + third.stderr
    report = json.loads(third.stdout)
    assert report["result"] == "succeeded" and [s["step"] for s in report["steps"] if s["result"] != "succeeded"] == []
    assert {item for s in report["steps"] for item in s.get("removed", [])} == set()
    assert (tree(host, *PLACES), host.run(["ip", "-o", "link"]).stdout, host.run(["ip", "rule"]).stdout) == before


def test_the_command_still_answers_for_the_toolset(host, version):
    r = host.run(["unbounded-agent", "version"], check=False)
    assert (r.returncode, r.stdout) == (0, f"unbounded-agent {version}\n")
    st = host.run(["unbounded-agent", "status"], check=False)
    assert st.returncode == 0 and "current:     missing" in st.stdout
