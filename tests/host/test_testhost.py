"""The test host itself: what the other test-host tests take for granted."""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testhost import CommandFailed, host_cgroups, make_nested_machine

pytestmark = pytest.mark.testhost

# Inside the host: fetch argv[1] with Debian's python3-requests (TLS verification on,
# the default) and print the status and the SHA-256 of the body.
FETCH = """\
import hashlib, sys, requests
r = requests.get(sys.argv[1], timeout=30, allow_redirects=len(sys.argv) < 3)
print(r.status_code, r.headers.get("Location", "-"), hashlib.sha256(r.content).hexdigest())
"""


def fetch(host, url, follow_redirects=True):
    args = ["python3", "-c", FETCH, url] + ([] if follow_redirects else ["no-redirects"])
    status, location, digest = host.run(args).stdout.split()
    return int(status), location, digest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def test_boots_systemd_252_as_pid_1(testhost):
    assert testhost.boot_state in ("running", "degraded")
    assert testhost.run(["systemctl", "--version"]).stdout.startswith("systemd 252 ")
    assert testhost.run(["cat", "/proc/1/comm"]).stdout == "systemd\n"
    # The host name is the machine name, which the agent's machineName defaults to.
    assert testhost.run(["hostname"]).stdout.strip() == testhost.name


def test_private_network_has_only_loopback(testhost):
    lines = testhost.run(["ip", "-o", "link", "show"]).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["lo"]


def test_links_made_inside_stay_inside(testhost_factory):
    with testhost_factory() as host:
        # The kernel has no wireguard or geneve: bridge and vxlan stand in for the agent's links.
        host.run(["ip", "link", "add", "wg51820", "type", "bridge"])
        host.run(["ip", "link", "add", "vxlan0", "type", "vxlan", "id", "42", "dstport", "4789"])
        inside = host.run(["ip", "-o", "link", "show"]).stdout
        assert "wg51820" in inside and "vxlan0" in inside
        outside = subprocess.run(["ip", "link", "show", "wg51820"], capture_output=True)
        assert outside.returncode != 0


def test_transient_unit_runs_under_the_hosts_systemd(testhost):
    testhost.run(["systemd-run", "--unit=testhost-probe", "--wait", "--collect",
                  "/bin/sh", "-c", "cat /proc/self/cgroup > /var/tmp/probe-cgroup"])
    assert testhost.read("/var/tmp/probe-cgroup").strip().endswith("/testhost-probe.service")
    testhost.path("/var/tmp/probe-cgroup").unlink()


def test_files_and_failing_commands(testhost):
    testhost.write("/var/tmp/greeting", "hello\n", mode=0o600)
    mode = testhost.run(["stat", "-c", "%a", "/var/tmp/greeting"]).stdout
    assert mode == "600\n"
    assert testhost.run(["cat", "/var/tmp/greeting"]).stdout == "hello\n"
    testhost.path("/var/tmp/greeting").unlink()

    with pytest.raises(CommandFailed) as failed:
        testhost.sh("echo to-stdout; echo to-stderr >&2; exit 3")
    assert failed.value.returncode == 3
    assert "to-stdout" in str(failed.value) and "to-stderr" in str(failed.value)

    with pytest.raises(ValueError):  # nspawn's own /tmp inside: not reachable from outside
        testhost.path("/tmp/anything")


def test_https_server_is_trusted_inside(testhost, tmp_path):
    release = tmp_path / "release.bin"
    release.write_bytes(os.urandom(256 * 1024))
    url = testhost.serve(release, "v1/release.bin")
    assert url == "https://localhost:8443/v1/release.bin"

    assert fetch(testhost, url) == (200, "-", sha256(release))
    # The certificate also names 127.0.0.1.
    assert fetch(testhost, "https://127.0.0.1:8443/v1/release.bin")[2] == sha256(release)
    # Verification is real: a client that does not trust the test CA refuses the server.
    untrusting = testhost.run(
        ["python3", "-c", "import sys, requests; requests.get(sys.argv[1], verify=sys.argv[2])",
         url, "/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt"], check=False)
    assert untrusting.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting.stderr


def test_test_paths_redirect_and_fail(testhost, tmp_path):
    release = tmp_path / "release.bin"
    release.write_bytes(b"release payload\n")
    testhost.serve(release)

    status, location, _ = fetch(testhost, testhost.https_url("redirect-http/release.bin"),
                                follow_redirects=False)
    assert (status, location) == (302, "http://localhost:8080/release.bin")
    # Followed, the redirect lands on the plain HTTP server, which serves the same files.
    assert fetch(testhost, testhost.https_url("redirect-http/release.bin"))[::2] == (
        200, sha256(release))
    assert fetch(testhost, testhost.https_url("status/404"))[0] == 404
    assert fetch(testhost, testhost.https_url("status/503"))[0] == 503


