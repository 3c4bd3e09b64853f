"""Fixtures for the tests of the built packages: the .rpm beside the .deb (tests/conftest.py), and
a newer .rpm to upgrade to. They need root (rpm --root chroots to run the scriptlets) and the build
tools that `make setup` installs; without root they are skipped, except on CI, where they fail."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def make(repo_root: Path, *args: str) -> None:
    r = subprocess.run(["make", "-s", *args], cwd=repo_root, capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"make {' '.join(args)} failed:\n{r.stdout}{r.stderr}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def as_root():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the package tests need root on CI", pytrace=False)
        pytest.skip("the package tests need root (rpm --root, chroot)")


@pytest.fixture(scope="session")
def rpm_path(repo_root, dist_dir, version) -> Path:
    """The .rpm of the tree under test; `make test` builds it just before (UNBOUNDED_TESTS_DEB_FRESH
    says both packages are fresh), a lone pytest run rebuilds it. UNBOUNDED_AGENT_RPM names one built
    elsewhere."""
    if os.environ.get("UNBOUNDED_AGENT_RPM"):
        return Path(os.environ["UNBOUNDED_AGENT_RPM"])
    rpm = dist_dir / f"unbounded-agent-{version}-1.noarch.rpm"
    if not (os.environ.get("UNBOUNDED_TESTS_DEB_FRESH") and rpm.exists()):
        make(repo_root, "rpm")
    return rpm


@pytest.fixture(scope="module")
def newer_rpm(repo_root, version, tmp_path_factory) -> tuple[str, Path]:
    """(version, path) of an .rpm of the same tree with a higher version, built in a directory of its own."""
    newer = f"{version}.1"
    out = tmp_path_factory.mktemp("newer-rpm")
    make(repo_root, "rpm", f"VERSION={newer}", f"DIST={out / 'dist'}", f"RPM_BUILD={out / 'build'}")
    return newer, out / "dist" / f"unbounded-agent-{newer}-1.noarch.rpm"
