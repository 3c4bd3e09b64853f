"""Fast-test helpers for the MachineOperation watcher (lib/unbounded_agent/kube): a fake dispatcher over a
real spool, and a harness that runs a Watcher in a thread against the real test API server
(kube_apiserver.py).

Nothing inside the watcher is replaced. The watcher submits real request files to a real Spool in the
test's directory; the fake dispatcher is only the other side of that spool, driven by the test: it
lists what was submitted, and the test decides what the host answers — a Result, an open reset gate,
an upgrade record in some phase — with the same spool and record code the real dispatcher uses.

    with Harness(tmp_path) as h:                 # server + watcher for machine worker-01
        h.start()
        h.create("up-1", "AgentUpgrade", downloadURL="https://x/a.tar.gz")
        req = h.dispatcher.wait_request(h.operation("up-1"))
        h.dispatcher.succeed(req, "upgraded from 1.0.0 to 2.0.0")
        h.wait_phase("up-1", "Complete")
"""

from __future__ import annotations

import threading
from pathlib import Path

from kube_apiserver import ApiError as ServerError
from kube_apiserver import start_apiserver
from waiting import wait_until

from unbounded_agent import config, records
from unbounded_agent.kube import client as kubeclient
from unbounded_agent.kube import mop, watcher
from unbounded_agent.kube.progress import OperationProgress, ProgressStore
from unbounded_agent.queue import dispatch
from unbounded_agent.queue.spool import Gate, Request, Result, Spool, new_id
from unbounded_agent.reasons import Reason
from unbounded_agent.reset import api as reset_api
from unbounded_agent.upgrade.record import Store, UpgradeRecord
from unbounded_agent.urls import redact

REPO = Path(__file__).resolve().parents[2]
MACHINE = "worker-01"
AGENT = f"unbounded-agent:{MACHINE}"  # the agent's user on the test server (packaging/kubernetes/admission-policy.yaml)
AGENT_GROUP = "unbounded-agent-daemons"
ADMIN_AGENT = "watcher-tests-admin"  # the admin client's User-Agent, so hooks can tell its requests apart
WAIT = 30.0  # a bound on waits only; nothing asserts how long anything took
GATE_MESSAGE = dispatch.GATE_MESSAGE.format(what=reset_api.COMPLETE)  # what the real dispatcher's gate says
GATE_STEPS = [{"step": "stop-machines", "number": 1, "result": "succeeded", "removed": 2},
              {"step": "remove-links", "number": 2, "result": "succeeded", "removed": 3}]


def wait_for(what: str, fn, timeout: float = WAIT, poll: float = 0.02):
    return wait_until(what, fn, timeout, poll)


def crd_without_rules(directory: Path) -> Path:
    """Our CRD as upstream's is: no x-kubernetes-validations, no defaults (the API server takes any operation)."""
    import yaml

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("x-kubernetes-validations", "default")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    crd = yaml.safe_load((REPO / "packaging" / "kubernetes" / "crd-machineoperations.yaml").read_text())
    path = Path(directory) / "crd-without-rules.yaml"
    path.write_text(yaml.safe_dump(strip(crd), sort_keys=False))
    return path


