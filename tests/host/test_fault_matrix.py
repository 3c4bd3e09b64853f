"""The fault matrix (tests/support/fault_matrix.py): seeded kill -9s and power cuts at every step of upgrade,
recovery, reset and the queue, each trial run to convergence without help and checked.

`make test` runs a reduced matrix (FAULT_TRIALS, default 12, from FAULT_SEED, default 1); `make faults` runs
at least 200 trials. Each trial prints its seed, step, fault and outcome; FAULT_REPLAY=<seed>[,<seed>...]
runs those trials again. FAULT_MOP=0 drives every trial from the CLI (no API server)."""

import os

import pytest
import releases
import upgrade_host as uh
from fault_matrix import Matrix, Trial, plan, table

pytestmark = pytest.mark.testhost

TRIALS = int(os.environ.get("FAULT_TRIALS", "12"))
SEED = int(os.environ.get("FAULT_SEED", "1"))
REPLAY = [int(s) for s in os.environ.get("FAULT_REPLAY", "").split(",") if s.strip()]
WITH_MOP = os.environ.get("FAULT_MOP", "1") != "0"


def say(line: str, log, capsys) -> None:
    log.write(line + "\n")
    log.flush()
    with capsys.disabled():  # as it happens, also when pytest captures output
        print(line, flush=True)


@pytest.fixture(scope="module")
def matrix(testhost_factory, deb_path, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("faults")
    with testhost_factory("faults") as h:
        uh.prepare(h, deb_path)
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
