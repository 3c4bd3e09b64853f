"""Settings the units honour. With binDir, stateDir and the four timeouts the units depend on set in config.yaml
before the .deb is installed, every unit takes them (the generator's drop-ins, shown by systemctl), the daemon
runs from the configured bin dir and writes only its progress under the configured state dir; upgrade,
rollback and reset all work there; /usr/bin/unbounded-agent always works, and a second reset is a clean no-op.
A value no unit could honour is refused with a clear error."""

import json
from pathlib import Path

import pytest
import releases
from upgrade_host import CONFIG, DAEMON, look, request_id, rollback, tree, unit_seconds, upgrade

from unbounded_agent import config
from unbounded_agent.upgrade import units

pytestmark = pytest.mark.testhost
REPO = Path(__file__).resolve().parents[2]
BIN = "/opt/agent-bin"
STATE = "/srv/unbounded-agent-state"  # "unbounded" in its name: a reset removes the whole directory
SETTINGS = f"""\
binDir: {BIN}
stateDir: {STATE}
readyTimeoutSeconds: 20
probationSeconds: 4
downloadDeadlineSeconds: 900
preflightTimeoutSeconds: 15
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> config.Config:
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(SETTINGS)
    return config.load(str(path))


@pytest.fixture(scope="module")
def host(testhost_factory, deb_path, tmp_path_factory):
    with testhost_factory("settings") as h:
        h.write(CONFIG, SETTINGS)  # before the package is installed
        h.install_deb(deb_path)
        h.start_https()
        h.url = h.serve(releases.real_release(REPO, "2.0.0", tmp_path_factory.mktemp("v2")), "agent-2.0.0.tar.gz")
        yield h


def link(host, name: str) -> str:
    return host.run(["readlink", f"{BIN}/{name}"], check=False).stdout.strip()


def test_every_setting_reaches_the_units(host, cfg):
    assert unit_seconds(host, DAEMON) == 20  # readyTimeoutSeconds: systemd's own start bound for the daemon
    assert unit_seconds(host, "unbounded-upgrade-stage@x.service") == units.stage_seconds(cfg) == 900 + 120
    assert unit_seconds(host, "unbounded-upgrade-preflight@x.service") == units.preflight_seconds(cfg) == 15 + 60
    assert unit_seconds(host, "unbounded-upgrade-probation.service") == units.probation_seconds(cfg)
    assert unit_seconds(host, units.RECOVERY_UNIT) == units.recovery_seconds(cfg)
    show = host.run(["systemctl", "show", DAEMON, "-p", "ExecStart,ReadWritePaths"]).stdout
    assert f"path={BIN}/unbounded-agent-current" in show and f"{STATE}/machineoperations" in show
    preflight = host.run(["systemctl", "show", "unbounded-upgrade-preflight@x.service", "-p",
                          "ReadWritePaths,ReadOnlyPaths"]).stdout
    assert f"ReadWritePaths=-{STATE}" in preflight and f"ReadOnlyPaths=-{BIN}" in preflight


def test_the_daemon_runs_from_the_configured_bin_dir(host, version):
    pid = host.run(["systemctl", "show", "-p", "MainPID", "--value", DAEMON]).stdout.strip()
    assert pid != "0" and f"{BIN}/unbounded-agent-current" in host.run(["cat", f"/proc/{pid}/cmdline"]).stdout
    assert link(host, "unbounded-agent-current") == "unbounded-agent-blue"
    assert host.run(["test", "-e", "/var/lib/unbounded-agent/bin"], check=False).returncode != 0
    assert host.run(["unbounded-agent", "version"]).stdout.strip() == f"unbounded-agent {version}"
    assert f"bin dir:     {BIN}" in host.run(["unbounded-agent", "status"]).stdout
    # in its sandbox it writes its own progress under the configured state dir, and nothing else there
    probe = "f=$0/.probe-$$; touch $f && rm $f"
    assert host.run(["nsenter", "-t", pid, "-m", "sh", "-c", probe, f"{STATE}/machineoperations"],
                    check=False).returncode == 0
    assert host.run(["nsenter", "-t", pid, "-m", "sh", "-c", probe, STATE], check=False).returncode != 0


def test_upgrade_and_rollback_work_there(host, version):
    r = upgrade(host, host.url, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(host.read(f"{STATE}/upgrade.json"))
    assert rec["id"] == request_id(r) and rec["phase"] == "committed" and rec["to"]["version"] == "2.0.0"
    assert (link(host, "unbounded-agent-current"), link(host, "unbounded-agent-last-good")) == (
        "unbounded-agent-green", "unbounded-agent-blue")
    assert host.run(["unbounded-agent", "version"]).stdout.strip() == "unbounded-agent 2.0.0"
    r = rollback(host, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert link(host, "unbounded-agent-current") == "unbounded-agent-blue"
    assert host.run(["unbounded-agent", "version"]).stdout.strip() == f"unbounded-agent {version}"
    assert look(host)["daemon_state"] == "active"


def test_a_value_no_unit_can_honour_is_refused_with_a_clear_error(host, cfg):
    host.write(CONFIG, SETTINGS.replace("probationSeconds: 4", "probationSeconds: 100000"))
    try:
        r = host.run(["unbounded-agent", "status"], check=False)
        assert r.returncode == 3
        assert "probationSeconds must be between 1 and 3600 seconds (it sets the probation unit's TimeoutStartSec=)" \
            in r.stderr
        # the generator writes nothing from such a config: the units keep the values they ship with
        by_hand = host.run(["/lib/systemd/system-generators/unbounded-agent-generator"], check=False)
        assert by_hand.returncode == 0 and "probationSeconds must be between" in by_hand.stderr
        host.run(["systemctl", "daemon-reload"])
        assert unit_seconds(host, "unbounded-upgrade-probation.service") == units.probation_seconds(config.load("/absent"))
    finally:
        host.write(CONFIG, SETTINGS)
        host.run(["systemctl", "daemon-reload"])
    assert unit_seconds(host, "unbounded-upgrade-probation.service") == units.probation_seconds(cfg)


def test_reset_removes_the_agent_from_there_and_a_second_reset_changes_nothing(host):
    r = host.run(["unbounded-agent", "reset"], check=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [line.split()[0] for line in tree(host, BIN)] in ([BIN], [])  # a shared bin dir itself stays, empty
    assert host.run(["test", "-e", STATE], check=False).returncode != 0
    places = (BIN, STATE, "/var/lib/unbounded-agent", "/etc/unbounded", "/etc/systemd/system", "/var/lib/machines")
    before = tree(host, *places)
    again = host.run(["unbounded-agent", "reset"], check=False, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr  # the toolset's own CLI: no agent binary is left
    assert "reset complete" in again.stdout
    assert tree(host, *places) == before
    assert host.run(["unbounded-agent", "version"], check=False).returncode == 0
