"""`journalctl UNBOUNDED_OPERATION=<operation>` tells one operation's whole story, as an operator reads it:
an AgentUpgrade asked for with kubectl whose release crashes runs through the watcher in the daemon, the
dispatcher, the stage, preflight and switch steps, probation and recovery, and every one of them logged
through the journal's native protocol with its own identifier and the operation's fields (name, request
id, the MachineOperation's uid, kind, step, result, reason, versions), and none of them a secret. A reset
asked for on the host tells its story the same way, step by step. `unbounded-agent status` names the
command."""

import json
import re

import pytest
import releases
from mop_host import KubeLink, mop
from upgrade_host import busy_units, queued, wait_until

pytestmark = pytest.mark.testhost


@pytest.fixture(scope="module")
def env(testhost_factory, tmp_path_factory):
    with testhost_factory("journal", installed=True) as host:
        kube = KubeLink.start(host, tmp_path_factory.mktemp("kube"))
        try:
            kube.configure_agent(host)
            crash = releases.script_release(tmp_path_factory.mktemp("rel") / "crash.tar.gz", version="9.0.0",
                                            daemon="crash")
            host.crash_url = host.serve(crash, "crash.tar.gz") + "?sig=topsecret"
            yield host, kube
        finally:
            kube.stop()


def story(host, operation: str) -> list[dict]:
    """The operation's lines, once the dispatcher is done with it (it counts it in the metrics after its
    result, which ends the requester's wait)."""
    wait_until("the dispatcher to finish", lambda: not queued(host) and not busy_units(host))
    out = host.run(["journalctl", "--no-pager", "-o", "json", f"UNBOUNDED_OPERATION={operation}"]).stdout
    return [json.loads(line) for line in out.splitlines()]


def unit(entry: dict) -> str:
    """The unit a line came from, with a template's instance left out."""
    name = entry["_SYSTEMD_UNIT"]
    return name.split("@")[0] + "@" if "@" in name else name.removesuffix(".service")


def fields(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k.startswith("UNBOUNDED_")}


def test_a_machineoperation_upgrade_that_rolls_back_tells_its_story_across_its_units(env, version):
    host, kube = env
    with kube.watch() as w:
        kube.apply(mop("upgrade-story", host.name, "AgentUpgrade", downloadURL=host.crash_url))
        w.wait_phase("upgrade-story", "Complete", "Failed")
    uid = kube.get("upgrade-story")["metadata"]["uid"]
    name = f"upgrade-story@{uid[:8]}"  # the name the host knows it by (status, results, the record)
    rec = json.loads(host.read("/var/lib/unbounded-agent/upgrade.json"))
    assert (rec["operation"], rec["phase"]) == (name, "rolled-back")
    entries = story(host, name)
    units = list(dict.fromkeys(unit(e) for e in entries))
    # the watcher accepted it first; then each unit that ran it, in order; the restored daemon reported it
    assert units == ["unbounded-agent-daemon", "unbounded-agent-dispatch", "unbounded-upgrade-stage@",
                     "unbounded-upgrade-preflight@", "unbounded-upgrade-switch@", "unbounded-upgrade-probation",
                     "unbounded-agent-daemon-recovery"], units
    reported = [i for i, e in enumerate(entries) if unit(e) == "unbounded-agent-daemon" and "Failed: DaemonFailed" in e["MESSAGE"]]
    rolled_back = [i for i, e in enumerate(entries) if unit(e) == "unbounded-agent-daemon-recovery"]
    assert len(reported) == 1 and reported[0] > max(rolled_back)
    for e in entries:
        assert e["_TRANSPORT"] == "journal", e  # the native protocol, also from the daemon's sandbox
        assert e["SYSLOG_IDENTIFIER"] == unit(e).rstrip("@"), e  # each program's own, stable name
        assert (e["UNBOUNDED_OPERATION_UID"], e["UNBOUNDED_KIND"]) == (uid, "upgrade"), e
        if "UNBOUNDED_REQUEST" in e:  # all but the watcher's first lines, before it chose the request id
            assert e["UNBOUNDED_REQUEST"] == rec["id"], e
    assert sum("UNBOUNDED_REQUEST" not in e for e in entries) <= 2
    steps = {unit(e): e.get("UNBOUNDED_STEP") for e in entries}
    assert (steps["unbounded-upgrade-stage@"], steps["unbounded-upgrade-switch@"], steps["unbounded-upgrade-probation"],
            steps["unbounded-agent-daemon-recovery"]) == ("stage", "switch", "probation", "recovery")
    # how each ended, on its own line: the steps passed, probation failed it, the operation failed
    ended = [(unit(e), e["UNBOUNDED_RESULT"], e.get("UNBOUNDED_REASON")) for e in entries if "UNBOUNDED_RESULT" in e]
    assert ("unbounded-upgrade-preflight@", "succeeded", None) in ended
    assert ("unbounded-upgrade-probation", "failed", "DaemonFailed") in ended
    assert ("unbounded-agent-dispatch", "failed", "DaemonFailed") in ended
    assert ("unbounded-agent-daemon", "failed", "DaemonFailed") in ended
    last = next(e for e in entries if unit(e) == "unbounded-agent-dispatch" and "UNBOUNDED_RESULT" in e)
    assert (last["UNBOUNDED_FROM_VERSION"], last["UNBOUNDED_TO_VERSION"]) == (version, "9.0.0")
    assert all(e.get("UNBOUNDED_TO_VERSION") in (None, "9.0.0") for e in entries)
    # no field and no line of the story carries the URL's secret, nor a URL at all in a field
    assert "topsecret" not in json.dumps(entries)
    assert not any("://" in v for e in entries for v in fields(e).values())
    # and status says where to read it
    assert f"journalctl UNBOUNDED_OPERATION={name}" in host.run(["unbounded-agent", "status"]).stdout


def test_a_reset_tells_its_story_step_by_step(env):
    host, _ = env
    r = host.run(["unbounded-agent", "reset"], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    id = re.search(r"^unbounded-agent reset \(request (\S+)\): queued$", r.stdout, re.M)[1]
    entries = story(host, id)
    units = list(dict.fromkeys(unit(e) for e in entries))
    assert units[0] == "unbounded-agent-dispatch" and len(units) >= 8, units
    steps = [u for u in units if u.startswith("unbounded-agent-reset-")]
    assert {"unbounded-agent-reset-begin", "unbounded-agent-reset-stop-machines", "unbounded-agent-reset-remove-agent",
            "unbounded-agent-reset-verify"} <= set(steps)
    for e in entries:
        assert (e["UNBOUNDED_REQUEST"], e["UNBOUNDED_KIND"]) == (id, "reset"), e
        if unit(e) in steps:
            assert e["UNBOUNDED_STEP"] == unit(e).removeprefix("unbounded-agent-reset-"), e
    # every step said how it ended, and the dispatcher how the whole reset did
    ended = {unit(e): e["UNBOUNDED_RESULT"] for e in entries if "UNBOUNDED_RESULT" in e}
    assert ended == {u: "succeeded" for u in ["unbounded-agent-dispatch", *steps]}, ended
