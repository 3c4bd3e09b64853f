"""A whole reset run on a temporary root for the fast tests of the verify, stop-daemon and finish steps:

    env = reset_run(tmp_path, monkeypatch)      # the lock held for the run; the agent's config in the root
    env.run_phase(1); env.run(verify.STEP)      # each step as its unit would run it

Steps that need machined or netlink find nothing (they have their own tests). FakeUnits stands in for
step.AgentUnits: the daemon runs and is enabled until stopped and disabled; reloads are counted.
"""

from __future__ import annotations

import contextlib

from unbounded_agent.hostlock import HostLock
from unbounded_agent.reset.reports import ResetRequest, write_request
from unbounded_agent.reset.runner import run_step
from unbounded_agent.reset.steps import of_phase, remove_links, remove_machine_trees, remove_routing, stop_machines

RUN = "req-0001"
DAEMON = "unbounded-agent-daemon.service"


class FakeUnits:
    def __init__(self, daemon_running: bool = True):
        self.running_units = {DAEMON} if daemon_running else set()
        self.enabled_units = {DAEMON} if daemon_running else set()
        self.stuck: set[str] = set()
        self.calls: list[tuple] = []

    def matching(self, patterns):
        return []

    def running(self, name):
        return name in self.running_units

    def reporting(self, name):
        return name in self.running_units

    def enabled(self, name):
        return name in self.enabled_units

    def stop(self, name, timeout):
        from unbounded_agent.reasons import OpsError, Reason

        self.calls.append(("stop", name))
        if name in self.stuck:
            raise OpsError(Reason.EXECUTION_FAILED, f"{name} did not stop within {timeout:g} s")
        self.running_units.discard(name)

    def disable(self, name):
        self.calls.append(("disable", name))
        self.enabled_units.discard(name)

    def reload(self):
        self.calls.append(("reload",))


class ResetRun:
    def __init__(self, tmp_path):
        self.root, self.dir, self.units = tmp_path / "root", tmp_path / "reset", FakeUnits()

    def run(self, step):
        return run_step(step, directory=self.dir, root=str(self.root), systemd=self.units)

    def context(self):
        """A step's Context on this run's root, for a look at a plan."""
        from unbounded_agent.reset.step import Context

        return Context(machine_name="node-7", bin_dirs=(), state_dirs=(), root=str(self.root), systemd=self.units,
                       directory=str(self.dir))

    def run_phase(self, phase: int, but=()):
        return [self.run(s) for s in of_phase(phase) if s not in but]

    def write(self, path: str, text: str = "x") -> None:
        p = self.root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@contextlib.contextmanager
def reset_run(tmp_path, monkeypatch):
    monkeypatch.setenv("UNBOUNDED_AGENT_LOCK", str(tmp_path / "install.lock"))
    cfg = tmp_path / "root/etc/unbounded/agent/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("machineName: node-7\n")
    monkeypatch.setenv("UNBOUNDED_AGENT_CONFIG", str(cfg))
    for step in (stop_machines.STEP, remove_links.STEP, remove_routing.STEP, remove_machine_trees.STEP):
        monkeypatch.setattr(type(step), "plan", lambda self, ctx: [])
        monkeypatch.setattr(type(step), "apply", lambda self, ctx, rec: None)
    write_request(ResetRequest(run_id=RUN), tmp_path / "reset")
    with HostLock(RUN, "reset").acquire():
        yield ResetRun(tmp_path)
