"""Fixtures the reset stories share: a test host of the module's own (agent_host), or of the test's own
(fresh_agent_host), with the .deb installed (bootstrapped_host.py)."""

from bootstrapped_host import agent_host, fresh_agent_host  # noqa: F401 (fixtures)