class FakeDispatcher:
    """The dispatcher's side of the spool, moved by the test: nothing here runs on its own."""

    def __init__(self, spool: Spool, cfg: config.Config):
        self.spool = spool.ensure()
        self.cfg = cfg

    # -- what was submitted ------------------------------------------------------------------------

    def queued(self) -> list[Request]:
        """Requests waiting or running, the running one first (as Spool.queue)."""
        return [r for _, r in self.spool.queue()]

    def results(self) -> list[Result]:
        return [r for p in sorted(self.spool.results.glob("*.json")) if (r := self.spool.result(p.stem))]

    def request_files(self) -> list[Path]:
        return sorted(self.spool.requests.iterdir())

    def submitted(self, operation: str | None = None) -> list[str]:
        """The ids of every request ever submitted (for operation), queued, running or answered, in the
        order of submission. A request file is removed only after its result is written: none is missed."""
        seen = {r.id: r.submitted_at for r in self.queued() if operation in (None, r.operation)}
        for r in self.results():
            if operation in (None, r.operation):
                seen.setdefault(r.id, r.submitted_at)
        return sorted(seen, key=lambda i: seen[i])

    def wait_request(self, operation: str) -> Request:
        """The request submitted for operation (a MachineOperation's name@uid prefix), once it is queued."""
        return wait_for(f"a request for {operation}",
                        lambda: next((r for r in self.queued() if r.operation == operation), None))

    def path(self, req: Request) -> Path | None:
        return next((p for p in self.request_files() if p.name.endswith((f"-{req.id}.request", f"-{req.id}.claimed"))),
                    None)

    def claim(self, req: Request) -> Path:
        """Take req as the dispatcher does: rename it to .claimed."""
        path = self.path(req)
        assert path is not None and path.suffix == ".request", f"{req.id} is not waiting: {self.request_files()}"
        claimed = path.with_suffix(".claimed")
        path.rename(claimed)
        return claimed

    def submit(self, kind: str, source: str = "cli", **fields) -> Request:
        """A request from someone else (the CLI, systemctl) in the same queue."""
        return self.spool.submit(Request(id=new_id(kind), kind=kind, source=source, **fields))

    # -- what the host answers ---------------------------------------------------------------------

    def finish(self, req: Request, succeeded: bool, reason: str, message: str, **fields) -> Result:
        result = Result(id=req.id, kind=req.kind, operation=req.name, source=req.source, succeeded=succeeded,
                        reason=reason, message=message, submitted_at=req.submitted_at, finished_at=records.now(),
                        **fields)
        self.spool.finish(self.path(req), result)
        return result

    def succeed(self, req: Request, message: str = "done", **fields) -> Result:
        return self.finish(req, True, Reason.SUCCEEDED.value, message, **fields)

    def fail(self, req: Request, reason: Reason, message: str, **fields) -> Result:
        return self.finish(req, False, reason.value, message, **fields)

    def supersede(self, reset: Request) -> list[Request]:
        """What the dispatcher does to the requests queued behind a reset about to remove the agent."""
        return dispatch.supersede(self.spool, reset)

    def open_gate(self, req: Request, steps=GATE_STEPS, message: str = GATE_MESSAGE) -> Gate:
        """Phase 1 of the reset req succeeded (the agent's files are gone): it waits for its requester's report
        before it stops the daemon."""
        gate = Gate(id=req.id, message=message, steps=[dict(s) for s in steps])
        self.spool.open_gate(gate)
        return gate

    def acked(self, req: Request) -> bool:
        return self.spool.acked(req.id)

    def record(self, req: Request, phase: str, **changes) -> UpgradeRecord:
        """The upgrade record of req, moved to phase, as the upgrade chain writes it."""
        store = Store(self.cfg)
        rec = store.read()
        if rec is None or rec.id != req.id:
            rec = UpgradeRecord(id=req.id, operation=req.name, kind=req.kind, url=redact(req.url),
                                requested_at=records.now())
        return store.advance(rec, phase, **changes)


class Hook:
    """An interception of some of the agent's requests on the test server (Harness.before_agent)."""

    def __init__(self, server, method: str, path: str, action, answer: int | None, times: int | None):
        self.server, self.orig = server, server.handle
        self.method, self.path, self.action, self.answer, self.times = method, path, action, answer, times
        self.caught: list[str] = []  # the requests it caught (their paths with queries)
        self.lock = threading.Lock()

    def handle(self, hd) -> None:
        agent = hd.headers.get("User-Agent", "").startswith("unbounded-agent/")
        if agent and hd.command == self.method and hd.path.split("?")[0] == self.path:
            with self.lock:
                mine = self.times is None or len(self.caught) < self.times
                if mine:
                    self.caught.append(hd.path)
            if mine:
                if self.action:
                    self.action()
                if self.answer:
                    hd.read_body()
                    reason = {503: "ServiceUnavailable", 422: "Invalid", 403: "Forbidden"}.get(self.answer,
                                                                                             "InternalError")
                    hd.send_json(self.answer, ServerError(self.answer, reason, "injected by the test").status())
                    return
        self.orig(hd)

    def remove(self) -> None:
        self.server.handle = self.orig


