"""The metrics for node_exporter's textfile collector: each operation the dispatcher ends is counted once, by
kind, result and reason; rollbacks by why; reset steps by result; the current and last-good agents as info
metrics; the last operation's time and duration. The counters outlive every process, the file is written
whole or not at all, and only where node_exporter's directory exists."""

import os
import re

import pytest

from unbounded_agent import layout, records
from unbounded_agent.config import load
from unbounded_agent.queue import dispatch, metrics
from unbounded_agent.queue.spool import Request, Result, Spool
from unbounded_agent.reset import api as reset_api
from unbounded_agent.reset.reports import StepReport, write_report
from unbounded_agent.upgrade import api as upgrade_api
from unbounded_agent.upgrade import probation
from unbounded_agent.upgrade.record import Binary, Failure, Store, UpgradeRecord

SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def scrape(path) -> dict[tuple[str, tuple], float]:
    """(name, ((label, value), ...)) -> value, as a collector reads the file; every line must parse."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) unbounded_agent_\w+ \S", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = tuple(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        out[(m[1], labels)] = float(m[3])
    return out


def agent(path, version):
    path.write_text(f"#!/bin/sh\necho unbounded-agent {version}\n")
    path.chmod(0o755)


@pytest.fixture
def host(tmp_path, monkeypatch, metrics_textfile):
    """An agent on green (2.0.0) with blue (1.0.0) as last-good, node_exporter's directory, the ops dir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    agent(bin_dir / layout.BLUE, "1.0.0")
    agent(bin_dir / layout.GREEN, "2.0.0")
    os.symlink(layout.GREEN, bin_dir / layout.CURRENT)
    os.symlink(layout.BLUE, bin_dir / layout.LAST_GOOD)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"stateDir: {tmp_path / 'state'}\nbinDir: {bin_dir}\n")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg_file))
    monkeypatch.setenv("UNBOUNDED_AGENT_OPS_DIR", str(tmp_path / "ops"))
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    metrics_textfile.parent.mkdir()
    return load()


def result(id, kind="upgrade", succeeded=True, reason="Succeeded", seconds=12.5,
           finished_at="2026-01-02T03:04:05.250Z") -> Result:
    return Result(id=id, kind=kind, operation=id, source="cli", succeeded=succeeded, reason=reason, message="",
                  finished_at=finished_at, seconds=seconds)


def ended(cfg, id, phase, kind="upgrade", cause=None):
    """The upgrade record operation id left behind."""
    rec = UpgradeRecord(id=id, operation=id, kind=kind, phase=phase, from_=Binary(version="1.0.0"),
                        to=Binary(version="2.0.0"), failure=Failure(detail="crashed", cause=cause) if cause else None)
    Store(cfg).write(rec)