def test_teardown_leaves_no_mount_or_process(testhost_factory):
    with testhost_factory() as host:
        merged, workdir, init_pid = host.merged, host.workdir, host.init_pid
        assert f" {merged} " in mountinfo()  # the check below can see the mount
        host.run(["systemd-run", "--unit=busy", "/usr/bin/sleep", "infinity"])
    assert f" {merged} " not in mountinfo()
    assert not workdir.exists()
    assert host.nspawn.returncode is not None  # reaped (killed: the host is thrown away, not shut down)
    assert not Path(f"/proc/{init_pid}").exists()


def test_sigterm_to_the_test_process_still_tears_down(testhost_tree_root, tmp_path):
    # A separate test process boots a host and waits; SIGTERM must unwind it cleanly.
    script = (
        "import sys, time, testhost\n"
        "with testhost.boot_testhost('sigterm', tree=sys.argv[1]) as host:\n"
        "    print(host.workdir, host.init_pid, flush=True)\n"
        "    time.sleep(300)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(testhost_tree_root)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "support")})
    try:
        workdir, init_pid = child.stdout.readline().split()
        assert Path(workdir, "merged").is_dir()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) != 0  # interrupted, not finished
    finally:
        child.kill()
        child.wait()
    assert f" {workdir}/merged " not in mountinfo()
    assert not Path(workdir).exists()
    assert not Path(f"/proc/{init_pid}").exists()


def test_hosts_of_the_same_name_boot_side_by_side_in_two_test_processes(testhost, testhost_tree_root):
    # Parallel test runs name their hosts alike: nspawn's machine names must still differ.
    script = ("import sys, testhost\n"
              "with testhost.boot_testhost(sys.argv[1], tree=sys.argv[2]) as host:\n"
              "    print(host.run(['hostname']).stdout.strip(), host.machine, flush=True)\n")
    child = subprocess.run([sys.executable, "-c", script, testhost.name, str(testhost_tree_root)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "support")})
    assert child.returncode == 0, child.stderr
    hostname, machine = child.stdout.split()
    assert hostname == testhost.name and machine != testhost.machine
    assert testhost.running and testhost.run(["hostname"]).stdout.strip() == testhost.name


def test_units_of_the_same_name_in_two_hosts_have_cgroups_of_their_own(testhost_factory):
    # Hosts running at once (the fleet's, or parallel test processes') run the same units: stopping one host's
    # must not touch the other's, nor its cgroup.
    with testhost_factory("twin-a") as a, testhost_factory("twin-b") as b:
        groups = {}
        for host in (a, b):
            host.run(["systemd-run", "--unit=twin.service", "/usr/bin/sleep", "infinity"])
            groups[host.name] = host_cgroups(host.machine)[0] / "payload/system.slice/twin.service"
            assert (groups[host.name] / "cgroup.procs").read_text().split()  # the unit's process is in it
        assert groups["twin-a"] != groups["twin-b"]
        a.run(["systemctl", "stop", "twin.service"])
        assert b.run(["systemctl", "is-active", "twin.service"], check=False).stdout.strip() == "active"
        assert (groups["twin-b"] / "cgroup.procs").read_text().split()
    assert not groups["twin-a"].exists() and not groups["twin-b"].exists()  # teardown removed them


def test_nested_machine_is_listed(testhost_factory):
    with testhost_factory() as host:
        make_nested_machine(host, "kube1")
        machines = host.run(["machinectl", "list", "--no-legend"]).stdout.splitlines()
        assert [line.split()[:2] for line in machines] == [["kube1", "container"]]
        assert host.run(["systemctl", "is-active", "systemd-nspawn@kube1.service"]
                        ).stdout.strip() == "active"


@pytest.mark.testhost
def test_power_cycle_keeps_files_and_loses_running_state(testhost_factory):
    with testhost_factory() as host:
        host.write("/var/lib/survivor", "still here\n")
        host.run(["systemd-run", "--unit=before-the-cut.service", "/bin/sleep", "infinity"])
        first_init = host.init_pid
        host.power_cycle(hard=True)
        assert host.init_pid != first_init and host.running
        assert host.read("/var/lib/survivor") == "still here\n"
        assert host.run(["systemctl", "is-active", "before-the-cut.service"], check=False).stdout.strip() != "active"
        assert host.run(["systemctl", "is-system-running"], check=False).stdout.strip() in ("running", "degraded")
