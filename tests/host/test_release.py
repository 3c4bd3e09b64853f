"""`make release` builds a tarball with exactly one executable member that reports the stamped version."""

import subprocess
import tarfile

import pytest


def build_release(repo_root, dist, version):
    subprocess.run(["make", "-s", "release", f"VERSION={version}", f"DIST={dist}"], cwd=repo_root, check=True,
                   capture_output=True)
    return dist / "unbounded-agent-linux-amd64.tar.gz"


def run_member(tarball, workdir):
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        assert [(m.name, m.isfile(), m.mode) for m in members] == [("unbounded-agent", True, 0o755)]
        tar.extractall(workdir)
    return subprocess.run([str(workdir / "unbounded-agent"), "version"], capture_output=True, text=True, check=True).stdout


def test_two_releases_report_their_own_versions(repo_root, tmp_path):
    outputs = {}
    for version in ("1.2.3", "1.3.0~rc1"):
        tarball = build_release(repo_root, tmp_path / version, version)
        (tmp_path / f"x-{version}").mkdir()
        outputs[version] = run_member(tarball, tmp_path / f"x-{version}")
    assert outputs == {"1.2.3": "unbounded-agent 1.2.3\n", "1.3.0~rc1": "unbounded-agent 1.3.0~rc1\n"}


def test_an_invalid_version_is_refused(repo_root, tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as e:
        build_release(repo_root, tmp_path, "v1 2")
    assert b"invalid version" in e.value.stderr
    assert not (tmp_path / "unbounded-agent-linux-amd64.tar.gz").exists()


def test_agent_starts_without_heavy_imports(repo_root, tmp_path):
    # `version` runs on every status call and in preflight: it must not import the kubernetes
    # client, requests or pystemd.
    tarball = build_release(repo_root, tmp_path, "2.0.0")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path)
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-c",
         "import sys, runpy; sys.argv=['unbounded-agent','version'];"
         f"sys.path.insert(0, {str(tmp_path / 'unbounded-agent')!r});"
         "import unbounded_agent.cli as c; c.main(['version']);"
         "print(sorted(m for m in ('kubernetes','requests','pystemd','yaml','pyroute2') if m in sys.modules))"],
        capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["unbounded-agent 2.0.0", "[]"]


def test_failures_reach_the_exit_code(repo_root, tmp_path):
    # a bad config is an OpsError inside main(): the zipapp must exit with its reason's code
    tarball = build_release(repo_root, tmp_path, "2.0.1")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path)
    bad = tmp_path / "config.yaml"
    bad.write_text("binDir: relative\n")
    r = subprocess.run([str(tmp_path / "unbounded-agent"), "status"], capture_output=True, text=True,
                       env={"UNBOUNDED_AGENT_CONFIG": str(bad), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 3, r
    assert "InvalidConfig" in r.stderr and "binDir must be an absolute path" in r.stderr


@pytest.mark.testhost
def test_two_releases_run_on_the_test_host(repo_root, tmp_path, testhost):
    # the zipapp runs with the host's own python3 and Debian's packages, not this venv
    for version in ("3.0.0", "3.0.1"):
        tarball = build_release(repo_root, tmp_path / version, version)
        testhost.put(tarball, f"/var/tmp/rel-{version}.tar.gz")
        out = testhost.sh(f"mkdir -p /var/tmp/rel-{version} && tar -xzf /var/tmp/rel-{version}.tar.gz "
                          f"-C /var/tmp/rel-{version} && /var/tmp/rel-{version}/unbounded-agent version").stdout
        assert out == f"unbounded-agent {version}\n"
    testhost.run(["rm", "-rf", "/var/tmp/rel-3.0.0", "/var/tmp/rel-3.0.1", "/var/tmp/rel-3.0.0.tar.gz",
                  "/var/tmp/rel-3.0.1.tar.gz"])
