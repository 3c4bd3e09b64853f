"""The units' sandboxes, as far as the files show them: README's exposure table has a row for every service,
every service restricts what it can (a test on the test host measures it), and the steps that unmount inside
what they remove have no mount namespace — their unmounts must reach the host's mounts."""

import re
from pathlib import Path

from exposure import recorded

REPO = Path(__file__).resolve().parents[2]

UNITS = REPO / "units"
# They unmount what is mounted inside the trees they remove: their unmounts must reach the host's mounts.
HOST_MOUNTS = ("unbounded-agent-reset-remove-machine-trees.service", "unbounded-agent-reset-remove-agent.service")
# Each of these makes systemd give the unit a mount namespace of its own.
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateIPC", "PrivateMounts",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
               "ProtectProc", "ProcSubset", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem",
               "BindPaths", "BindReadOnlyPaths")
EVERYWHERE = ("NoNewPrivileges=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies=", "RestrictNamespaces=yes",
              "LockPersonality=yes", "MemoryDenyWriteExecute=yes", "RestrictRealtime=yes",
              "SystemCallArchitectures=native", "SystemCallFilter=@system-service")


def services() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def test_readme_records_an_exposure_for_every_service():
    assert sorted(recorded(REPO / "README.md")) == [p.name for p in services()]


def test_every_service_is_sandboxed():
    for p in services():
        text = p.read_text()
        missing = [s for s in EVERYWHERE if not re.search(rf"^{re.escape(s)}", text, re.M)]
        assert missing == [], (p.name, missing)
        if p.name not in HOST_MOUNTS:
            assert "ProtectSystem=strict" in text, p.name


def test_the_steps_that_unmount_share_the_hosts_mounts():
    for name in HOST_MOUNTS:
        keys = set(re.findall(r"^(\w+)=", (UNITS / name).read_text(), re.M))
        assert keys.isdisjoint(NAMESPACING), (name, keys & set(NAMESPACING))


def test_the_unit_named_by_a_url_has_no_directory_named_after_it():
    """PrivateTmp= makes /tmp/systemd-private-<boot id>-<unit name>-<random>: with an instance name near systemd's
    limit (a long URL) that name is too long for the file system, and the unit cannot start at all."""
    keys = set(re.findall(r"^(\w+)=", (UNITS / "unbounded-upgrade@.service").read_text(), re.M))
    assert "PrivateTmp" not in keys and "TemporaryFileSystem" in keys
