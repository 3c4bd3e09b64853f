"""Config parsing: defaults, valid settings, and a clear InvalidConfig for every kind of bad file."""

import pytest

from unbounded_agent import config
from unbounded_agent.reasons import OpsError, Reason


def write(tmp_path, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return str(p)


def test_missing_file_gives_defaults(tmp_path):
    cfg = config.load(str(tmp_path / "absent.yaml"))
    assert str(cfg.bin_dir) == config.DEFAULT_BIN_DIR
    assert str(cfg.state_dir) == config.DEFAULT_STATE_DIR
    assert cfg.machine_name  # the host name
    assert "absent" in cfg.source


def test_settings_are_read(tmp_path):
    cfg = config.load(write(tmp_path, "machineName: worker-01\nbinDir: /usr/local/bin\nkubeconfig: /etc/k.conf\n"))
    assert (cfg.machine_name, str(cfg.bin_dir), cfg.kubeconfig) == ("worker-01", "/usr/local/bin", "/etc/k.conf")


def test_empty_file_gives_defaults(tmp_path):
    assert str(config.load(write(tmp_path, "")).bin_dir) == config.DEFAULT_BIN_DIR


def test_env_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_CONFIG, write(tmp_path, "machineName: from-env\n"))
    assert config.load().machine_name == "from-env"


@pytest.mark.parametrize(
    "text, words",
    [
        ("machineName: [unclosed\n", "not valid YAML at line"),
        ("- a\n- b\n", "expected a mapping"),
        ("machinename: typo\n", "unknown setting(s) machinename"),
        ("machineName: 42\n", "machineName must be a str"),
        ("binDir: relative/bin\n", "binDir must be an absolute path"),
    ],
)
def test_bad_file_is_a_clear_error(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(OpsError) as e:
        config.load(path)
    assert e.value.reason is Reason.INVALID_CONFIG
    assert words in e.value.message and path in e.value.message


def test_unreadable_path_is_a_clear_error(tmp_path):
    with pytest.raises(OpsError) as e:
        config.load(str(tmp_path))  # a directory
    assert e.value.reason is Reason.INVALID_CONFIG and "cannot read" in e.value.message


def test_tunables_are_typed_and_positive(tmp_path):
    cfg = config.load(write(tmp_path, "probationSeconds: 2.5\nmaxArchiveBytes: 1048576\nallowInsecureHTTP: true\n"))
    assert (cfg.probation_seconds, cfg.max_archive_bytes, cfg.allow_insecure_http) == (2.5, 1 << 20, True)
    for text, words in [
        ("maxArchiveBytes: true\n", "must be a int"),
        ("probationSeconds: 0\n", "greater than 0"),
        ("allowInsecureHTTP: 'yes'\n", "must be a bool"),
    ]:
        with pytest.raises(OpsError) as e:
            config.load(write(tmp_path, text))
        assert words in e.value.message


@pytest.mark.parametrize("key, low, high", [
    ("readyTimeoutSeconds", 1, 1800), ("probationSeconds", 1, 3600), ("downloadDeadlineSeconds", 1, 86400),
    ("preflightTimeoutSeconds", 1, 600)])
def test_the_tunables_the_units_take_are_bounded_by_what_a_unit_can_honour(tmp_path, key, low, high):
    attr = config._KEYS[key][0]
    for ok in (low, high, (low + high) / 2):
        assert getattr(config.load(write(tmp_path, f"{key}: {ok}\n")), attr) == ok
    for bad in (low / 2, high + 1, "1.0e+300"):
        with pytest.raises(OpsError) as e:
            config.load(write(tmp_path, f"{key}: {bad}\n"))
        assert e.value.reason is Reason.INVALID_CONFIG
        assert f"{key} must be between {low:g} and {high:g} seconds" in e.value.message, e.value.message
        assert "TimeoutStartSec=" in e.value.message  # names the unit setting it would go into


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_a_number_that_is_not_finite_is_refused(tmp_path, value):
    with pytest.raises(OpsError) as e:
        config.load(write(tmp_path, f"connectTimeoutSeconds: {value}\n"))
    assert "finite number" in e.value.message


@pytest.mark.parametrize("value, words", [
    ("'/opt/agent bin'", "cannot go into a unit file"),
    ("'/opt/%i'", "cannot go into a unit file"),
    ("'/opt/a\"b'", "cannot go into a unit file"),
    ("/", "cannot go into a unit file"),
    ("/home/me/agent", "under /home"),
    ("/root/agent", "under /root"),
    ("/proc/agent", "under /proc"),
])
def test_a_path_the_units_cannot_take_is_refused(tmp_path, value, words):
    for key in ("binDir", "stateDir"):
        with pytest.raises(OpsError) as e:
            config.load(write(tmp_path, f"{key}: {value}\n"))
        assert e.value.reason is Reason.INVALID_CONFIG and words in e.value.message and key in e.value.message


def test_paths_are_normalised(tmp_path):
    cfg = config.load(write(tmp_path, "binDir: /opt/agent-bin/\nstateDir: /srv//agent/./state\n"))
    assert (str(cfg.bin_dir), str(cfg.state_dir)) == ("/opt/agent-bin", "/srv/agent/state")
