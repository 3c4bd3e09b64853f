"""Reset and upgrade against each other, as an operator types them: one host operation at a time.

- A reset asked for while an upgrade is on probation waits until the upgrade is over (committed or rolled
  back), then leaves a clean host, and nothing of the agent comes back afterwards.
- An upgrade asked for while a reset runs is refused at once with its reason, by the CLI and by
  `systemctl start unbounded-upgrade@<URL>`, and creates nothing.
- Two upgrades and a reset submitted together run one at a time, in order, each to a result.
"""

import time
from pathlib import Path

import pytest
import releases
from queue_host import (
    OPS,
    RESET_DIR,
    STATE,
    TOOLSET_CLI,
    agent_left,
    hold,
    queue_files,
    release,
    submit,
    submit_reset,
    unhold,
    wait_held,
    wait_result,
)
from upgrade_host import escape, look, prepare, upgrade

pytestmark = pytest.mark.testhost
REPO = Path(__file__).resolve().parents[2]
PROBATION = "unbounded-upgrade-probation.service"
QUIET_SECONDS = 30  # a window in which nothing may come back: it asserts an absence, not a speed


@pytest.fixture
def host(testhost_factory):
    """A fresh host per test: the reset removes the agent."""
    with testhost_factory("seam", installed=True) as h:
        prepare(h)
        yield h


@pytest.fixture(scope="module")
def v2(tmp_path_factory) -> Path:
    return releases.real_release(REPO, "2.0.0", tmp_path_factory.mktemp("v2"))


def states(host) -> list[tuple[str, str]]:
    """(request id, queued|claimed) for what is in the spool, in order."""
    return [(f.split("-", 1)[1].rsplit(".", 1)[0], f.rsplit(".", 1)[1]) for f in queue_files(host)]


@pytest.mark.parametrize("release_kind", ["healthy", "crashing"])
def test_a_reset_during_probation_waits_for_the_upgrade_then_leaves_a_clean_host(host, v2, tmp_path, release_kind):
    if release_kind == "healthy":
        url = host.serve(v2, "v2.tar.gz")
    else:
        url = host.serve(releases.script_release(tmp_path / "crash.tar.gz", daemon="crash-after", seconds=1),
                         "crash.tar.gz")
    hold(host, PROBATION, "probation-watching")
    up = submit(host, "upgrade", url)
    wait_held(host, STATE, "probation-watching")
    # the crashing release is a test script that knows no `reset`: the toolset's own CLI runs it then
    reset = submit_reset(host, program="unbounded-agent" if release_kind == "healthy" else TOOLSET_CLI)
    assert states(host) == [(up, "claimed"), (reset, "request")]  # the reset waits behind the upgrade
    unhold(host, PROBATION)
    release(host, STATE, "probation-watching")
    up_result, reset_result = wait_result(host, up), wait_result(host, reset)
    assert up_result["succeeded"] is (release_kind == "healthy"), up_result
    if release_kind == "crashing":
        assert up_result["reason"] == "DaemonFailed"
    assert reset_result["succeeded"], reset_result
    assert up_result["finished_at"] <= reset_result["started_at"]
    assert agent_left(host) == []
    time.sleep(QUIET_SECONDS)
    assert agent_left(host) == []
    assert queue_files(host) == []


def test_an_upgrade_during_a_reset_is_refused_at_once_and_creates_nothing(host, v2):
    url = host.serve(v2, "v2.tar.gz")
    hold(host, "unbounded-agent-reset-remove-links.service", "reset-remove-links")
    reset = submit_reset(host)
    wait_held(host, RESET_DIR, "reset-remove-links")
    before = look(host)

    r = upgrade(host, url, "--wait")
    assert r.returncode == 25, r  # Superseded
    assert f"reset {reset} is queued or running" in r.stderr and "upgrade refused" in r.stderr
    unit = f"unbounded-upgrade@{escape(host, url)}.service"
    r = host.run(["systemctl", "start", unit], check=False, timeout=120)
    assert r.returncode != 0
    assert host.run(["systemctl", "show", unit, "-p", "ExecMainStatus"]).stdout.strip() == "ExecMainStatus=25"
    assert states(host) == [(reset, "claimed")]  # nothing else was queued
    assert look(host)["record"] == before["record"]  # no upgrade began

    unhold(host, "unbounded-agent-reset-remove-links.service")
    release(host, RESET_DIR, "reset-remove-links")
    assert wait_result(host, reset)["succeeded"]
    assert agent_left(host) == []
    assert host.run(["test", "-e", STATE], check=False).returncode != 0  # the upgrade recreated nothing
    assert sorted(host.run(["ls", f"{OPS}/results"]).stdout.split()) == [f"{reset}.json"]


def test_two_upgrades_and_a_reset_submitted_together_run_one_at_a_time(host, v2, tmp_path):
    v3 = releases.real_release(REPO, "3.0.0", tmp_path / "v3")
    urls = host.serve(v2, "v2.tar.gz"), host.serve(v3, "v3.tar.gz")
    first, second = submit(host, "upgrade", urls[0]), submit(host, "upgrade", urls[1])
    reset = submit_reset(host)
    results = [wait_result(host, rid) for rid in (first, second, reset)]
    assert all(r["succeeded"] for r in results), results
    assert [(r["from_version"], r["to_version"]) for r in results[:2]] == [("0.1.0", "2.0.0"), ("2.0.0", "3.0.0")]
    for before, after in zip(results, results[1:], strict=False):
        assert before["finished_at"] <= after["started_at"]  # never two at once
    assert agent_left(host) == []


def test_after_a_reset_no_unit_of_the_upgrade_chain_brings_the_agent_back(host, v2):
    url = host.serve(v2, "v2.tar.gz")
    up = submit(host, "upgrade", url)
    assert wait_result(host, up)["succeeded"]
    assert wait_result(host, submit_reset(host))["succeeded"]
    for unit in ("unbounded-agent-daemon-recovery.service", "unbounded-upgrade-probation.service",
                 f"unbounded-upgrade-switch@{up}.service"):
        host.run(["systemctl", "start", unit], check=False, timeout=120)
    # an upgrade after the reset is refused by the dispatcher without writing anything
    r = host.run([TOOLSET_CLI, "upgrade", url], check=False)  # the agent binary is gone: the toolset's CLI
    late = r.stdout.split()[1] if r.returncode == 0 else None
    assert late, r
    res = wait_result(host, late)
    assert not res["succeeded"] and "no agent is installed" in res["message"]
    assert agent_left(host) == []
    assert host.run(["test", "-e", STATE], check=False).returncode != 0
