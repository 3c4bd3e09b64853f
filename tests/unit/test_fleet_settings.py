"""The fan-out controller's settings: defaults, the file, the command line on top, and refusals."""

import pytest

from unbounded_agent.fleet import settings
from unbounded_agent.reasons import OpsError, Reason


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setenv("POD_NAME", "ctl-7f9c")
    s = settings.load(str(tmp_path / "absent.yaml"))
    assert (s.kubeconfig, s.lease_namespace, s.lease_name) == (None, "unbounded-system",
                                                               "unbounded-agent-fleet-controller")
    assert (s.lease_duration_seconds, s.renew_deadline_seconds, s.retry_period_seconds) == (15, 10.0, 2.0)
    assert s.identity.startswith("ctl-7f9c_") and s.identity != settings.load(str(tmp_path / "absent.yaml")).identity


def test_the_file_and_then_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    path = tmp_path / "config.yaml"
    path.write_text("kubeconfig: /etc/k\nidentity: mgmt-01\nleaseDurationSeconds: 30\nrenewDeadlineSeconds: 20\n")
    s = settings.load(str(path), {"identity": "mgmt-02", "leaseNamespace": None})
    assert (s.kubeconfig, s.identity, s.lease_namespace, s.lease_duration_seconds) == ("/etc/k", "mgmt-02", "ops", 30)


@pytest.mark.parametrize("text,words", [
    ("leaseDuration: 5\n", "unknown setting(s) leaseDuration"),
    ("leaseDurationSeconds: 2.5\n", "leaseDurationSeconds must be a int"),
    ("retryPeriodSeconds: 0\n", "must be greater than 0"),
    ("renewDeadlineSeconds: 20\n", "must hold"),
    ("identity: ''\n", "must not be empty"),
    ("[1, 2]\n", "expected a mapping"),
])
def test_a_bad_file_is_a_clear_error(tmp_path, text, words):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(OpsError) as e:
        settings.load(str(path))
    assert e.value.reason == Reason.INVALID_CONFIG and words in e.value.message
