"""A fault matrix: seeded faults at every step of upgrade, recovery, reset and the queue, on one test host.

    plan(seed, n)            n trials; trial i's seed names its step (seed % len(STEPS)) and, through a
                             random.Random(seed), its fault, variant, delay and driver. Steps cycle, so every
                             step gets its share. One trial again: FAULT_REPLAY=<trial seed>.
    Matrix(host, kube, ...)  runs trials on one booted host, restoring a known state between them
    m.run(trial)             returns a TrialOutcome (what happened, and the problems the checks found)

A fault is a `kill -9` of the step's own process (at its hold point, or after a seeded delay into the step
once the hold is released) or a power cut of the whole host (TestHost.power_cycle(hard=True)). Then nobody
helps: the dispatcher and the resume logic must bring the operation to a terminal result on their own. A
reset whose step was killed ends failed and must be asked again (its checkpoint makes the next run finish
the job): the trial says so in its outcome ("re-asked") and then asks again, as an operator would.

After each trial: the daemon runs the old binary or the committed new one (the version its own invocation
logged); both links resolve to executables whose digests match the record; no temporary file is left in the
bin dir, the state dir or the ops dir; the operation has its result; and a MachineOperation that drove it
shows the phase that agrees with that result.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time

import holds
import upgrade_host as uh
from waiting import wait_until

RESET_DIR = f"{uh.OPS}/reset"
TOOLSET = "/usr/libexec/unbounded-agent/unbounded-agent"
RESET_STEPS = ["stop-machines", "remove-links", "remove-wireguard-keys", "remove-nspawn-config",
               "remove-machine-trees", "remove-routing", "remove-agent", "verify", "stop-daemon", "reload-systemd",
               "finish"]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    area: str  # upgrade, recovery, reset, queue
    op: str  # the operation the trial asks for: "upgrade" (a good release), "crash" (a release whose daemon
    #          crashes: probation fails and recovery rolls back) or "reset"
    unit: str = ""  # the unit whose process pauses at the hold point
    point: str = ""  # the hold point (holdpoint.py); "" for the CLI's submit (killed after a delay)
    hold_dir: str = uh.STATE


DISPATCH = uh.DISPATCH
STEPS = [
    Step("queue-submit", "queue", "upgrade"),
    Step("queue-claim", "queue", "upgrade", DISPATCH, "dispatch-claimed", uh.OPS),
    Step("queue-result", "queue", "upgrade", DISPATCH, "dispatch-before-result", uh.OPS),
    Step("upgrade-stage", "upgrade", "upgrade", "unbounded-upgrade-stage@.service", "stage-before-extract"),
    Step("upgrade-stage-rename", "upgrade", "upgrade", "unbounded-upgrade-stage@.service", "stage-before-rename"),
    Step("upgrade-preflight", "upgrade", "upgrade", "unbounded-upgrade-preflight@.service", "preflight-before-run"),
    Step("upgrade-switch", "upgrade", "upgrade", "unbounded-upgrade-switch@.service", "switch-before-links"),
    Step("upgrade-switch-restart", "upgrade", "upgrade", "unbounded-upgrade-switch@.service", "switch-before-restart"),
    Step("upgrade-probation", "upgrade", "upgrade", "unbounded-upgrade-probation.service", "probation-watching"),
    Step("upgrade-commit", "upgrade", "upgrade", "unbounded-upgrade-probation.service", "probation-before-commit"),
    Step("recovery-links", "recovery", "crash", "unbounded-agent-daemon-recovery.service", "recovery-before-links"),
    Step("recovery-restart", "recovery", "crash", "unbounded-agent-daemon-recovery.service",
         "recovery-before-restart"),
    *[Step(f"reset-{s}", "reset", "reset", f"unbounded-agent-reset-{s}.service", f"reset-{s}", RESET_DIR)
      for s in RESET_STEPS],
    Step("reset-gate", "reset", "reset", DISPATCH, "reset-gate-passed", uh.OPS),
]


@dataclasses.dataclass(frozen=True)
class Trial:
    seed: int
    step: Step
    fault: str  # "kill" or "power"
    variant: str  # "at-hold" or "delay"
    delay: float  # seconds into the step (variant "delay"; for queue-submit, after the CLI started)
    driver: str  # "cli" or "mop"

    @classmethod
    def from_seed(cls, seed: int, kube: bool) -> Trial:
        step = STEPS[seed % len(STEPS)]
        r = random.Random(seed)
        fault = r.choice(["kill", "power"])
        variant = "delay" if step.name == "queue-submit" else r.choice(["at-hold", "delay"])
        delay = round(r.uniform(0.0, 1.0 if step.name == "queue-submit" else 0.5), 3)
        mop_ok = kube and step.op in ("upgrade", "crash", "reset") and step.name != "queue-submit"
        driver = "mop" if mop_ok and r.random() < 0.35 else "cli"
        return cls(seed, step, fault, variant, delay, driver)

    def describe(self) -> str:
        how = f"{self.variant}{f' +{self.delay}s' if self.variant == 'delay' else ''}"
        return f"seed={self.seed} step={self.step.name} fault={self.fault} ({how}) via={self.driver}"


def plan(seed: int, n: int, kube: bool) -> list[Trial]:
    r = random.Random(seed)
    trials: list[Trial] = []
    block: list[int] = []
    for i in range(n):  # drawn one by one: the first trials of a run are the same whatever n is
        if i % len(STEPS) == 0:
            block = list(range(len(STEPS)))
            r.shuffle(block)
        trials.append(Trial.from_seed(r.getrandbits(24) * len(STEPS) + block[i % len(STEPS)], kube))
    return trials


@dataclasses.dataclass
class TrialOutcome:
    trial: Trial
    outcome: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        verdict = "ok" if not self.problems else "FAIL: " + "; ".join(self.problems)
        return f"{self.trial.describe()} outcome={self.outcome} [{self.seconds:.0f}s] {verdict}"


# -- the host side -------------------------------------------------------------------------------------------


def sh(host, script: str, check: bool = False, timeout: float = 120) -> str:
    return host.run(["sh", "-c", script], check=check, timeout=timeout).stdout


def temp_files(host) -> list[str]:
    """Temporaries (fsutil's hidden ".<name>.tmp-*", a stage's leftovers) and half-submitted requests."""
    out = sh(host, f"find {uh.BIN} {uh.STATE} {uh.OPS} -xdev \\( -name '.*tmp*' -o -name '*.tmp' -o -name '.staging*' "
                   f"\\) 2>/dev/null; ls -A {uh.OPS}/spool/incoming 2>/dev/null | sed 's|^|incoming/|'")
    return sorted(out.split())


def results(host) -> set[str]:
    return set(sh(host, f"ls {uh.RESULTS} 2>/dev/null").split())


def claimed(host) -> dict | None:
    text = sh(host, f"cat {uh.REQUESTS}/*.claimed 2>/dev/null")
    return json.loads(text) if text.strip() else None


def daemon_version(host) -> str | None:
    """The version the daemon's current invocation logged at its start ("version X starting ...")."""
    inv = uh.daemon(host)["InvocationID"]
    if not inv:
        return None
    log = sh(host, f"journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID={inv}")
    for line in log.splitlines():
        if line.startswith("version ") and " starting" in line:
            return line.split()[1]
    return None