def test_an_upgrade_is_counted_with_the_agents_and_the_last_operation(host, metrics_textfile):
    ended(host, "upgrade-1", "committed")
    assert metrics.count(host, result("upgrade-1")) == metrics_textfile
    m = scrape(metrics_textfile)
    assert m[("unbounded_agent_operations_total", (("kind", "upgrade"), ("result", "succeeded"),
                                                   ("reason", "Succeeded")))] == 1
    assert m[("unbounded_agent_current_info", (("slot", layout.GREEN), ("version", "2.0.0")))] == 1
    assert m[("unbounded_agent_last_good_info", (("slot", layout.BLUE), ("version", "1.0.0")))] == 1
    assert m[("unbounded_agent_last_operation_timestamp_seconds", ())] == 1767323045.25
    assert m[("unbounded_agent_last_operation_duration_seconds", ())] == 12.5
    assert not any(name == "unbounded_agent_rollbacks_total" for name, _ in m)
    # every family is declared once, in the file's order, and nothing else is in the directory
    text = metrics_textfile.read_text()
    assert [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")] == list(metrics.FAMILIES)
    assert os.listdir(metrics_textfile.parent) == [metrics_textfile.name]
    assert oct(metrics_textfile.stat().st_mode & 0o777) == "0o644"


def test_rollbacks_are_counted_by_why_and_operations_by_reason(host, metrics_textfile):
    ended(host, "upgrade-1", "rolled-back", cause=probation.EXITED_BEFORE_READY)
    metrics.count(host, result("upgrade-1", succeeded=False, reason="DaemonFailed"))
    ended(host, "upgrade-2", "rolled-back", cause=probation.EXITED_BEFORE_READY)
    metrics.count(host, result("upgrade-2", succeeded=False, reason="DaemonFailed"))
    ended(host, "rollback-3", "committed", kind="rollback")
    metrics.count(host, result("rollback-3", kind="rollback"))
    ended(host, "upgrade-4", "failed")  # before the switch: no rollback
    metrics.count(host, result("upgrade-4", succeeded=False, reason="ChecksumMismatch"))
    m = scrape(metrics_textfile)
    assert {labels: v for (name, labels), v in m.items() if name == "unbounded_agent_rollbacks_total"} == {
        (("reason", "ExitedBeforeReady"),): 2, (("reason", "Requested"),): 1}
    assert {labels: v for (name, labels), v in m.items() if name == "unbounded_agent_operations_total"} == {
        (("kind", "upgrade"), ("result", "failed"), ("reason", "DaemonFailed")): 2,
        (("kind", "rollback"), ("result", "succeeded"), ("reason", "Succeeded")): 1,
        (("kind", "upgrade"), ("result", "failed"), ("reason", "ChecksumMismatch")): 1}


def test_a_reset_counts_the_steps_of_its_own_run(host, metrics_textfile, tmp_path):
    reset_dir = tmp_path / "ops" / "reset"
    for number, step, run, outcome in ((1, "stop-machines", "reset-1", "succeeded"),
                                       (2, "remove-links", "reset-1", "failed"),
                                       (3, "remove-wireguard-keys", "reset-0", "succeeded")):  # an older run's
        write_report(StepReport(step=step, number=number, phase=1, run_id=run, result=outcome, reason="Succeeded"),
                     reset_dir)
    metrics.count(host, result("reset-1", kind="reset", succeeded=False, reason="ExecutionFailed"))
    m = scrape(metrics_textfile)
    assert {labels: v for (name, labels), v in m.items() if name == "unbounded_agent_reset_steps_total"} == {
        (("step", "stop-machines"), ("result", "succeeded")): 1, (("step", "remove-links"), ("result", "failed")): 1}


def test_the_counters_outlive_the_process_and_the_agent(host, metrics_textfile, tmp_path):
    metrics.count(host, result("upgrade-1"))
    saved = records.read_json(tmp_path / "ops" / metrics.COUNTERS_FILE)
    assert saved["operations"] == {"upgrade/succeeded/Succeeded": 1} and saved["last_operation"] == "upgrade-1"
    for link in (layout.CURRENT, layout.LAST_GOOD):  # a reset removed the agent
        os.unlink(host.bin_dir / link)
    metrics.count(host, result("upgrade-2"))
    m = scrape(metrics_textfile)
    assert m[("unbounded_agent_operations_total", (("kind", "upgrade"), ("result", "succeeded"),
                                                   ("reason", "Succeeded")))] == 2
    assert not any(name.endswith("_info") for name, _ in m)  # no agent: no version


def test_without_node_exporters_directory_nothing_is_written_but_everything_is_counted(host, metrics_textfile, tmp_path):
    metrics_textfile.parent.rmdir()
    assert metrics.count(host, result("upgrade-1")) is None and metrics.write(host) is None
    assert not metrics_textfile.parent.exists()
    assert metrics.load(tmp_path / "ops").operations == {"upgrade/succeeded/Succeeded": 1}


def test_the_metrics_unit_writes_the_file_at_daemon_start(host, metrics_textfile, capsys):
    assert metrics.main([]) == 0
    m = scrape(metrics_textfile)
    assert m[("unbounded_agent_current_info", (("slot", layout.GREEN), ("version", "2.0.0")))] == 1
    assert not any(name == "unbounded_agent_operations_total" for name, _ in m)  # nothing ended yet
    assert f"wrote {metrics_textfile}" in capsys.readouterr().err


def test_label_values_are_escaped():
    text = metrics.render(metrics.Counters(rollbacks={'a"b\\c\nd': 1}), {})
    assert 'unbounded_agent_rollbacks_total{reason="a\\"b\\\\c\\nd"} 1' in text.splitlines()


def test_the_dispatcher_counts_every_result_it_writes(host, metrics_textfile, monkeypatch, tmp_path):
    """Each request it runs is counted once, under its own id, and the file says which ended last."""
    def upgrade(cfg, spec, on_change=None):
        rec = UpgradeRecord(id=spec.id, operation=spec.operation, phase="committed", reason="Succeeded",
                            from_=Binary(version="1.0.0"), to=Binary(version="2.0.0"))
        return Store(cfg).write(rec)

    def reset(spec, before_removal):
        write_report(StepReport(step="stop-machines", number=1, phase=1, run_id=spec.id, result="succeeded",
                                reason="Succeeded"), tmp_path / "ops" / "reset")
        return reset_api.Outcome(True, "Succeeded", "reset complete")

    monkeypatch.setattr(upgrade_api, "run", upgrade)
    monkeypatch.setattr(reset_api, "run", reset)
    spool = Spool(tmp_path / "ops").ensure()
    spool.submit(Request(id="upgrade-1", kind="upgrade", url="https://h/a.tgz"))
    spool.submit(Request(id="reset-2", kind="reset"))
    dispatch.run(spool)
    m = scrape(metrics_textfile)
    assert {labels: v for (name, labels), v in m.items() if name == "unbounded_agent_operations_total"} == {
        (("kind", "upgrade"), ("result", "succeeded"), ("reason", "Succeeded")): 1,
        (("kind", "reset"), ("result", "succeeded"), ("reason", "Succeeded")): 1}
    assert m[("unbounded_agent_reset_steps_total", (("step", "stop-machines"), ("result", "succeeded")))] == 1
    assert metrics.load(spool.root).last_operation == "reset-2"
    assert m[("unbounded_agent_last_operation_duration_seconds", ())] == spool.result("reset-2").seconds
