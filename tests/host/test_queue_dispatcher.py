"""The dispatcher on a real host, as the path unit runs it: a request written just before a power cut runs
after the boot; a claim whose dispatcher was killed with SIGKILL is run by the next one; a stray file in the
spool never stops the queue; every request ends in a result."""

from pathlib import Path

import pytest
import releases
from queue_host import (
    DISPATCH,
    OPS,
    PATH_UNIT,
    hold,
    queue_files,
    release,
    result,
    submit,
    unhold,
    unit_show,
    wait_held,
    wait_result,
)
from upgrade_host import look, power_cycle, prepare, wait_until

pytestmark = pytest.mark.testhost
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def host(testhost_factory, tmp_path_factory):
    """A host on v2 with last-good on the packaged version, so a rollback (no download) has work to do."""
    with testhost_factory("dispatch", installed=True) as h:
        prepare(h)
        url = h.serve(releases.real_release(REPO, "2.0.0", tmp_path_factory.mktemp("v2")), "v2.tar.gz")
        assert wait_result(h, submit(h, "upgrade", url))["succeeded"]
        h.v2_url = url
        yield h


def flip(host) -> str:
    """A rollback: it goes between the two versions without the network, and changes what runs."""
    return submit(host, "rollback")


def test_a_request_written_before_a_power_cut_runs_after_the_boot(host):
    before = look(host)
    host.run(["systemctl", "stop", PATH_UNIT])  # nothing takes the request before the power goes
    rid = flip(host)
    assert any(f.endswith(f"-{rid}.request") for f in queue_files(host))
    power_cycle(host)
    res = wait_result(host, rid)
    assert res["succeeded"], res
    after = look(host)
    assert after["current"] == before["last_good"] and after["daemon_state"] == "active"
    assert queue_files(host) == []


def test_a_claim_interrupted_by_sigkill_is_run_by_the_next_dispatcher(host):
    before = look(host)
    hold(host, DISPATCH, "dispatch-claimed")
    rid = flip(host)
    killed = wait_held(host, OPS, "dispatch-claimed")
    assert any(f.endswith(f"-{rid}.claimed") for f in queue_files(host))
    unhold(host, DISPATCH)
    host.run(["kill", "-9", str(killed)])  # still waiting at its hold point: the marker goes only after
    release(host, OPS, "dispatch-claimed")
    res = wait_result(host, rid)
    assert res["succeeded"] and res["attempts"] == 2, res
    assert look(host)["current"] == before["last_good"]
    assert queue_files(host) == [] and unit_show(host, PATH_UNIT)["ActiveState"] == "active"


def test_a_stray_file_in_the_spool_does_not_stop_the_queue(host):
    host.write(f"{OPS}/spool/requests/notes.txt", "not a request\n")
    rid = flip(host)
    assert wait_result(host, rid)["succeeded"]
    wait_until("the dispatcher to stop", lambda: unit_show(host, DISPATCH)["ActiveState"] == "inactive")
    assert queue_files(host) == []
    assert any(f.endswith("notes.txt") for f in host.run(["ls", f"{OPS}/rejected"]).stdout.split())
    assert unit_show(host, PATH_UNIT)["ActiveState"] == "active"  # still watching


def test_a_queue_that_arrives_while_the_dispatcher_runs_is_run_after_it_in_order(host):
    hold(host, DISPATCH, "dispatch-claimed")
    first = flip(host)
    wait_held(host, OPS, "dispatch-claimed")
    unhold(host, DISPATCH)
    second, third = flip(host), flip(host)  # queued while the first is claimed
    ids = (first, second, third)

    def all_done():
        release(host, OPS, "dispatch-claimed")  # the running dispatcher pauses at each claim: let each one go
        return all(result(host, rid) for rid in ids)

    wait_until("the three results", all_done, timeout=300)
    results = [result(host, rid) for rid in ids]
    assert all(r["succeeded"] for r in results)
    assert results[0]["finished_at"] <= results[1]["started_at"] <= results[1]["finished_at"] <= results[2]["started_at"]
