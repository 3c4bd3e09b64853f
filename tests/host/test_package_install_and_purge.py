"""The .deb on a real systemd host: install seeds slot blue, starts the daemon and arms the operation
queue (the path unit; the dispatcher runs only while requests wait); remove and purge leave none of the
package's files behind (the agent slots are runtime state that reset removes), remove takes the metrics
textfile along, and purge removes the toolset's own state (the queue, results, reset reports and the
metrics' counters). A package upgrade: test_package_upgrade_keeps_an_upgrade_on_probation.py."""

import json

import pytest

pytestmark = pytest.mark.testhost

BIN = "/var/lib/unbounded-agent/bin"
TEXTFILE = "/var/lib/prometheus/node-exporter/unbounded_agent.prom"


@pytest.fixture(scope="module")
def host(testhost_factory):
    with testhost_factory("pkg") as h:
        yield h


@pytest.fixture(scope="module")
def installed(host, deb_path):
    host.install_deb(deb_path)
    return host


def test_version_is_the_stamped_one(installed, version):
    assert installed.run(["unbounded-agent", "version"]).stdout == f"unbounded-agent {version}\n"


def test_daemon_is_active_and_reported_ready(installed):
    props = installed.run(["systemctl", "show", "unbounded-agent-daemon.service",
                           "-p", "ActiveState,SubState,Type,StatusText,UnitFileState"]).stdout
    assert "ActiveState=active" in props and "SubState=running" in props
    assert "Type=notify" in props and "UnitFileState=enabled" in props
    assert "StatusText=unbounded-agent" in props  # the daemon's own sd_notify STATUS=


def test_kubernetes_manifests_ship_in_the_doc_dir(installed):
    docs = "/usr/share/doc/unbounded-agent/kubernetes"
    crd = installed.read(f"{docs}/crd-machineoperations.yaml")  # plain YAML: kubectl apply -f reads it
    assert "name: machineoperations.unbounded-cloud.io" in crd
    assert installed.path(f"{docs}/rbac.yaml").is_file()
    assert installed.path(f"{docs}/examples/upgrade-agent-worker-01.yaml").is_file()


def test_daemon_arms_its_own_watchdog(installed):
    # the unit sets no WatchdogSec=; the daemon asks for one with sd_notify WATCHDOG_USEC= (systemd 252)
    unit = installed.read("/lib/systemd/system/unbounded-agent-daemon.service")
    assert "\nWatchdogSec=" not in unit
    props = installed.run(["systemctl", "show", "unbounded-agent-daemon.service", "-p", "WatchdogUSec"]).stdout
    assert props.strip() == "WatchdogUSec=1min"


def test_status_json_reports_blue_as_current(installed, version):
    st = json.loads(installed.run(["unbounded-agent", "status", "--json"]).stdout)
    assert st["active_slot"] == "unbounded-agent-blue"
    assert st["current"] == {"link": f"{BIN}/unbounded-agent-current", "target": "unbounded-agent-blue",
                             "valid": True, "version": version}
    assert st["last_good"]["target"] == "unbounded-agent-blue" and st["last_good"]["valid"]
    assert st["upgrade"] is None and st["queue"] == [] and st["results"] == []
    assert (st["daemon"]["active_state"], st["daemon"]["sub_state"]) == ("active", "running")
    assert st["daemon"]["main_pid"] > 0


def test_status_for_humans(installed, version):
    out = installed.run(["unbounded-agent", "status"]).stdout
    assert f"current:     unbounded-agent-blue (version {version})" in out
    assert "daemon:      active (running), pid " in out
    assert "queue:       empty" in out and "upgrade:     none yet" in out


def test_the_queue_is_armed_and_nothing_runs_it_while_it_is_empty(installed):
    def show(unit):
        out = installed.run(["systemctl", "show", unit, "-p", "ActiveState,UnitFileState"]).stdout
        return dict(line.split("=", 1) for line in out.splitlines())
    assert show("unbounded-agent-requests.path") == {"ActiveState": "active", "UnitFileState": "enabled"}
    assert show("unbounded-agent-dispatch.service") == {"ActiveState": "inactive", "UnitFileState": "enabled"}
    assert installed.run(["stat", "-c", "%a", "/var/lib/unbounded-agent-ops/spool/requests"]).stdout == "700\n"


def test_the_fan_out_controller_is_installed_but_neither_enabled_nor_started(installed):
    """It belongs on a management host, enabled there by hand (units/README.md)."""
    out = installed.run(["systemctl", "show", "unbounded-agent-fleet-controller.service", "-p",
                         "ActiveState,UnitFileState,LoadState"]).stdout
    assert dict(line.split("=", 1) for line in out.splitlines()) == {
        "ActiveState": "inactive", "UnitFileState": "disabled", "LoadState": "loaded"}


