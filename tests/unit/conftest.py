"""What every fast test shares: no test writes the host's metrics textfile (node_exporter's directory may
exist on the machine that runs them)."""

import pytest

from unbounded_agent.queue import metrics


@pytest.fixture(autouse=True)
def metrics_textfile(tmp_path, monkeypatch):
    """The textfile's path for this test: in a directory that does not exist unless the test makes it."""
    path = tmp_path / "node-exporter" / "unbounded_agent.prom"
    monkeypatch.setenv(metrics.ENV_TEXTFILE, str(path))
    return path
