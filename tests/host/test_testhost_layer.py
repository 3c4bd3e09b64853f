"""The session layer (testhost_layer.py) stands in for `dpkg -i` only if a host booted from it is one the .deb
was installed on: the same files, units in the same states, the generator's drop-ins, the slots seeded, the
same answers from /usr/bin/unbounded-agent. What differs is named here, each with why."""

import json
import re

import pytest
from test_testhost import fetch, sha256
from testhost_layer import TRUSTED_CA

pytestmark = pytest.mark.testhost

# Every file but the host's private mounts, the journal and the hashed trust store (the layer trusts a CA).
FILES = (r"find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp"
         r" -o -path /var/log/journal -o -path /etc/ssl/certs \) -prune -o -printf '%p %y %m %U:%G %l %s\n'")
PROPS = "ActiveState,SubState,Result,UnitFileState,ExecMainStatus,NRestarts,FragmentPath,DropInPaths,Environment"
# The dispatcher runs once at every boot (units/README.md): on the layer's host it has, and made its directories.
BOOT_RUN = {"/var/lib/unbounded-agent-ops/results", "/var/lib/unbounded-agent-ops/spool/incoming"}
PRIVATE_TMP = re.compile(r"^/var/tmp/systemd-private-\w+-")  # a random name per service and boot


@pytest.fixture(scope="module")
def twins(testhost_factory, deb_path):
    with testhost_factory("twin", installed=True) as layered, testhost_factory("twin") as installed:
        installed.install_deb(deb_path)
        yield layered, installed


def files(host) -> set[str]:
    return {line for line in host.sh(FILES).stdout.splitlines() if not PRIVATE_TMP.match(line)}


def generated(host) -> dict[str, str]:
    """The drop-ins and units the generators wrote for our units, with their content."""
    out = host.sh("cd /run/systemd && find generator generator.early generator.late -path '*unbounded*' -type f"
                  " | sort | xargs -r grep -H ''").stdout
    return dict(line.split(":", 1) for line in out.splitlines())


def status(host) -> dict:
    st = json.loads(host.run(["unbounded-agent", "status", "--json"]).stdout)
    st["daemon"].pop("main_pid")
    return st


def test_the_layers_host_has_the_installed_hosts_files(twins):
    layered, installed = twins
    a, b = files(layered), files(installed)
    only_layered = {line.split()[0] for line in a - b}
    assert only_layered == {TRUSTED_CA, *BOOT_RUN}, sorted(a - b)
    assert b - a == set()


def test_units_and_the_generators_drop_ins_are_the_same(twins, repo_root):
    layered, installed = twins
    units = sorted(u.name for u in (repo_root / "units").iterdir() if u.suffix != ".md" and "@" not in u.name)
    assert generated(layered) == generated(installed) != {}
    for host in twins:
        assert host.run(["systemctl", "is-active", "unbounded-agent-daemon.service"]).stdout == "active\n"
    for unit in [*units, "paths.target", "multi-user.target"]:  # one at a time: a glob shows them in any order
        show = ["systemctl", "show", "-p", PROPS, unit]
        assert layered.run(show).stdout == installed.run(show).stdout, unit
    listed = ["systemctl", "list-unit-files", "--no-legend", "unbounded*"]
    assert layered.run(listed).stdout == installed.run(listed).stdout


def test_the_slots_and_the_cli_answer_the_same(twins, version):
    layered, installed = twins
    slots = "/var/lib/unbounded-agent/bin"
    assert sha256(layered.path(f"{slots}/unbounded-agent-blue")) == sha256(installed.path(f"{slots}/unbounded-agent-blue"))
    for link in ("unbounded-agent-current", "unbounded-agent-last-good", "unbounded-agent"):
        target = layered.run(["readlink", f"{slots}/{link}"]).stdout
        assert target and target == installed.run(["readlink", f"{slots}/{link}"]).stdout
    assert layered.run(["unbounded-agent", "version"]).stdout == f"unbounded-agent {version}\n"
    assert status(layered) == status(installed)
    assert layered.run(["dpkg", "-V", "unbounded-agent"]).stdout == ""


def test_the_layers_hosts_trust_their_https_server(twins, tmp_path):
    layered, _ = twins
    release = tmp_path / "release.bin"
    release.write_bytes(b"served by a layer's host\n")
    status_code, _, digest = fetch(layered, layered.serve(release))
    assert (status_code, digest) == (200, sha256(release))


def test_a_bare_host_has_no_package(testhost_factory):
    with testhost_factory() as host:
        assert host.run(["dpkg-query", "-W", "unbounded-agent"], check=False).returncode != 0
        assert not host.path(TRUSTED_CA).exists()
