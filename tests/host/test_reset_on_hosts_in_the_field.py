"""`unbounded-agent reset` on the hosts found in the field, not only the tidy ones — each time it succeeds, and
removes what is the agent's and nothing else:

- a machine tree 1500 directories deep (a pod can plant one): removed; a second run removes nothing;
- /var/lib/machines relocated behind a symlink: followed; kube2 goes there, the link and other trees stay;
- /var/lib/machines on btrfs (a loop-mounted image), the machine tree a subvolume with subvolumes inside,
  one of them a read-only snapshot: removed, another subvolume stays;
- .raw images named after kube1/kube2: removed (a linked image: only the link); kube10.raw stays;
- no systemd-machined (nor machinectl): the running systemd-nspawn@kube1.service is still stopped;
- IPv6 disabled in the host's network namespace: the routing step succeeds on IPv4 alone.

Each test runs the toolset's own CLI (the agent's binary goes with the first reset).
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from bootstrapped_host import removed_items, run_reset, step
from testhost import make_nested_machine

pytestmark = pytest.mark.testhost

MACHINES = "/var/lib/machines"
DEEP_TREE = """
import os
fd = os.open("/var/lib/machines/kube1", os.O_RDONLY | os.O_DIRECTORY)
for i in range(1500):
    os.mkdir("d", dir_fd=fd)
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = child
os.close(fd)
"""


def reset(host) -> dict:
    code, report, stderr = run_reset(host, toolset=True)
    assert (code, report["result"]) == (0, "succeeded"), (stderr, [s for s in report["steps"] if s["result"] != "succeeded"])
    return report


def listing(host, path: str) -> list[str]:
    return sorted(host.run(["ls", "-A", path]).stdout.split())


def test_a_machine_tree_1500_levels_deep(agent_host):
    host = agent_host
    host.run(["mkdir", "-p", f"{MACHINES}/kube1"])
    host.run(["python3", "-c", DEEP_TREE])
    assert host.run(["sh", "-c", f"find {MACHINES}/kube1 -type d | wc -l"]).stdout.strip() == "1501"
    report = reset(host)
    assert "machine tree /var/lib/machines/kube1" in step(report, "remove-machine-trees")["removed"]
    assert "kube1" not in listing(host, MACHINES)
    again = reset(host)
    assert removed_items(again) == set()


@pytest.fixture
def relocated_machines(agent_host):
    """/var/lib/machines → /srv/machines, as an operator moves it to a bigger disk; restored afterwards."""
    host = agent_host
    host.sh(f"rm -rf {MACHINES} /srv/machines && mkdir -p /srv/machines && ln -s /srv/machines {MACHINES}")
    yield host
    host.sh(f"mountpoint -q /srv/machines/kube2/data && umount /srv/machines/kube2/data; "
            f"rm -rf {MACHINES} /srv/machines /srv/precious && mkdir -p {MACHINES}")


def test_a_symlinked_machines_dir_is_followed_and_kept(relocated_machines):
    host = relocated_machines
    host.sh("mkdir -p /srv/machines/kube2/etc /srv/machines/kube2/data /srv/machines/other /srv/precious && "
            "echo kube2 > /srv/machines/kube2/etc/hostname && echo keep > /srv/machines/other/f && "
            "echo precious > /srv/precious/f && mount --bind /srv/precious /var/lib/machines/kube2/data")
    report = reset(host)
    trees = step(report, "remove-machine-trees")
    assert "machine tree /var/lib/machines/kube2" in trees["removed"]
    assert "mount /srv/machines/kube2/data" in trees["removed"]  # found where it really is
    assert listing(host, "/srv/machines") == ["other"]
    assert host.run(["readlink", MACHINES]).stdout.strip() == "/srv/machines"
    assert host.read("/srv/machines/other/f") == "keep\n" and host.read("/srv/precious/f") == "precious\n"


def test_raw_images_of_the_machines_go_and_others_stay(agent_host):
    host = agent_host
    host.sh(f"mkdir -p {MACHINES} /srv/images && truncate -s 1M {MACHINES}/kube1.raw {MACHINES}/kube10.raw "
            f"/srv/images/kube2-disk.raw && ln -sf /srv/images/kube2-disk.raw {MACHINES}/kube2.raw")
    report = reset(host)
    assert {"machine image /var/lib/machines/kube1.raw", "machine image /var/lib/machines/kube2.raw"} <= set(
        step(report, "remove-machine-trees")["removed"])
    assert listing(host, MACHINES) == ["kube10.raw"]
    assert host.run(["test", "-f", "/srv/images/kube2-disk.raw"], check=False).returncode == 0
    host.run(["rm", "-rf", f"{MACHINES}/kube10.raw", "/srv/images"])


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def btrfs_machines(agent_host):
    """/var/lib/machines on btrfs: an image made and attached to a loop device outside the host, its
    subvolumes made there, then mounted inside the host (its mount namespace reached with nsenter)."""
    if not shutil.which("mkfs.btrfs") or "btrfs" not in Path("/proc/filesystems").read_text():
        if os.environ.get("CI"):
            pytest.fail("btrfs unavailable on CI (apt-get install btrfs-progs)")
        pytest.skip("needs btrfs-progs and a kernel with btrfs (apt-get install btrfs-progs)")
    host = agent_host
    work = Path(tempfile.mkdtemp(prefix="btrfs-", dir="/var/tmp"))
    image, outside = work / "machines.img", work / "mnt"
    _run("truncate", "-s", "256M", str(image))
    _run("mkfs.btrfs", "-q", "-f", str(image))
    loop = _run("losetup", "--find", "--show", str(image))
    try:
        outside.mkdir()
        _run("mount", loop, str(outside))
        try:
            for sub in ("kube1", "other"):
                _run("btrfs", "-q", "subvolume", "create", str(outside / sub))
            (outside / "kube1/var/lib").mkdir(parents=True)
            _run("btrfs", "-q", "subvolume", "create", str(outside / "kube1/var/lib/portables"))
            (outside / "kube1/var/lib/portables/image").write_text("x")
            (outside / "kube1/etc").mkdir()
            (outside / "kube1/etc/hostname").write_text("kube1\n")
            _run("btrfs", "-q", "subvolume", "snapshot", "-r", str(outside / "kube1/var/lib/portables"),
                 str(outside / "kube1/snapshot"))
            (outside / "other/keep").write_text("not the agent's\n")
        finally:
            _run("umount", str(outside))
        dev = os.stat(loop).st_rdev
        host.sh(f"rm -rf {MACHINES} && mkdir -p {MACHINES}")
        # nsenter into the host's mount namespace only: the device node is made in its /dev, which its
        # device policy does not cover for us (we stay in the machine's cgroup).
        subprocess.run(["nsenter", "-t", str(host.init_pid), "-m", "sh", "-ec",
                        f"mknod /dev/test-btrfs b {os.major(dev)} {os.minor(dev)}; "
                        f"mount /dev/test-btrfs {MACHINES}; rm /dev/test-btrfs"], check=True)
        yield host
    finally:
        subprocess.run(["nsenter", "-t", str(host.init_pid), "-m", "umount", MACHINES], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_btrfs_subvolumes_nested_and_read_only_are_removed(btrfs_machines):
    host = btrfs_machines
    assert host.run(["stat", "-f", "-c", "%T", f"{MACHINES}/kube1"]).stdout.strip() == "btrfs"
    assert host.run(["stat", "-c", "%i", f"{MACHINES}/kube1/snapshot"]).stdout.strip() == "256"  # a subvolume
    report = reset(host)
    assert "machine tree /var/lib/machines/kube1" in step(report, "remove-machine-trees")["removed"]
    assert listing(host, MACHINES) == ["other"]
    assert host.run(["cat", f"{MACHINES}/other/keep"]).stdout == "not the agent's\n"  # (a mount inside the host)


@pytest.fixture
def no_machined(agent_host):
    """A host without systemd-machined and machinectl (moved aside; put back afterwards)."""
    host = agent_host
    pieces = ["/lib/systemd/system/systemd-machined.service", "/lib/systemd/system/dbus-org.freedesktop.machine1.service",
              "/usr/share/dbus-1/system-services/org.freedesktop.machine1.service", "/lib/systemd/systemd-machined",
              "/usr/bin/machinectl"]
    host.run(["systemctl", "stop", "systemd-machined.service"])
    host.run(["mkdir", "-p", "/var/tmp/machined-aside"])
    present = [p for p in pieces if host.run(["test", "-e", p], check=False).returncode == 0
               or host.run(["test", "-L", p], check=False).returncode == 0]
    for p in present:
        host.run(["mv", p, f"/var/tmp/machined-aside/{p.replace('/', '_')}"])
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "reload", "dbus.service"])
    yield host
    for p in present:
        host.run(["mv", f"/var/tmp/machined-aside/{p.replace('/', '_')}", p])
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "reload", "dbus.service"])


def test_without_machined_the_machine_unit_is_still_stopped(no_machined):
    host = no_machined
    assert host.run(["systemctl", "show", "-p", "LoadState", "systemd-machined.service"]).stdout.strip() == \
        "LoadState=not-found"
    make_nested_machine(host, "kube1", start=False)
    # nspawn cannot register with a machined that is not there: the agent's override says so
    host.write("/etc/systemd/system/systemd-nspawn@kube1.service.d/10-unbounded.conf",
               "[Service]\nExecStart=\nExecStart=systemd-nspawn --quiet --keep-unit --register=no "
               "--settings=override --machine=%i\n")
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "start", "systemd-nspawn@kube1.service"])
    assert host.run(["systemctl", "is-active", "systemd-nspawn@kube1.service"]).stdout.strip() == "active"
    report = reset(host)
    assert "machine kube1" in step(report, "stop-machines")["removed"]
    assert host.run(["systemctl", "is-active", "systemd-nspawn@kube1.service"], check=False).stdout.strip() != "active"
    assert "kube1" not in listing(host, MACHINES)


@pytest.fixture
def ipv6_disabled(agent_host):
    host = agent_host
    keys = ["net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6", "net.ipv6.conf.lo.disable_ipv6"]
    host.run(["sysctl", "-qw", *(f"{k}=1" for k in keys)])
    yield host
    host.run(["sysctl", "-qw", *(f"{k}=0" for k in keys)])


def test_with_ipv6_disabled_the_routing_step_succeeds(ipv6_disabled):
    host = ipv6_disabled
    host.sh("ip link add wg51820 type bridge && ip link set wg51820 up && "
            "ip rule add from 10.244.0.0/16 lookup 51820 pref 100 && "
            "ip route add blackhole 10.244.9.0/24 table 51820")
    assert host.run(["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]).stdout.strip() == "1"
    report = reset(host)
    routing = step(report, "remove-routing")
    assert routing["result"] == "succeeded"
    assert set(routing["removed"]) == {"rule ipv4 pref 100 from 10.244.0.0/16 lookup 51820",
                                       "route ipv4 table 51820 blackhole 10.244.9.0/24"}
    assert "51820" not in host.run(["ip", "rule"]).stdout