def test_the_metrics_unit_hooks_itself_into_the_daemon(installed):
    wants = installed.run(["systemctl", "show", "unbounded-agent-daemon.service", "-p", "Wants", "--value"]).stdout
    assert "unbounded-agent-metrics.service" in wants.split()
    # without node_exporter's directory systemd skips it (its condition), and nothing is written
    shown = installed.run(["systemctl", "show", "unbounded-agent-metrics.service", "-p",
                           "ConditionResult,ExecMainStartTimestampMonotonic"]).stdout
    assert dict(line.split("=", 1) for line in shown.splitlines()) == {
        "ConditionResult": "no", "ExecMainStartTimestampMonotonic": "0"}  # checked, and no process ever started
    assert not installed.path(TEXTFILE).parent.exists()


def test_links_are_created_by_the_install_step_not_shipped(installed, deb_path):
    shipped = installed.run(["dpkg-deb", "-c", f"/var/tmp/pkgs/{deb_path.name}"]).stdout
    assert "/var/lib/unbounded-agent" not in shipped.replace("-> /var/lib/unbounded-agent", "")
    assert "/usr/local" not in shipped
    links = installed.sh(f"cd {BIN} && for f in *; do printf '%s ' $f; readlink $f || echo file; done").stdout.split("\n")
    assert sorted(filter(None, links)) == [
        "unbounded-agent unbounded-agent-current",
        "unbounded-agent-blue file",
        "unbounded-agent-current unbounded-agent-blue",
        "unbounded-agent-last-good unbounded-agent-blue",
    ]


def test_remove_then_purge_leave_no_package_files(installed):
    host = installed
    files = [f for f in host.run(["dpkg-query", "-L", "unbounded-agent"]).stdout.splitlines()
             if f.startswith("/") and not host.run(["test", "-d", f], check=False).returncode == 0]
    assert "/usr/bin/unbounded-agent" in files and len(files) > 10
    host.run(["mkdir", "-p", "/var/lib/prometheus/node-exporter"])  # node_exporter came, the metrics with it
    host.run(["systemctl", "start", "unbounded-agent-metrics.service"])
    assert "unbounded_agent_current_info" in host.read(TEXTFILE)

    host.run(["dpkg", "-r", "unbounded-agent"])
    # the textfile goes with the toolset that writes it (node_exporter would export it unchanged), its
    # directory stays: node_exporter's
    assert not host.path(TEXTFILE).exists() and host.path(TEXTFILE).parent.is_dir()
    left = [f for f in files if host.run(["test", "-e", f], check=False).returncode == 0
            or host.run(["test", "-L", f], check=False).returncode == 0]
    assert left == []
    assert "LoadState=not-found" in host.run(["systemctl", "show", "unbounded-agent-daemon.service", "-p", "LoadState"]).stdout
    assert host.run(["find", "/usr/lib/python3/dist-packages", "-path", "*unbounded_agent*"]).stdout == ""
    # the agent's binaries are runtime state: removed by `unbounded-agent reset`, not by dpkg
    assert host.run(["test", "-x", f"{BIN}/unbounded-agent-blue"], check=False).returncode == 0

    # the toolset's own state: a past result and reset report, and the reset dir of a toolset before the queue
    host.write("/var/lib/unbounded-agent-ops/results/upgrade-20250101t000000-abcdef.json", "{}\n")
    host.write("/var/lib/unbounded-agent-ops/reset/reports/01-stop-machines.json", "{}\n")
    host.write("/var/lib/unbounded-agent-reset/reports/01-stop-machines.json", "{}\n")
    host.run(["dpkg", "-P", "unbounded-agent"])
    assert not host.path("/var/lib/unbounded-agent-ops").exists()
    assert not host.path("/var/lib/unbounded-agent-reset").exists()
    assert host.sh("ls /var/lib/dpkg/info/ | grep unbounded-agent || true").stdout == ""
    assert host.sh("find /etc/systemd /lib/systemd /usr/lib/systemd -name 'unbounded-agent*'").stdout == ""
    assert host.sh("ls /var/lib/systemd/deb-systemd-helper-enabled/ 2>/dev/null | grep unbounded || true").stdout == ""


def test_reinstall_keeps_the_agent_binaries_it_finds(installed, deb_path, version):
    # after a purge, a reinstall must not clobber slots that an upgrade may have filled since
    host = installed
    before = host.run(["sha256sum", f"{BIN}/unbounded-agent-blue"]).stdout
    host.install_deb(deb_path)
    assert host.run(["sha256sum", f"{BIN}/unbounded-agent-blue"]).stdout == before
    assert host.run(["systemctl", "is-active", "unbounded-agent-daemon.service"]).stdout.strip() == "active"
