"""Pins what the operation queue relies on from systemd 252's path units (DirectoryNotEmpty=), with units of
the test's own so only systemd's behaviour is under test:

- a file that arrives while the triggered service runs starts no second run at once, but the service is
  started again as soon as it stops with the directory still not empty — no request is ever missed;
- a service that stops and leaves the directory not empty is started again and again, until a limit fails
  the path unit (the service's start limit by default, or TriggerLimitBurst=): the dispatcher must always
  leave the spool empty;
- a service killed with SIGKILL while files remain is started again at once;
- a file present at boot starts the service.
The dispatcher's own behaviour on these points is in test_queue_dispatcher.py."""

import pytest
from waiting import wait_until

pytestmark = pytest.mark.testhost

# A service that handles one file per run, and waits for /srv/go before it does (a handshake, not a delay).
ONE_PER_RUN = """\
[Service]
Type=exec
ExecStart=/bin/sh -c 'echo start >> /srv/log; f=$(ls /srv/q | head -n1); touch /srv/running; \\
  while [ ! -e /srv/go ]; do sleep 0.05; done; rm -f /srv/go /srv/running "/srv/q/$f"'
"""
LEAVES_FILES = """\
[Unit]
{unit}
[Service]
Type=exec
ExecStart=/bin/sh -c 'echo start >> /srv/log'
"""


def path_unit(extra: str = "") -> str:
    return f"[Path]\nDirectoryNotEmpty=/srv/q\nMakeDirectory=yes\n{extra}\n[Install]\nWantedBy=paths.target\n"


@pytest.fixture
def host(testhost_factory):
    with testhost_factory("pathpin") as h:
        yield h


def install(host, path: str, service: str) -> None:
    host.write("/etc/systemd/system/pin.path", path)
    host.write("/etc/systemd/system/pin.service", service)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "enable", "--now", "pin.path"])


def show(host, unit: str) -> dict:
    out = host.run(["systemctl", "show", unit, "-p", "ActiveState,SubState,Result"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def starts(host) -> int:
    p = host.path("/srv/log")
    return len(p.read_text().splitlines()) if p.exists() else 0


def test_systemd_is_252(host):
    assert host.run(["systemctl", "--version"]).stdout.startswith("systemd 252")


def test_a_file_that_arrives_during_a_run_starts_the_service_again_once_it_stops(host):
    install(host, path_unit(), ONE_PER_RUN)
    host.run(["touch", "/srv/q/1"])
    wait_until("the first run", lambda: host.path("/srv/running").exists())
    host.run(["touch", "/srv/q/2"])  # arrives while the service runs
    assert starts(host) == 1 and show(host, "pin.service")["ActiveState"] == "active"
    host.run(["touch", "/srv/go"])  # the first run handles file 1 and stops; file 2 is still there
    wait_until("the second run", lambda: starts(host) == 2 and host.path("/srv/running").exists())
    host.run(["touch", "/srv/go"])
    wait_until("the service to stop with the directory empty",
               lambda: show(host, "pin.service")["ActiveState"] == "inactive" and not host.run(["ls", "/srv/q"]).stdout)
    assert starts(host) == 2
    assert show(host, "pin.path")["SubState"] == "waiting"


def test_a_service_that_leaves_files_is_restarted_until_its_start_limit_fails_the_path_unit(host):
    install(host, path_unit(), LEAVES_FILES.format(unit=""))
    host.run(["touch", "/srv/q/stuck"])
    wait_until("the path unit to give up", lambda: show(host, "pin.path")["ActiveState"] == "failed", timeout=60)
    assert show(host, "pin.path")["Result"] == "unit-start-limit-hit"
    assert starts(host) >= 5  # the default StartLimitBurst of the service (5 starts within its 10 s interval)


def test_trigger_limit_burst_fails_the_path_unit_first_when_it_is_lower(host):
    install(host, path_unit("TriggerLimitIntervalSec=60\nTriggerLimitBurst=3"),
            LEAVES_FILES.format(unit="StartLimitBurst=100"))
    host.run(["touch", "/srv/q/stuck"])
    wait_until("the path unit to give up", lambda: show(host, "pin.path")["ActiveState"] == "failed", timeout=60)
    assert show(host, "pin.path")["Result"] == "trigger-limit-hit"
    assert starts(host) == 3


def test_a_service_killed_while_files_remain_is_started_again(host):
    install(host, path_unit(), ONE_PER_RUN)
    host.run(["touch", "/srv/q/1"])
    wait_until("the first run", lambda: host.path("/srv/running").exists())
    host.run(["systemctl", "kill", "--signal=KILL", "pin.service"])
    wait_until("a second run", lambda: starts(host) == 2)
    host.run(["touch", "/srv/go"])
    wait_until("the directory to be empty", lambda: not host.run(["ls", "/srv/q"]).stdout)
    assert show(host, "pin.path")["ActiveState"] == "active"


def test_a_file_present_at_boot_starts_the_service(host):
    install(host, path_unit(), ONE_PER_RUN)
    host.run(["systemctl", "stop", "pin.path"])  # so the file below waits for the boot
    host.run(["touch", "/srv/q/1"])
    host.power_cycle(hard=True)
    wait_until("the run after the boot", lambda: starts(host) == 1 and host.path("/srv/running").exists())
    host.run(["touch", "/srv/go"])
    wait_until("the directory to be empty", lambda: not host.run(["ls", "/srv/q"]).stdout)
