"""A machine that ignores the graceful stop is terminated once the graceful bound has passed, and
the step still succeeds: no machine is left running, and the report says which one was forced."""

import pytest
from bootstrapped_host import bootstrap, drop_in, remove_drop_in, run_reset, snapshot, step

pytestmark = pytest.mark.testhost

STOP_UNIT = "unbounded-agent-reset-stop-machines.service"
GRACEFUL = 2  # seconds: short, so the test is quick; the production unit says 30


@pytest.fixture(scope="module")
def result(agent_host):
    fx = bootstrap(agent_host, stubborn=("kube2",))
    # Proof that kube2 really ignores the graceful stop: its payload (PID 1 of the machine) has no
    # SIGTERM handler, so the kernel drops the SIGTERM nspawn forwards (KillSignal=SIGTERM).
    leader = agent_host.run(["machinectl", "show", "kube2", "-p", "Leader", "--value"]).stdout.strip()
    caught = int(agent_host.run(["awk", "/^SigCgt/ {print $2}", f"/proc/{leader}/status"]).stdout, 16)
    assert caught & (1 << 14) == 0  # bit 14 = SIGTERM (15) not caught
    drop_in(agent_host, STOP_UNIT, "[Service]\nExecStart=\nExecStart=/usr/libexec/unbounded-agent/"
            f"unbounded-agent-reset-stop-machines --graceful-timeout {GRACEFUL} --terminate-timeout 15\n")
    try:
        code, report, _ = run_reset(agent_host)
    finally:
        remove_drop_in(agent_host, STOP_UNIT)
    return fx, code, report, snapshot(agent_host)


def test_the_stubborn_machine_was_terminated_and_the_other_stopped_gracefully(result):
    _, code, report, snap = result
    stop = step(report, "stop-machines")
    assert stop["result"] == "succeeded"
    assert stop["forced"] == ["kube2"]
    assert f"machine kube2 ignored the graceful stop for {GRACEFUL} s and was terminated" in stop["notes"]
    assert {"machine kube1", "machine kube2"} <= set(stop["removed"])


def test_no_agent_machine_is_left_and_kube10_still_runs(result):
    _, code, _, snap = result
    assert (snap["machine kube1"], snap["machine kube2"], snap["machine kube10"]) == (False, False, True)
    assert code == 0


def test_the_machine_unit_was_not_left_failed(result, agent_host):
    # A forced stop leaves the unit "failed"; the step resets that so the host looks clean.
    assert agent_host.run(["systemctl", "is-failed", "systemd-nspawn@kube2.service"], check=False).stdout.strip() \
        == "inactive"
