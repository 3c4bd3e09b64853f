"""The agent daemon, the one network-facing process, runs with the least it needs: its exposure score stays at
or below the level recorded here, it has no capabilities and no way to the system bus (it starts no unit),
and the only places it can write are its requests, its acknowledgements and its own progress."""

from pathlib import Path

import pytest
from exposure import exposure, recorded
from queue_host import OPS, STATE
from upgrade_host import prepare

pytestmark = pytest.mark.testhost

DAEMON = "unbounded-agent-daemon.service"
# `systemd-analyze security` on the test host's systemd 252: 9.6 (UNSAFE) before the sandbox; README's table
# ("Hardened units") records what it is with it.
RECORDED_EXPOSURE = recorded(Path(__file__).resolve().parents[2] / "README.md")[DAEMON]


@pytest.fixture(scope="module")
def host(testhost_factory):
    with testhost_factory("sandbox", installed=True) as h:
        prepare(h)
        h.run(["mkdir", "-p", f"{OPS}/results"])  # as the dispatcher makes it: it must exist to be refused
        h.daemon_pid = h.run(["systemctl", "show", "-p", "MainPID", "--value", DAEMON]).stdout.strip()
        yield h


def in_daemon_view(host, script: str):
    """Run script as root in the daemon's mount namespace: what the daemon can see and write."""
    return host.run(["nsenter", "-t", host.daemon_pid, "-m", "sh", "-c", script], check=False)


def test_the_exposure_is_no_worse_than_recorded(host):
    out = host.run(["systemd-analyze", "security", "--no-pager", DAEMON]).stdout
    assert exposure(out, DAEMON) <= RECORDED_EXPOSURE, out


def test_the_daemon_has_no_capabilities_and_no_new_privileges(host):
    status = host.run(["cat", f"/proc/{host.daemon_pid}/status"]).stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapBnd"], 16) == 0 and int(fields["CapEff"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_the_system_bus_is_out_of_its_reach(host):
    r = in_daemon_view(host, "test -S /run/dbus/system_bus_socket")
    assert r.returncode != 0
    assert host.run(["test", "-S", "/run/dbus/system_bus_socket"]).returncode == 0  # it is there for others


@pytest.mark.parametrize("path, writable", [
    (f"{STATE}/machineoperations", True),  # its own progress
    (f"{OPS}/spool/requests", True),  # what it asks for
    (f"{OPS}/spool", True),  # where it writes a request before renaming it into requests/
    (f"{OPS}/reset", False),  # the reset's checkpoint and reports
    (f"{OPS}/gates", True),  # its acknowledgements
    (f"{OPS}/results", False),  # the dispatcher's
    (f"{STATE}/bin", False),  # the agent's binaries
    (STATE, False),  # the upgrade record
    ("/etc", False),
    ("/usr/lib/unbounded-agent", False),
])
def test_it_writes_only_its_requests_acknowledgements_and_progress(host, path, writable):
    r = in_daemon_view(host, f"f={path}/.probe-$$; touch $f && rm $f")
    assert (r.returncode == 0) is writable, r.stderr
