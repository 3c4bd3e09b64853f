"""The fault matrix (tests/support/fault_matrix.py): seeded kill -9s and power cuts at every step of upgrade,
recovery, reset and the queue, each trial run to convergence without help and checked.

`make test` runs a reduced matrix (FAULT_TRIALS, default 4, from FAULT_SEED, default 24); `make faults` runs
at least 200 trials. Each trial prints its seed, step, fault and outcome; FAULT_REPLAY=<seed>[,<seed>...]
runs those trials again. FAULT_MOP=0 drives every trial from the CLI (no API server)."""

import os

import pytest
import releases
import upgrade_host as uh
from fault_matrix import Matrix, Trial, plan, table

pytestmark = pytest.mark.testhost

# The reduced run of `make test`: 4 trials (about 2 minutes with the host's set-up); seed 24 puts one step of
# each area first (queue claim killed, stage cut by power, a reset step killed under a MachineOperation,
# recovery cut by power under a MachineOperation).
TRIALS = int(os.environ.get("FAULT_TRIALS") or "4")
SEED = int(os.environ.get("FAULT_SEED") or "24")
REPLAY = [int(s) for s in os.environ.get("FAULT_REPLAY", "").split(",") if s.strip()]
WITH_MOP = os.environ.get("FAULT_MOP", "1") != "0"


def say(line: str, log, capsys) -> None:
    log.write(line + "\n")
    log.flush()
    with capsys.disabled():  # as it happens, also when pytest captures output
        print(line, flush=True)


def serve_from_boot(host) -> None:
    """The release server as a unit that starts at boot before the dispatcher: after a power cut the operation
    the dispatcher goes on with finds its server, as it would find a remote one (the test host's own transient
    server comes back only after the boot, too late for a download the dispatcher resumes at once)."""
    exec_start = host.run(["systemctl", "show", "-p", "ExecStart", "--value", "testhost-https.service"]).stdout
    argv = exec_start.split("argv[]=", 1)[1].split(" ;", 1)[0].strip()
    host.write("/etc/systemd/system/faults-https.service",
               # not Before= the path unit: that is ordered before basic.target, and the cycle would make systemd
               # drop this unit's start job in some boots
               "[Unit]\nBefore=unbounded-agent-dispatch.service\n"
               f"[Service]\nType=notify\nNotifyAccess=main\nExecStart={argv}\n"
               "[Install]\nWantedBy=multi-user.target\n")
    host.run(["systemctl", "stop", "testhost-https.service"])
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "enable", "--now", "faults-https.service"])


@pytest.fixture(scope="module")
def matrix(testhost_factory, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("faults")
    with testhost_factory("faults", installed=True) as h:
        uh.prepare(h)
        serve_from_boot(h)
        good = {v: h.serve(releases.real_release(repo_root, v, out / v), f"good-{v}.tar.gz") for v in ("2.0.0", "3.0.0")}
        crash = [h.serve(releases.script_release(out / f"crash-{i}.tar.gz", version=f"8.{i}.0", daemon="crash"),
                         f"crash-{i}.tar.gz") for i in range(4)]
        kube = None
        if WITH_MOP:
            from mop_host import KubeLink

            kube = KubeLink.start(h, out)
            kube.configure_agent(h)
            configure = kube.configure_agent
        else:
            def configure(host):
                host.write(uh.CONFIG, uh.TEST_CONFIG)
                host.run(["systemctl", "daemon-reload"])
                host.run(["systemctl", "restart", uh.DAEMON])
        try:
            yield Matrix(h, kube, good, crash, configure), out
        finally:
            if kube is not None:
                kube.stop()


def test_every_fault_converges(matrix, capsys):
    m, out = matrix
    trials = [Trial.from_seed(s, m.kube is not None) for s in REPLAY] or plan(SEED, TRIALS, m.kube is not None)
    outcomes = []
    with open(out / "faults.log", "w") as log:
        say(f"fault matrix: {len(trials)} trials from seed {SEED}" + (f" (replay {REPLAY})" if REPLAY else ""), log, capsys)
        for i, t in enumerate(trials, 1):
            o = m.run(t)
            outcomes.append(o)
            say(f"[{i}/{len(trials)}] {o.line()}", log, capsys)
        summary = table(outcomes)
        say(summary, log, capsys)
    assert not any(o.problems for o in outcomes), summary
