"""Shared fixtures: the repository paths and the systemd test host (testhost.py).

Tests marked `testhost` boot a real Debian 12 systemd host. Where that is not
possible (not root, tools missing, no overlayfs) they are skipped with the
reason, except on CI (environment variable CI set): there they must run, so a
missing prerequisite fails them instead.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
SUPPORT_DIR = TESTS_DIR / "support"  # the test host, the test API server, fakes
if str(SUPPORT_DIR) not in sys.path:
    sys.path.insert(0, str(SUPPORT_DIR))

import testhost_layer  # noqa: E402
import testhost_tree  # noqa: E402
from netwatch import OwnNamespaceWatch  # noqa: E402
from testhost import TestHost, boot_testhost  # noqa: E402

# Hosts booted by testhost_factory, in order; a failing test reports those it booted.
_factory_hosts: list[TestHost] = []
_FIRST_FACTORY_HOST = pytest.StashKey[int]()


_own_namespace = OwnNamespaceWatch()


def pytest_sessionstart(session):
    # Only where tests run: an xdist controller runs none, and each worker watches its own children.
    if hasattr(session.config, "workerinput") or session.config.getoption("dist", "no") == "no":
        _own_namespace.start()


@pytest.fixture(autouse=True)
def _test_traffic_stays_in_test_namespaces():
    """No socket of the test run in the machine's own network namespace has a private-range address at either end
    (netwatch.py): test servers live in namespaces the tests make. Checked for every test, over the whole
    session (a module's fixtures count towards the test they ran for)."""
    yield
    found = _own_namespace.take()
    assert not found, ("test traffic on a private-range address of the machine's own network namespace:\n"
                       + "\n".join(found))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "testhost: needs root, systemd-nspawn and overlayfs; boots a Debian 12 systemd test host")


# The longest test files, measured (--durations=0), longest first. `make test` runs files side by side, one
# file to a worker, handing them out in collection order: started first, these do not end the run alone.
LONGEST_FILES = (
    "host/test_reset_resumes_after_kill.py", "host/test_seam_reset_and_upgrade.py",
    "host/test_upgrade_crash_points.py", "host/test_recovery_always_ends.py", "host/test_mop_reset_with_kubectl.py",
    "host/test_reset_resumes_after_dispatcher_kill.py", "host/test_fleet_rolls_out_in_waves_and_halts.py",
    "host/test_mop_reset_survives_daemon_restarts.py", "host/test_mop_survives_restarts_and_outages.py",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FILES) if path.endswith("/tests/" + name)), len(LONGEST_FILES))
    items.sort(key=rank)  # stable: within a file, and among the other files, the order stays


def _overlay_supported() -> bool:
    def listed():
        return "\toverlay\n" in Path("/proc/filesystems").read_text()
    if not listed():
        subprocess.run(["modprobe", "-q", "overlay"], capture_output=True)
    return listed()


@functools.cache
def testhost_unavailable_reason() -> str | None:
    """Why a test host cannot boot here, or None if it can."""
    if os.geteuid() != 0:
        return "the test host needs root"
    tools = {"systemd-nspawn": "systemd-container", "nsenter": "util-linux",
             "unshare": "util-linux", "openssl": "openssl", "mount": "mount"}
    if testhost_tree.cached_tree() is None:
        tools["mmdebstrap"] = "mmdebstrap"  # only to build the tree
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({tools[t] for t in missing}))
        return f"the test host needs {', '.join(missing)} (apt-get install {packages})"
    if not _overlay_supported():
        return "the test host needs overlayfs (modprobe overlay)"
    return None


def require_testhost() -> None:
    """Skip the running test if no test host can boot here; fail it on CI."""
    reason = testhost_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"test host unavailable on CI: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item):
    item.stash[_FIRST_FACTORY_HOST] = len(_factory_hosts)
    if item.get_closest_marker("testhost"):
        require_testhost()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the journal of every test host the failed test used to its report."""
    report = (yield).get_result()
    if not report.failed:
        return
    hosts = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, TestHost)]
    hosts += _factory_hosts[item.stash.get(_FIRST_FACTORY_HOST, len(_factory_hosts)):]
    for host in dict.fromkeys(hosts):  # unique, in order
        try:
            text = host.journal(lines=200)  # the tail kept at teardown if already stopped
        except Exception as error:  # a broken host must not hide the test's own failure
            text = f"(could not read the journal: {error})"
        report.sections.append((f"test host {host.name}: last journal lines", text))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return TESTS_DIR.parent


@pytest.fixture(scope="session")
def dist_dir(repo_root) -> Path:
    return repo_root / "dist"


@pytest.fixture(scope="session")
def testhost_tree_root() -> Path:
    """The cached Debian 12 tree test hosts boot from (built on first use)."""
    require_testhost()
    return testhost_tree.build_tree()


@pytest.fixture(scope="session")
def testhost(testhost_tree_root) -> TestHost:
    """One test host shared by the whole session: tests must leave it as they found it."""
    with boot_testhost("testhost", testhost_tree_root) as host:
        yield host


@pytest.fixture(scope="session")
def testhost_factory(testhost_tree_root, repo_root):
    """Boot a fresh host of your own, e.g. for a module that changes host state:

        @pytest.fixture(scope="module")
        def host(testhost_factory):
            with testhost_factory(installed=True) as host:
                yield host

    Each call returns a context manager; the host is torn down when it exits.
    Names default to testhost1, testhost2, ... (the host name is the machine name).
    installed=True boots it with the .deb installed and its daemon up, as after `dpkg -i` (from the session
    layer, testhost_layer.py; its HTTPS server's CA is trusted there too). Tests of the installation itself
    boot a bare host and call host.install_deb.
    """
    numbers = itertools.count(1)

    @contextlib.contextmanager
    def boot(name: str | None = None, installed: bool = False):
        layer = testhost_layer.acquire(built_deb(repo_root), testhost_tree_root) if installed else None
        with boot_testhost(name or f"testhost{next(numbers)}", testhost_tree_root, layer) as host:
            _factory_hosts.append(host)
            yield host

    return boot


# --- the project's own build outputs ---------------------------------------------------------

@pytest.fixture(scope="session")
def version(repo_root) -> str:
    """The version `make deb` stamps by default (the VERSION file)."""
    return (repo_root / "VERSION").read_text().strip()


@functools.cache
def built_deb(repo_root: Path) -> Path:
    """The .deb of the tree under test. `make test` builds it just before and says so in
    UNBOUNDED_TESTS_DEB_FRESH; a lone pytest run rebuilds it (once), so a stale package is never tested.
    UNBOUNDED_AGENT_DEB names a package built elsewhere (e.g. by parallel runs with their own DIST)."""
    if os.environ.get("UNBOUNDED_AGENT_DEB"):
        return Path(os.environ["UNBOUNDED_AGENT_DEB"])
    version = (repo_root / "VERSION").read_text().strip()
    deb = repo_root / "dist" / f"unbounded-agent_{version}_all.deb"
    if not (os.environ.get("UNBOUNDED_TESTS_DEB_FRESH") and deb.exists()):
        r = subprocess.run(["make", "-s", "deb"], cwd=repo_root, capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"make deb failed:\n{r.stdout}{r.stderr}", pytrace=False)
    return deb


@pytest.fixture(scope="session")
def deb_path(repo_root) -> Path:
    return built_deb(repo_root)


@pytest.fixture(scope="module")
def installed_host(testhost_factory) -> TestHost:
    """A fresh test host of the module's own with the .deb installed (daemon running)."""
    with testhost_factory(installed=True) as host:
        yield host
