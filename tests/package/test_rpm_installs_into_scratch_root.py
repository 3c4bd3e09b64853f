"""The .rpm in a scratch root (`rpm --nodeps --root`), its scriptlets run for real with systemctl and
systemd-update-helper stubbed (scratch_root.py):

- install seeds slot blue and the links, byte-compiles the library, presets the units (the fan-out controller
  to disabled) and starts the daemon and the path unit;
- `rpm -U` to a newer build keeps the agent an AgentUpgrade installed (slots, links, its state and a
  queued request), marks only the path unit (and the fan-out controller, where it runs) for restart and never
  touches the daemon or the dispatcher;
- erase disables the units (stopping the daemon, the path unit, the metrics unit and the fan-out controller,
  not the dispatcher), removes every file of the package, the toolset's state and the metrics textfile, and
  leaves the agent's slots to `unbounded-agent reset`.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from scratch_root import ScratchRoot

BIN = "/var/lib/unbounded-agent/bin"
UNITS = ("unbounded-agent-daemon.service unbounded-agent-requests.path unbounded-agent-dispatch.service "
         "unbounded-agent-metrics.service")
TEXTFILE = "/var/lib/prometheus/node-exporter/unbounded_agent.prom"
FLEET = "unbounded-agent-fleet-controller.service"
STATE = ("/var/lib/unbounded-agent", "/var/lib/unbounded-agent-ops", "/var/lib/unbounded-agent-reset")
# What an agent upgrade left: green is active, blue the one to roll back to (as the switch leaves it).
GREEN = "#!/bin/sh\necho unbounded-agent 9.9.9\n"


def sha(root: ScratchRoot, path: str) -> str:
    return hashlib.sha256(root.host_path(path).read_bytes()).hexdigest()


def package_files(root: ScratchRoot) -> list[str]:
    return root.rpm("-ql", "unbounded-agent").stdout.split()


@pytest.fixture(scope="module")
def root(tmp_path_factory, rpm_path):
    python = subprocess.run(["rpm", "-qp", "--requires", str(rpm_path)], capture_output=True, text=True,
                            check=True).stdout.split("python(abi) = ")[1].split()[0]
    return ScratchRoot(tmp_path_factory.mktemp("scratch") / "root", f"/usr/lib/python{python}/site-packages")


@pytest.fixture(scope="module")
def installed(root, rpm_path):
    root.rpm("-i", "--nodeps", str(rpm_path))
    return {"calls": root.take_calls(), "files": package_files(root), "tree": root.tree(BIN)}


@pytest.fixture(scope="module")
def upgraded(root, installed, newer_rpm):
    """An AgentUpgrade to green happened after the install, and an operation waits in the queue; then the
    package is upgraded."""
    green = root.host_path(f"{BIN}/unbounded-agent-green")
    green.write_text(GREEN)
    green.chmod(0o755)
    for link, target in (("unbounded-agent-current", "unbounded-agent-green"), ("unbounded-agent-last-good", "unbounded-agent-blue")):
        root.host_path(f"{BIN}/{link}.new").symlink_to(target)
        root.host_path(f"{BIN}/{link}.new").rename(root.host_path(f"{BIN}/{link}"))
    root.host_path("/var/lib/unbounded-agent/upgrade.json").write_text('{"phase": "probation"}\n')
    requests = root.host_path("/var/lib/unbounded-agent-ops/spool/requests")
    requests.mkdir(parents=True)
    (requests / "20250101t000000-abcdef.request").write_text("{}\n")
    before = {"tree": root.tree(*STATE), "blue": sha(root, f"{BIN}/unbounded-agent-blue")}
    newer_version, newer_path = newer_rpm
    root.rpm("-U", "--nodeps", str(newer_path))
    return {"before": before, "calls": root.take_calls(), "tree": root.tree(*STATE), "version": newer_version,
            "files": package_files(root)}


@pytest.fixture(scope="module")
def erased(root, upgraded):
    root.host_path("/var/lib/unbounded-agent-ops/results").mkdir()
    root.host_path("/var/lib/unbounded-agent-ops/results/upgrade-20250101t000000-abcdef.json").write_text("{}\n")
    root.host_path("/var/lib/unbounded-agent-reset/reports").mkdir(parents=True)
    root.host_path(TEXTFILE).parent.mkdir(parents=True)
    root.host_path(TEXTFILE).write_text("unbounded_agent_current_info{slot=\"unbounded-agent-green\",version=\"9.9.9\"} 1\n")
    root.rpm("-e", "--nodeps", "unbounded-agent")
    return {"calls": root.take_calls()}


# --- install ---------------------------------------------------------------------------------------

def test_install_puts_every_file_of_the_package_in_place(root, installed, rpm_path):
    listed = subprocess.run(["rpm", "-qlp", str(rpm_path)], capture_output=True, text=True, check=True).stdout.split()
    assert installed["files"] == listed
    missing = [f for f in listed if not (root.host_path(f).exists() or root.host_path(f).is_symlink())]
    assert missing == []
    assert f"{root.sitelib}/unbounded_agent/upgrade/switch.py" in listed


def test_install_seeds_slot_blue_with_the_packaged_agent_and_creates_the_links(root, installed):
    assert installed["tree"] == {
        BIN: "dir",
        f"{BIN}/unbounded-agent": "link -> unbounded-agent-current",
        f"{BIN}/unbounded-agent-blue": installed["tree"][f"{BIN}/unbounded-agent-blue"],
        f"{BIN}/unbounded-agent-current": "link -> unbounded-agent-blue",
        f"{BIN}/unbounded-agent-last-good": "link -> unbounded-agent-blue",
    }
    assert installed["tree"][f"{BIN}/unbounded-agent-blue"].startswith("file 755 ")


def test_install_calls_preset_then_starts_the_daemon_and_the_path_unit(installed):
    assert installed["calls"] == [
        f"systemd-update-helper install-system-units {UNITS} {FLEET}",
        "systemctl daemon-reload",
        "systemctl -q is-enabled unbounded-agent-daemon.service",
        "systemctl start unbounded-agent-daemon.service",
        "systemctl -q is-enabled unbounded-agent-requests.path",
        "systemctl start unbounded-agent-requests.path",
    ]


def test_the_preset_enables_the_agent_units_and_leaves_the_fan_out_controller_disabled(root, installed):
    preset = root.host_path("/usr/lib/systemd/system-preset/50-unbounded-agent.preset").read_text()
    rules = [line.split() for line in preset.splitlines() if line.strip() and not line.startswith("#")]
    assert rules == [*(["enable", u] for u in UNITS.split()), ["disable", FLEET]]


def test_the_installed_commands_run_the_seeded_agent_and_the_library(root, installed, version):
    assert root.run("/usr/bin/unbounded-agent", "version") == f"unbounded-agent {version}\n"
    assert root.run("/usr/libexec/unbounded-agent/unbounded-agent", "version") == f"unbounded-agent {version}\n"


def test_install_byte_compiles_the_library(root, installed):
    assert list(root.host_path(f"{root.sitelib}/unbounded_agent/__pycache__").glob("layout.*.pyc"))
    assert list(root.host_path(f"{root.sitelib}/unbounded_agent/reset/steps/__pycache__").glob("*.pyc"))


# --- rpm -U ----------------------------------------------------------------------------------------

def test_upgrade_replaces_the_package(root, upgraded):
    assert root.rpm("-q", "unbounded-agent").stdout.startswith(f"unbounded-agent-{upgraded['version']}-1.")
    assert root.run("/usr/lib/unbounded-agent/unbounded-agent", "version") == f"unbounded-agent {upgraded['version']}\n"


def test_upgrade_keeps_the_agents_slots_links_state_and_queue(root, upgraded):
    assert upgraded["tree"] == upgraded["before"]["tree"]
    assert sha(root, f"{BIN}/unbounded-agent-blue") == upgraded["before"]["blue"]
    # the active agent is still the one the AgentUpgrade installed, not the newer package's
    assert root.run("/usr/bin/unbounded-agent", "version") == "unbounded-agent 9.9.9\n"
    assert f"{BIN}/unbounded-agent-green" in upgraded["tree"]
    assert "/var/lib/unbounded-agent-ops/spool/requests/20250101t000000-abcdef.request" in upgraded["tree"]


def test_upgrade_restarts_only_the_path_unit_and_a_running_fan_out_controller(upgraded):
    # mark-restart: restarted at the end of the transaction if running (try-restart); never started
    assert upgraded["calls"] == [f"systemd-update-helper mark-restart-system-units unbounded-agent-requests.path "
                                 f"{FLEET}"]


# --- rpm -e ----------------------------------------------------------------------------------------

def test_erase_disables_the_units_and_stops_all_but_the_dispatcher(erased):
    assert erased["calls"] == [
        f"systemd-update-helper remove-system-units unbounded-agent-daemon.service unbounded-agent-requests.path "
        f"unbounded-agent-metrics.service {FLEET}",
        "systemctl --no-reload disable unbounded-agent-dispatch.service",
    ]


def test_erase_leaves_no_file_of_the_package(root, upgraded, erased):
    left = [f for f in upgraded["files"] if root.host_path(f).exists() or root.host_path(f).is_symlink()]
    assert left == []
    assert not root.host_path(f"{root.sitelib}/unbounded_agent").exists()  # nor the byte-code %post made


def test_erase_removes_the_toolsets_state_and_leaves_the_agents(root, erased):
    assert not root.host_path(TEXTFILE).exists() and root.host_path(TEXTFILE).parent.is_dir()  # node_exporter's dir stays
    assert not root.host_path("/var/lib/unbounded-agent-ops").exists()
    assert not root.host_path("/var/lib/unbounded-agent-reset").exists()
    assert root.host_path(f"{BIN}/unbounded-agent-green").is_file()
    assert root.host_path("/var/lib/unbounded-agent/upgrade.json").is_file()
