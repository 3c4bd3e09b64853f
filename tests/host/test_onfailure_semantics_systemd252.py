"""Pins what the design relies on from systemd 252's OnFailure= with Restart=always (it changed in later
versions, systemd#27594/#33710): the handler fires once, when the start limit puts the unit in `failed`,
not between automatic restarts. Probation does not depend on it; it is the second path to recovery.
And on this host, recovery started by the real daemon's OnFailure= outside an upgrade changes nothing."""

import pytest
from upgrade_host import daemon, journal, look, prepare, wait_until

pytestmark = pytest.mark.testhost

PROBE = """\
[Unit]
OnFailure=onfailure-marker.service
StartLimitIntervalSec=60
StartLimitBurst=3
[Service]
ExecStart=/bin/sh -c 'sleep 0.5; exit 3'
Restart=always
RestartSec=1
"""
MARKER = """\
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'systemctl show -p NRestarts,Result,ActiveState onfailure-probe.service | tr "\\\\n" " " >> /var/tmp/onfailure.log; echo >> /var/tmp/onfailure.log'
"""


@pytest.fixture(scope="module")
def host(testhost_factory):
    with testhost_factory("onfailure", installed=True) as h:
        prepare(h)
        yield h


def test_systemd_is_252(host):
    assert host.run(["systemctl", "--version"]).stdout.startswith("systemd 252")


def test_onfailure_fires_once_at_the_start_limit_not_between_restarts(host):
    host.write("/etc/systemd/system/onfailure-probe.service", PROBE)
    host.write("/etc/systemd/system/onfailure-marker.service", MARKER)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "start", "--no-block", "onfailure-probe.service"])
    wait_until("the probe to fail for good", lambda: daemon(host, "onfailure-probe.service")["ActiveState"] == "failed",
               timeout=60)
    wait_until("the marker to have run", lambda: host.path("/var/tmp/onfailure.log").exists()
               and daemon(host, "onfailure-marker.service")["ActiveState"] == "inactive", timeout=60)
    probe = daemon(host, "onfailure-probe.service")
    log = journal(host, "onfailure-probe.service")
    # three starts; the third automatic restart is refused by the start limit (252 keeps Result=exit-code
    # and counts the refused restart in NRestarts)
    assert log.count("Started onfailure-probe.service") == 3
    assert probe["ActiveState"] == "failed" and probe["NRestarts"] == "3" and probe["Result"] == "exit-code"
    assert log.index("Start request repeated too quickly") < log.index("Triggering OnFailure= dependencies")
    # the handler ran once, and only when the probe was failed for good
    assert log.count("Triggering OnFailure= dependencies") == 1
    lines = host.read("/var/tmp/onfailure.log").splitlines()
    assert len(lines) == 1, lines
    assert "ActiveState=failed" in lines[0] and "NRestarts=3" in lines[0]


def test_daemon_crash_loop_outside_an_upgrade_changes_no_link(host):
    before = look(host)
    dropin = "/run/systemd/system/unbounded-agent-daemon.service.d/50-crash.conf"
    host.write("/var/tmp/crash.conf", "[Service]\nExecStart=\nExecStart=/bin/sh -c 'exit 3'\nRestartSec=1\n")
    host.run(["mkdir", "-p", dropin.rsplit("/", 1)[0]])
    host.run(["cp", "/var/tmp/crash.conf", dropin])
    host.run(["systemctl", "daemon-reload"])
    try:
        host.run(["systemctl", "restart", "--no-block", "unbounded-agent-daemon.service"])
        wait_until("recovery to have run", lambda: "not changing any link" in journal(
            host, "unbounded-agent-daemon-recovery.service"), timeout=90)
        assert daemon(host)["ActiveState"] == "failed"
    finally:
        host.run(["rm", "-f", dropin])
        host.run(["systemctl", "daemon-reload"])
        host.run(["systemctl", "reset-failed", "unbounded-agent-daemon.service"])
        host.run(["systemctl", "start", "unbounded-agent-daemon.service"])
    after = look(host)
    assert {k: after[k] for k in ("current", "last_good", "current_sha", "record")} == \
           {k: before[k] for k in ("current", "last_good", "current_sha", "record")}
    assert journal(host, "unbounded-agent-daemon-recovery.service").count("not changing any link") == 1