class Harness:
    """A test API server, an admin client to it, a spool with its fake dispatcher, and watchers for MACHINE
    on one state dir (a restart is stop() then start(): only the files survive)."""

    def __init__(self, tmp: Path, version: str = "1.32.4", client_cert: bool = False, policy: bool = False,
                 **server_kw):
        """client_cert: the agent authenticates with a client certificate (a TLS server); policy: the per-machine
        admission policy (packaging/kubernetes/admission-policy.yaml) is installed."""
        self.tmp = Path(tmp)
        self.server = start_apiserver(version=version, tls=client_cert or server_kw.pop("tls", False), **server_kw)
        self.admin = kubeclient.build(self.server.kubeconfig(self.tmp / "admin.kubeconfig"))
        self.admin.api.user_agent = ADMIN_AGENT
        # The agent's own credential: the RBAC of packaging/kubernetes/rbac.yaml, nothing more.
        self.apply_rbac()
        if policy:
            self.apply_manifest("admission-policy.yaml")
        credential = None
        self.agent_cert: tuple[str, str, str] | None = None
        if client_cert:
            crt, key, serial = self.agent_cert = self.server.issue_client_cert(self.tmp, AGENT, [AGENT_GROUP])
            credential = {"client-certificate": crt, "client-key": key}
        agent_kc = self.server.kubeconfig(self.tmp / "agent.kubeconfig", user=AGENT, groups=(AGENT_GROUP,),
                                          credential=credential)
        self.cfg = config.Config(machine_name=MACHINE, kubeconfig=agent_kc, bin_dir=self.tmp / "bin",
                                 state_dir=self.tmp / "state", ready_timeout_seconds=60, ready_without_api_seconds=30)
        self.spool = Spool(self.tmp / "ops")
        self.dispatcher = FakeDispatcher(self.spool, self.cfg)
        self.watcher: watcher.Watcher | None = None
        self.thread: threading.Thread | None = None
        self.notified: list[dict] = []

    def apply_rbac(self) -> None:
        self.apply_manifest("rbac.yaml")

    def apply_manifest(self, name: str) -> None:
        """Create what packaging/kubernetes/<name> holds, as `kubectl apply -f` would."""
        import yaml

        for doc in yaml.safe_load_all((REPO / "packaging" / "kubernetes" / name).read_text()):
            group, _, version = doc["apiVersion"].rpartition("/")
            plural = doc["kind"].lower() + ("es" if doc["kind"].endswith("y") is False and
                                            doc["kind"].endswith("s") else "s")
            plural = {"validatingadmissionpolicys": "validatingadmissionpolicies"}.get(plural, plural)
            self.admin.request("POST", f"/apis/{group}/{version}/{plural}", body=doc, content_type="application/json")

    # -- the watcher -------------------------------------------------------------------------------

    def start(self, **kw) -> watcher.Watcher:
        assert self.watcher is None, "one watcher at a time: stop() the running one first"
        w = watcher.Watcher(self.cfg, spool=self.spool, notify=lambda **f: self.notified.append(f), tick=0.05, **kw)
        self.watcher = w
        self.thread = threading.Thread(target=w.run, daemon=True)
        self.thread.start()
        return w

    def stop(self) -> None:
        """Stop the watcher as SIGTERM would."""
        if self.watcher:
            self.watcher.stop()
            self.thread.join(10)
            assert not self.thread.is_alive()
            self.watcher = None

    def restart(self) -> watcher.Watcher:
        self.stop()
        return self.start()

    def settle(self, passes: int = 2) -> None:
        """Wait until the main loop has begun `passes` more rounds: with 2, at least one whole reconcile
        pass ran after the call (each round sets the heartbeat, then drains the queue and reconciles)."""
        w, seen = self.watcher, []

        def moved():
            if w.heartbeat != (seen[-1] if seen else start):
                seen.append(w.heartbeat)
            return len(seen) >= passes

        start = w.heartbeat
        wait_for(f"{passes} rounds of the main loop", moved)

    def synced(self) -> None:
        wait_for("the first list", lambda: self.watcher.synced)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.server.stop()

    # -- the server --------------------------------------------------------------------------------

    def agent_requests(self, **kw) -> list:
        return self.server.find_requests(user=AGENT, **kw)

    def partition_agent(self, cut: bool = True) -> None:
        """The agent loses the API server (its connections dropped unanswered) while the admin still reaches it."""
        self.server.partition((lambda headers: headers.get("User-Agent", "").startswith("unbounded-agent/"))
                              if cut else None)

    def before_agent(self, method: str, path: str, action=None, answer: int | None = None,
                     times: int | None = 1) -> Hook:
        """The agent's next `times` requests (None: all, until the hook is removed) with this method on this
        path run action() first — another writer acting between the agent's decision and its request —
        and, with answer, get that error status instead of reaching the server."""
        hook = Hook(self.server, method, path, action, answer, times)
        self.server.handle = hook.handle
        return hook

    # -- operations --------------------------------------------------------------------------------

    def create(self, name: str, kind: str, machine: str | None = MACHINE, ttl: int | None = None,
               selector: dict | None = None, **params) -> dict:
        spec = {"machineRef": machine, "operationKind": kind} if machine else {"operationKind": kind}
        if selector is not None:
            spec["machineSelector"] = selector
        if params:
            spec["parameters"] = params
        if ttl is not None:
            spec["ttlSecondsAfterFinished"] = ttl
        body = {"apiVersion": "unbounded-cloud.io/v1alpha3", "kind": "MachineOperation",
                "metadata": {"name": name}, "spec": spec}
        return self.admin.request("POST", kubeclient.MOP_PATH, body=body, content_type="application/json")

    def get(self, name: str) -> dict | None:
        try:
            return self.admin.get(f"{kubeclient.MOP_PATH}/{name}")
        except kubeclient.ApiError as e:
            if e.code == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        self.admin.request("DELETE", f"{kubeclient.MOP_PATH}/{name}")

    def set_status(self, name: str, phase: str, reason: str, message: str) -> dict:
        """Write a status as someone else would (the admin, through the status subresource)."""
        op = self.get(name)
        op["status"] = mop.apply_status(op, mop.desired(phase, reason, message))
        return self.admin.request("PUT", f"{kubeclient.MOP_PATH}/{name}/status", body=op,
                                  content_type="application/json")

    def phase(self, name: str) -> str:
        op = self.get(name)
        return mop.phase(op) if op else "<deleted>"

    def wait_phase(self, name: str, phase: str) -> dict:
        wait_for(f"{name} to be {phase}", lambda: self.phase(name) == phase)
        return self.get(name)

    def operation(self, name: str) -> str:
        """What the watcher calls name on the host (request.operation): <name>@<uid prefix>."""
        return f"{name}@{mop.uid(self.get(name))[:8]}"

    def condition(self, name: str) -> dict:
        return next(c for c in self.get(name)["status"]["conditions"] if c["type"] == "Completed")

    def events(self, name: str) -> list[dict]:
        evs = self.admin.get("/api/v1/namespaces/default/events", {"fieldSelector": f"involvedObject.name={name}"})["items"]
        return sorted(evs, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))

    def event_reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]

    def phases_written(self, name: str) -> list[str]:
        """Every phase the object went through, in order, from the server's own change history."""
        with self.server.lock:
            history = [e for e in self.server.history if e.store.endswith("machineoperations")
                       and e.obj.get("metadata", {}).get("name") == name]
        phases = [(e.obj.get("status") or {}).get("phase") or "" for e in history]
        return [p for i, p in enumerate(phases) if p and (i == 0 or p != phases[i - 1])]

    # -- the watcher's files -----------------------------------------------------------------------

    def progress_store(self) -> ProgressStore:
        return ProgressStore(self.cfg.state_dir)

    def progress(self, name: str, uid: str | None = None) -> OperationProgress | None:
        uid = uid or mop.uid(self.get(name) or {})
        return self.progress_store().load_all().get(uid)

    def step(self, name: str) -> str | None:
        p = self.progress(name)
        return p.step if p else None

    # -- whole host operations, for tests about something else -------------------------------------

    def finish_upgrade(self, name: str, ok: bool = True, message: str | None = None) -> Request:
        req = self.dispatcher.wait_request(self.operation(name))
        if ok:
            self.dispatcher.succeed(req, message or "upgraded from 1.0.0 to 2.0.0")
        else:
            self.dispatcher.fail(req, Reason.DAEMON_FAILED, message or "rolled back")
        return req

    def finish_reset(self, name: str) -> Request:
        """Phase 1, the gate, the watcher's ack, phase 2: a reset that succeeds."""
        req = self.dispatcher.wait_request(self.operation(name))
        self.dispatcher.open_gate(req)
        wait_for(f"the ack of {name}'s gate", lambda: self.dispatcher.acked(req))
        self.dispatcher.succeed(req, "AgentReset completed")
        return req