def settle(host, timeout: float = 300) -> None:
    """No request queued, no operation's unit at work, the record (if any) final and the daemon active."""
    def quiet():
        rec = uh.record(host)
        if rec and rec.get("phase") not in uh.TERMINAL:
            return False
        return not uh.queued(host) and not uh.busy_units(host) and uh.daemon(host)["ActiveState"] == "active"
    wait_until("the host to settle", quiet, timeout)


def agent_present(host) -> bool:
    return host.run(["test", "-L", f"{uh.BIN}/unbounded-agent-current"], check=False).returncode == 0


def clear_holds(host) -> None:
    holds.clear(host)
    sh(host, f"rm -rf {uh.STATE}/test-hold {uh.OPS}/test-hold {RESET_DIR}/test-hold")


class Matrix:
    def __init__(self, host, kube, good: dict[str, str], crash: list[str], configure):
        self.host, self.kube, self.good, self.crash = host, kube, good, crash
        self.configure = configure  # (host) -> None: config (+ the kube credential), daemon restarted
        self.n = 0

    # -- a known state before each trial ---------------------------------------------------------------

    def restore(self) -> None:
        h = self.host
        clear_holds(h)
        # an operation the dispatcher goes on with (after a boot, say) ends first: nothing is re-installed under it
        wait_until("the queue to drain", lambda: not uh.queued(h) and not uh.busy_units(h), timeout=300)
        sh(h, f"rm -f {uh.STATE}/quarantine.json; systemctl reset-failed")
        if not agent_present(h) or not h.path("/etc/unbounded/agent/config.yaml").exists():
            sh(h, "/usr/libexec/unbounded-agent/unbounded-agent-seed-slots", check=True)
            self.configure(h)
            sh(h, f"systemctl enable {uh.DAEMON}", check=True)
        if uh.daemon(h)["ActiveState"] != "active":
            sh(h, f"systemctl start {uh.DAEMON}")
        settle(h)

    # -- one trial ---------------------------------------------------------------------------------------

    def run(self, t: Trial) -> TrialOutcome:
        out = TrialOutcome(t)
        t0 = time.monotonic()
        self.n += 1
        try:
            self.restore()
            self._trial(t, out)
        except Exception as e:  # a trial that could not converge is a failure; the host is brought back
            out.problems.append(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            try:
                self._power()
                self.restore()
            except Exception as e2:
                out.problems.append(f"host not restored: {type(e2).__name__}: {e2}")
        out.seconds = time.monotonic() - t0
        return out

    def _power(self) -> None:
        self.host.power_cycle(hard=True)  # the release server is a unit of the host's that starts at boot
        holds.clear(self.host)  # the manager that had them armed is gone
        if self.kube is not None:
            self.kube.net.plug(self.host)

    def _ask(self, t: Trial, before: dict) -> str | None:
        """Ask for the trial's operation; the MachineOperation's name when one drives it."""
        h, s = self.host, t.step
        if s.op == "reset":
            if t.driver == "mop":
                name = f"fault-{t.seed}"
                self.kube.apply(_mop(name, h.name, "AgentReset"))
                return name
            h.run(["rm", "-f", "/var/tmp/fault-cli.json", "/var/tmp/fault-cli.rc"])
            h.run(["systemd-run", "--unit=fault-cli-reset.service", "--collect", "--quiet", "/bin/sh", "-c",
                   f"{TOOLSET} reset --json > /var/tmp/fault-cli.json; echo $? > /var/tmp/fault-cli.rc"])
            return None
        if s.op == "crash":
            url = self.crash[self.n % len(self.crash)]
        else:
            url = self.good["3.0.0" if before["version"].endswith("2.0.0") else "2.0.0"]
        if t.driver == "mop":
            name = f"fault-{t.seed}"
            self.kube.apply(_mop(name, h.name, "AgentUpgrade", downloadURL=url))
            return name
        r = uh.upgrade(h, url)
        assert r.returncode == 0, r.stderr
        return None

    def _trial(self, t: Trial, out: TrialOutcome) -> None:
        h, s = self.host, t.step
        before = uh.look(h)
        seen = results(h)
        if s.name == "queue-submit":
            rid = self._submit_fault(t, before)
            mop_name = None
        else:
            uh.hold(h, s.unit, s.point)
            try:
                mop_name = self._ask(t, before)
                marker = h.path(f"{s.hold_dir}/test-hold/{s.point}")
                wait_until(f"a step to reach {s.point}", marker.exists, timeout=180)
                pid = int(marker.read_text())
                req = claimed(h)
                assert req, "no claimed request while a step of it is held"
                rid = req["id"]
            finally:
                uh.unhold(h, s.unit)
            self._fault(t, pid, marker)
        res = self._converge(rid, seen)
        if res is None:  # the CLI was killed before its request was in the queue: nothing else may have changed
            out.outcome = "not-queued"
            self._check_agent(out, before, None, t)
            return
        rid = res["id"]
        out.outcome = res["reason"] if res["succeeded"] or s.op != "reset" else f"failed@{res.get('step')}"
        if not res["succeeded"]:
            out.outcome += f" ({res.get('message', '')[:160]})"
        if mop_name:
            self._check_mop(out, mop_name, res)
        if s.op == "reset":
            self._check_reset(out, res)
        else:
            self._check_agent(out, before, uh.record(h), t, res)
        leftovers = temp_files(h)
        if leftovers:
            out.problems.append(f"temporary files left: {leftovers}")

    def _submit_fault(self, t: Trial, before: dict) -> str | None:
        h = self.host
        url = self.good["3.0.0" if before["version"].endswith("2.0.0") else "2.0.0"]
        sh(h, "systemd-run --unit=fault-cli.service --collect --quiet unbounded-agent upgrade " + url, check=True)
        time.sleep(t.delay)
        if t.fault == "kill":
            sh(h, "systemctl kill --signal=SIGKILL fault-cli.service")
        else:
            self._power()
        return None

    def _fault(self, t: Trial, pid: int, marker) -> None:
        h = self.host
        if t.variant == "delay":
            marker.unlink(missing_ok=True)  # the step goes on; the fault comes some way into it
            time.sleep(t.delay)
        if t.fault == "kill":
            sh(h, f"kill -9 {pid} 2>/dev/null")  # gone already when the step ended before the delay did
            marker.unlink(missing_ok=True)
        else:
            self._power()

    def _converge(self, rid: str | None, seen: set[str]) -> dict | None:
        """Wait (without help) for the operation's result and a quiet host; the result, or None when no
        request of the trial ever reached the queue."""
        h = self.host
        if rid is not None:
            res = wait_until(f"the result of {rid}", lambda: uh.result(h, rid), timeout=300)
            wait_until("the queue to empty and the units to rest", lambda: not uh.queued(h) and not uh.busy_units(h),
                       timeout=300)
            if agent_present(h):
                settle(h)
            return res
        settle(h)
        if rid is None:
            new = sorted(results(h) - seen)
            if not new:
                return None
            rid = new[-1].removesuffix(".json")
        return wait_until(f"the result of {rid}", lambda: uh.result(h, rid), timeout=300)

    # -- checks -----------------------------------------------------------------------------------------

    def _check_agent(self, out: TrialOutcome, before: dict, rec: dict | None, t: Trial, res: dict | None = None):
        h = self.host
        after = uh.look(h)
        p = out.problems
        if after["daemon_state"] != "active":
            p.append(f"daemon {after['daemon_state']}")
        for link in ("current", "last_good"):
            name = f"{uh.BIN}/unbounded-agent-{link.replace('_', '-')}"
            if not after[f"{link}_sha"] or h.run(["test", "-x", name], check=False).returncode:
                p.append(f"{link} does not resolve to an executable ({after[link]})")
        if res is None or rec is None or rec.get("id") != res["id"]:
            if after["current_sha"] != before["current_sha"] or after["last_good_sha"] != before["last_good_sha"]:
                p.append("the links moved without an operation")
            expect_version = before["version"].split()[-1]
        elif rec["phase"] == "committed":
            if not res["succeeded"]:
                p.append(f"record committed, result {res['reason']}")
            if after["current_sha"] != rec["to"]["digest"]:
                p.append("current is not the committed binary")
            if after["last_good_sha"] != rec["from"]["digest"]:
                p.append("last-good is not the binary the upgrade replaced")
            expect_version = rec["to"]["version"]
        else:
            if res["succeeded"]:
                p.append(f"record {rec['phase']}, result succeeded")
            if after["current_sha"] != before["current_sha"] or after["current_sha"] != (rec.get("from") or {}).get(
                    "digest", before["current_sha"]):
                p.append(f"current is not the old binary after {rec['phase']}")
            # last-good keeps what it selected, or selects the old binary too (the stage overwrites the slot
            # that is not current; a rollback leaves both links on the old binary)
            if after["last_good_sha"] not in (before["last_good_sha"], before["current_sha"]):
                p.append("last-good selects neither the binary it did nor the old one")
            expect_version = before["version"].split()[-1]
        if rec is not None and rec.get("phase") not in uh.TERMINAL:
            p.append(f"record left in {rec.get('phase')}")
        running = daemon_version(h)
        if running != expect_version:
            p.append(f"the daemon runs version {running}, not {expect_version}")

    def _check_reset(self, out: TrialOutcome, res: dict) -> None:
        h = self.host
        if not res["succeeded"]:
            # a reset that a kill failed keeps its checkpoint; asked again, it must finish the job
            out.outcome += " re-asked"
            r = h.run([TOOLSET, "reset", "--json"], check=False, timeout=600)
            if r.returncode != 0:
                out.problems.append(f"the reset asked again failed: {r.stdout[-300:]}{r.stderr[-300:]}")
                return
        if agent_present(h) or h.path(uh.STATE).exists():
            out.problems.append("the agent is still there after the reset")
        if h.path(f"{RESET_DIR}/checkpoint.json").exists():
            out.problems.append("the reset's checkpoint is left")
        if sh(h, f"systemctl is-active {uh.DAEMON}").strip() == "active":
            out.problems.append("the daemon runs after the reset")
        if sh(h, "systemctl is-active unbounded-agent-reset-reporter.service").strip() == "active":
            out.problems.append("the reset's reporter runs after the reset")
        if h.path(f"{RESET_DIR}/reporter").exists():
            out.problems.append("the copy of the config and credentials kept for the report is left")

    def _check_mop(self, out: TrialOutcome, name: str, res: dict) -> None:
        want = "Complete" if res["succeeded"] else "Failed"
        if res["kind"] == "reset" and not res["succeeded"] and self._gate_passed(res):
            want = "Complete"  # the watcher reported at the gate; the daemon that could say more is gone
        try:
            got = wait_until(f"{name} to finish", lambda: ((self.kube.get(name) or {}).get("status") or {}).get(
                "phase") in ("Complete", "Failed") and self.kube.get(name)["status"]["phase"], timeout=120)
        except Exception:
            got = ((self.kube.get(name) or {}).get("status") or {}).get("phase")
        if got != want:
            out.problems.append(f"MachineOperation {name} is {got}, the result says {res['reason']}")

    def _gate_passed(self, res: dict) -> bool:
        return res.get("step") in ("stop-daemon", "reload-systemd", "finish")


def _mop(name: str, machine: str, kind: str, **params) -> dict:
    from mop_host import mop

    return mop(name, machine, kind, **params)


def table(outcomes: list[TrialOutcome]) -> str:
    """Trials, failures and re-asked operations (a reset whose killed step failed it) per step."""
    rows = {s.name: [0, 0, 0] for s in STEPS}
    for o in outcomes:
        row = rows[o.trial.step.name]
        row[0] += 1
        row[1] += bool(o.problems)
        row[2] += "re-asked" in o.outcome
    lines = [f"{'step':<28} {'trials':>6} {'failures':>8} {'re-asked':>8}"]
    lines += [f"{k:<28} {v[0]:>6} {v[1]:>8} {v[2]:>8}" for k, v in rows.items() if v[0]]
    total = [sum(v[i] for v in rows.values()) for i in range(3)]
    lines.append(f"{'total':<28} {total[0]:>6} {total[1]:>8} {total[2]:>8}")
    failed = [o.trial.seed for o in outcomes if o.problems]
    if failed:
        lines.append("failed trial seeds (FAULT_REPLAY=...): " + ",".join(map(str, failed)))
    return "\n".join(lines)
