"""Every unit we ship passes `systemd-analyze verify` on the test host's systemd, and the package
passes lintian without errors."""

import subprocess

import pytest


@pytest.mark.testhost
def test_every_unit_verifies_on_the_test_host(installed_host, repo_root):
    units = sorted(p.name for p in (repo_root / "units").iterdir() if p.suffix in (".service", ".path", ".target"))
    assert {"unbounded-agent-daemon.service", "unbounded-agent-requests.path", "unbounded-agent-dispatch.service",
            "unbounded-agent-reset-phase1.target"} <= set(units)
    for name in units:
        # a template is verified through an instance of it
        arg = name.replace("@.", "@example.") if "@." in name else f"/lib/systemd/system/{name}"
        r = installed_host.run(["systemd-analyze", "verify", arg], check=False)
        # verify prints problems on stderr and exits non-zero on errors
        assert r.returncode == 0 and r.stderr.strip() == "", f"{name}: {r.stderr}"


def test_lintian_reports_no_errors(deb_path):
    r = subprocess.run(["lintian", "--no-tag-display-limit", str(deb_path)], capture_output=True, text=True)
    errors = [line for line in r.stdout.splitlines() if line.startswith("E:")]
    assert errors == [] and r.returncode == 0, r.stdout
