"""unbounded-agent-fleet-controller: fan a MachineOperation with ``machineSelector`` out to one child per
matched Machine, in waves, halting on failure (rollout.py says how).

It runs wherever a kubeconfig (or an in-cluster service account) lets it: on a management host
(unbounded-agent-fleet-controller.service, disabled until enabled) or as a Deployment
(packaging/kubernetes/fleet-controller-deployment.yaml). Any number may run: they elect a leader on a Lease
(lease.py), and only the leader writes. It keeps no state of its own: everything it decides from is on the
server (the parent, its children, the Machines), so a new leader carries on where the last one stopped.

Deleting a parent stops its rollout: its finalizer holds it while the controller withdraws the children not
yet started (an agent never starts an operation it cannot read) and the running ones finish; then the parent
goes, and the API server's garbage collector removes the children with it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from .. import holdpoint, log, program
from ..kube import client as kubeclient
from ..kube import mop
from ..kube.client import KubeError
from ..reasons import OpsError, Reason
from ..version import VERSION
from . import children, rollout, selector
from .informer import Informer
from .lease import Elector
from .settings import Settings
from .writer import COMPONENT, NotLeader, Writer

NAME = "unbounded-agent-fleet-controller"
DEBOUNCE = 0.1  # seconds: changes that come together are decided together
HOLD_AFTER_CREATE = "fleet-after-create"  # tests: a wave's children exist, nothing else is written yet


class Controller:
    def __init__(self, settings: Settings, client_factory=None, clock=time.monotonic):
        self.settings = settings
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.client = kubeclient.Client(client_factory or (lambda: kubeclient.build(settings.kubeconfig)),
                                        self._built)
        self.elector = Elector(self.kube, settings.lease_namespace, settings.lease_name, settings.identity,
                               settings.lease_duration_seconds, settings.renew_deadline_seconds,
                               settings.retry_period_seconds, clock=clock, on_change=lambda _: self.wake.set())
        self.mops = Informer(self.kube, kubeclient.MOP_PATH, "MachineOperations", self.stop_event, self.wake.set)
        self.machines = Informer(self.kube, kubeclient.MACHINE_PATH, "Machines", self.stop_event, self.wake.set)
        self.writer = Writer(self.kube, self.elector.held, settings.identity)
        # only used by tests' hold points (holdpoint.py); nothing is written here otherwise
        self.hold_dir = os.environ.get("RUNTIME_DIRECTORY") or "/tmp"
        self.passes = 0
        self._said: dict[str, str] = {}  # parent uid -> the last error said about it

    def kube(self) -> kubeclient.Kube:
        return self.client()

    def _built(self, kube: kubeclient.Kube, why: str) -> None:
        from ..urls import redact

        kube.api.user_agent = f"{COMPONENT}/{VERSION} ({self.settings.identity})"
        if why == "first use":
            log.info(f"talking to the API server at {redact(kube.server)} as {self.settings.identity}")
        else:
            log.info(f"{why}: loaded the credentials again")

    # -- running ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or self.stop_event
        log.info(f"version {VERSION} starting as {self.settings.identity}; lease {self.settings.lease_namespace}/"
                 f"{self.settings.lease_name} ({self.settings.source})")
        self.mops.start()
        self.machines.start()
        elector = threading.Thread(target=self.elector.run, args=(self.stop_event,), name="lease", daemon=True)
        elector.start()
        try:
            while not stop.is_set() and not self.stop_event.is_set():
                self.wake.wait(self.settings.retry_period_seconds)
                self.wake.clear()
                if not (self.elector.held() and self.mops.synced and self.machines.synced):
                    continue
                stop.wait(DEBOUNCE)
                try:
                    self.reconcile()
                except NotLeader:
                    pass
        finally:
            self.stop_event.set()
            elector.join(30)
            self.elector.release()  # after the last write: a standby may take over at once

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    # -- deciding ------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """One pass over every parent, from the caches."""
        self.passes += 1
        ops = self.mops.snapshot()
        labels = {name: (m.get("metadata") or {}).get("labels") or {} for name, m in self.machines.snapshot().items()}
        kids: dict[str, dict[str, dict]] = {}
        for op in ops.values():
            owner = children.owner_uid(op)
            if owner and mop.machine(op):
                kids.setdefault(owner, {})[mop.machine(op)] = op
        for parent in sorted((op for op in ops.values() if mop.has_selector(op) and not mop.machine(op)),
                             key=mop.name):
            try:
                self.reconcile_parent(parent, kids.get(mop.uid(parent), {}), labels)
                self._said.pop(mop.uid(parent), None)
            except NotLeader:
                raise
            except (KubeError, OpsError) as e:
                self._say(parent, f"{mop.name(parent)}: {e}; tried again on the next pass")
            except Exception:
                import traceback

                self._say(parent, f"{mop.name(parent)}: {traceback.format_exc().rstrip()}")

    def _say(self, parent: dict, text: str) -> None:
        if self._said.get(mop.uid(parent)) != text:
            log.warn(text)
            self._said[mop.uid(parent)] = text

    def reconcile_parent(self, parent: dict, kids: dict[str, dict], labels: dict[str, dict]) -> None:
        if mop.kind(parent) in mop.HOST_KINDS:
            return  # another controller's (power, replace): never touched
        if children.deleting(parent):
            return self.cancel(parent, kids, labels)
        try:
            w, params = rollout.check(parent)
        except OpsError as e:
            if not mop.is_terminal(parent):
                return self.fail(parent, e)
            w, params = rollout.Waves(), {}
        matched = self.matched(parent, labels)
        gone = self.confirm_gone(parent, kids)
        v = rollout.view(parent, matched, kids, gone)
        d = rollout.decide(parent, v, w)
        withdrawn = self.withdraw(d.withdraw, kids)
        if withdrawn:
            v = rollout.view(parent, matched, kids, gone, withdrawn=withdrawn)
            d = rollout.decide(parent, v, w)
        if d.create:
            held = self.hold(parent)
            if held is None:
                return
            parent = held
            taken = self.create_wave(parent, d, params, kids)
            if d.event and len(taken) < len(d.create):
                self.writer.event(parent, *d.event)
            holdpoint.hold(self.hold_dir, HOLD_AFTER_CREATE)
            v = rollout.view(parent, matched, kids, gone, taken, withdrawn)
            d = rollout.decide(parent, v, w)
        parent = self.publish(parent, d, v)
        if mop.is_terminal(parent):
            if not v.in_flight:
                self.let_go(parent)
            self.expire(parent)

    @staticmethod
    def matched(parent: dict, labels: dict[str, dict]) -> list[str]:
        """The Machines the parent's selector matches now, in name order (none for a selector that is not one)."""
        sel = (parent.get("spec") or {}).get("machineSelector") or {}
        try:
            selector.check(sel)
        except OpsError:
            return []
        return sorted(name for name, lab in labels.items() if selector.matches(sel, lab))

    def confirm_gone(self, parent: dict, kids: dict[str, dict]) -> set[str]:
        """Recorded machines whose child the cache lacks: read each; those the server lacks too are gone (the
        others were only late in the cache)."""
        gone = set()
        for t in rollout.recorded(parent).values():
            if t.terminal or t.machine in kids:
                continue
            found = self.writer.get(children.child_name(mop.name(parent), t.machine))
            if found is not None and children.owner_uid(found) == mop.uid(parent):
                kids[t.machine] = found
                self.mops.put(found)
            else:
                gone.add(t.machine)
        return gone

    def withdraw(self, machines: list[str], kids: dict[str, dict]) -> set[str]:
        """Delete the children of machines that the agents have not started; the machines whose child went."""
        went = set()
        for machine in machines:
            child = kids.get(machine)
            if child is None or children.started(child):
                continue
            if self.writer.withdraw(child):
                log.info(f"withdrew {mop.name(child)}: never started")
                self.mops.forget(mop.name(child), mop.uid(child))
                del kids[machine]
                went.add(machine)
        return went

    def hold(self, parent: dict) -> dict | None:
        """The parent with the controller's finalizer, which it gets before its first child."""
        finalizers = parent["metadata"].get("finalizers") or []
        if children.FINALIZER in finalizers:
            return parent
        patched = self.writer.finalizers(parent, [*finalizers, children.FINALIZER])
        if patched is not None:
            self.mops.put(patched)
        return patched

    def let_go(self, parent: dict) -> None:
        """Drop the finalizer once nothing of the rollout is left in flight."""
        finalizers = parent["metadata"].get("finalizers") or []
        if children.FINALIZER in finalizers:
            patched = self.writer.finalizers(parent, [f for f in finalizers if f != children.FINALIZER])
            if patched is not None and not children.deleting(patched):
                self.mops.put(patched)

    def create_wave(self, parent: dict, d: rollout.Decision, params: dict, kids: dict[str, dict]
                    ) -> dict[str, tuple[int, str]]:
        """Create the children of the next wave; returns the machines whose child's name is taken."""
        taken = {}
        for machine in d.create:
            body = children.manifest(parent, machine, d.wave, params)
            child, created = self.writer.create(body)
            if child is None:
                taken[machine] = (d.wave, f"the name {body['metadata']['name']} belongs to another "
                                          "MachineOperation: no child was created")
                continue
            kids[machine] = child
            self.mops.put(child)
        log.info(f"{mop.name(parent)}: {d.message}")
        return taken

    def publish(self, parent: dict, d: rollout.Decision, v: rollout.View) -> dict:
        """Write the status of decision d if it says something new; the parent as the server has it now. The
        Event of a decision that ends the rollout goes with the write that says so."""
        new = rollout.status(parent, d, v)
        if rollout.same_status(parent.get("status") or {}, new):
            return parent
        written = self.writer.status(parent, new)
        if written is None:
            return parent
        self.mops.put(written)
        before = (mop.phase(parent), (parent.get("status") or {}).get("reason"))
        if d.event and d.phase in mop.TERMINAL and before != (d.phase, d.reason):
            (log.info if d.phase == mop.COMPLETE else log.warn)(f"{mop.name(parent)}: {d.phase} ({d.reason}): "
                                                                f"{d.message}")
            self.writer.event(written, *d.event)
        return written

    def fail(self, parent: dict, e: OpsError) -> None:
        v = rollout.View({}, [])
        d = rollout.Decision(mop.FAILED, e.reason.value, e.message, event=(e.reason.value, e.message, True))
        self.publish(parent, d, v)

    def cancel(self, parent: dict, kids: dict[str, dict], labels: dict[str, dict]) -> None:
        """The parent is being deleted: withdraw what has not started, wait for what runs, then let it go."""
        if children.FINALIZER not in (parent["metadata"].get("finalizers") or []):
            return
        matched = self.matched(parent, labels)
        gone = self.confirm_gone(parent, kids)
        v = rollout.view(parent, matched, kids, gone)
        d = rollout.decide_deleted(parent, v)
        withdrawn = self.withdraw(d.withdraw, kids)
        if withdrawn:
            v = rollout.view(parent, matched, kids, gone, withdrawn=withdrawn)
            d = rollout.decide_deleted(parent, v)
        if v.in_flight:
            self.publish(parent, d, v)
        else:
            log.info(f"{mop.name(parent)} deleted: nothing of its rollout runs any more; letting it go")
            self.let_go(parent)

    def expire(self, parent: dict) -> None:
        """ttlSecondsAfterFinished on a parent: deleted (with its children) that long after it finished."""
        deadline = mop.ttl_deadline(parent)
        if deadline is not None and deadline <= time.time():
            log.info(f"deleting {mop.name(parent)}: ttlSecondsAfterFinished passed")
            self.writer.delete(parent)


# -- the program ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from . import settings as settings_module

    ap = program.parser(NAME, __doc__)
    ap.add_argument("--config", help=f"settings file (default {settings_module.DEFAULT_CONFIG_PATH})")
    ap.add_argument("--kubeconfig", help="kubeconfig file (default: the config's, else in-cluster)")
    ap.add_argument("--lease-namespace", help="namespace of the leader-election Lease")
    ap.add_argument("--identity", help="this instance's name in the Lease (default: host name and a random suffix)")
    args = ap.parse_args(argv)
    log.set_prefix(NAME)
    try:
        s = settings_module.load(args.config, {"kubeconfig": args.kubeconfig, "leaseNamespace": args.lease_namespace,
                                               "identity": args.identity})
        if not kubeclient.configured(s.kubeconfig):
            raise OpsError(Reason.INVALID_CONFIG, "no kubeconfig configured (kubeconfig in the settings or "
                                                  "--kubeconfig) and no in-cluster service account")
    except OpsError as e:
        log.error(str(e))
        return e.reason.exit_code
    c = Controller(s)

    def on_signal(signum, _frame):
        log.info(f"received {signal.Signals(signum).name}, stopping")
        c.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    c.run()
    log.info("stopped")
    return 0
