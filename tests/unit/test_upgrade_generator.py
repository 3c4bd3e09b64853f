"""The systemd generator: every setting of config.yaml that a unit depends on (binDir, stateDir,
readyTimeoutSeconds, probationSeconds, downloadDeadlineSeconds, preflightTimeoutSeconds) goes into that unit's
drop-in; the unit files themselves carry the values of the default config; a config that cannot be read
changes nothing."""

import re
from pathlib import Path

import pytest

from unbounded_agent import config
from unbounded_agent.reasons import OpsError
from unbounded_agent.upgrade import generator, units

UNITS = Path(__file__).resolve().parents[2] / "units"
KEYS = ("ExecStart", "TimeoutStartSec", "ReadWritePaths", "ReadOnlyPaths", "StateDirectory")


def settings(text: str) -> dict[str, str]:
    """The last value of each key (an empty assignment resets the list, as systemd reads it)."""
    out: dict[str, str] = {}
    for key, value in re.findall(r"^(\w+)=(.*)$", text, re.M):
        if key in KEYS:
            out[key] = value
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, value
    return int(m[1]) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m[2]]


@pytest.fixture
def write_config(tmp_path, monkeypatch):
    def write(text: str) -> config.Config:
        path = tmp_path / "config.yaml"
        path.write_text(text)
        monkeypatch.setenv(config.ENV_CONFIG, str(path))
        return config.load()
    return write


def test_the_unit_files_carry_the_values_of_the_default_config(tmp_path):
    """Without the generator (or before it ran) the units behave as the default config says."""
    cfg = config.load(str(tmp_path / "absent.yaml"))
    for unit, dropin in generator.dropins(cfg).items():
        shipped = settings((UNITS / unit).read_text())
        generated = settings(dropin)
        for key in ("ExecStart", "ReadWritePaths", "ReadOnlyPaths"):
            if key in generated:
                assert shipped[key] == generated[key].lstrip("-"), (unit, key)
        assert seconds(shipped["TimeoutStartSec"]) == seconds(generated["TimeoutStartSec"]), unit


def test_every_setting_a_unit_depends_on_reaches_its_drop_in(write_config):
    cfg = write_config("binDir: /opt/agent-bin\nstateDir: /srv/agent-state\nreadyTimeoutSeconds: 20\n"
                       "probationSeconds: 45\ndownloadDeadlineSeconds: 3600\npreflightTimeoutSeconds: 12.5\n")
    d = {unit: settings(text) for unit, text in generator.dropins(cfg).items()}
    daemon = d["unbounded-agent-daemon.service"]
    assert daemon["ExecStart"] == "/opt/agent-bin/unbounded-agent-current daemon"
    assert seconds(daemon["TimeoutStartSec"]) == 20
    assert daemon["ReadWritePaths"] == "-/srv/agent-state/machineoperations"  # made by its ExecStartPre=
    assert daemon["StateDirectory"] == "unbounded-agent-ops/spool unbounded-agent-ops/gates"  # not /var/lib/unbounded-agent
    assert seconds(d["unbounded-upgrade-stage@.service"]["TimeoutStartSec"]) == 3600 + units.STAGE_MARGIN_SECONDS
    preflight = d["unbounded-upgrade-preflight@.service"]
    assert seconds(preflight["TimeoutStartSec"]) == 12.5 + units.PREFLIGHT_MARGIN_SECONDS
    assert (preflight["ReadWritePaths"], preflight["ReadOnlyPaths"]) == ("-/srv/agent-state", "-/opt/agent-bin")
    probation = seconds(d["unbounded-upgrade-probation.service"]["TimeoutStartSec"])
    assert probation == units.probation_seconds(cfg) >= (units.MAX_REWATCH + 1) * (20 + 45)
    recovery = seconds(d[units.RECOVERY_UNIT]["TimeoutStartSec"])
    assert recovery == units.recovery_seconds(cfg) >= units.START_LIMIT_WAIT_MAX + 20


def test_an_empty_assignment_resets_what_the_unit_file_lists(write_config):
    text = generator.dropins(write_config("stateDir: /srv/agent-state\n"))["unbounded-agent-daemon.service"]
    assert text.index("ExecStart=\n") < text.index("ExecStart=/")
    assert text.index("StateDirectory=\n") < text.index("StateDirectory=unbounded")
    assert "ExecStartPre=+/usr/bin/mkdir -p -m 0700 /srv/agent-state/machineoperations" in text


def test_under_tmp_the_units_share_the_hosts_tmp(write_config):
    drop = generator.dropins(write_config("stateDir: /var/tmp/agent\n"))
    for unit in ("unbounded-agent-daemon.service", "unbounded-upgrade-stage@.service",
                 "unbounded-upgrade-preflight@.service"):
        assert "PrivateTmp=no" in drop[unit]
    assert "PrivateTmp" not in generator.dropins(write_config("stateDir: /srv/a\n"))["unbounded-agent-daemon.service"]


@pytest.mark.parametrize("value, text", [(60, "60s"), (60.0, "60s"), (0.5, "500ms"), (12.25, "12250ms")])
def test_time_spans_are_written_as_systemd_reads_them(value, text):
    assert generator.seconds(value) == text


def test_systemd_runs_it_with_its_output_dirs(write_config, tmp_path):
    write_config("binDir: /opt/agent-bin\n")
    out = tmp_path / "normal"
    assert generator.main([str(out), str(tmp_path / "early"), str(tmp_path / "late")]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.conf"))
    assert written == sorted(f"{u}.d/{generator.DROPIN}" for u in generator.dropins(config.load()))
    assert "/opt/agent-bin/unbounded-agent-current" in (out / f"unbounded-agent-daemon.service.d/{generator.DROPIN}").read_text()


def test_a_config_that_cannot_be_read_writes_nothing_and_says_why(write_config, tmp_path, capsys):
    with pytest.raises(OpsError):
        write_config("probationSeconds: 100000\n")
    out = tmp_path / "normal"
    assert generator.main([str(out)]) == 0
    assert not out.exists()
    err = capsys.readouterr().err
    assert "probationSeconds must be between 1 and 3600 seconds" in err and "keep their defaults" in err


def test_by_hand_it_prints_what_it_would_write(write_config, capsys):
    write_config("readyTimeoutSeconds: 30\n")
    assert generator.main([]) == 0
    out = capsys.readouterr().out
    assert "# unbounded-agent-daemon.service.d/" in out and "TimeoutStartSec=30s" in out
