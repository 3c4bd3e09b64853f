"""The Kubernetes API, as the watcher uses it: a few JSON requests and a watch stream.

The ``kubernetes`` package (Debian's python3-kubernetes) is imported here only, and only when a
client is built, so ``unbounded-agent version`` never pays for it. It is used for what it does well —
loading a kubeconfig or the in-cluster service account (TLS, tokens, exec plugins, token refresh) and
sending authenticated requests — while the requests themselves are plain REST calls on the paths of
the API conventions: the watcher must not depend on generated models, nor know which server it talks to.

Errors come in two kinds, because the caller acts differently on them:
- ``ApiError`` — the server answered with an error status (409 Conflict, 404 NotFound, 410 Gone, ...);
- ``Unavailable`` — no answer: refused, reset, timed out, TLS failure, or a 5xx/429 (retry later).

Credentials rotate: a client remembers the files it was built from (the kubeconfig and the certificate, key,
CA and token files it names, or the service account's) and is ``stale`` once the server refuses its
credentials (401, or a 403 for the anonymous user: a client certificate the server no longer takes). The
owner (``Client``) builds a new one then, or when any of those files changed; a refusal of the credentials is
``Unavailable``, retried like an outage, never an answer about the object.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator

from .. import log
from ..version import VERSION

GROUP = "unbounded-cloud.io"
API_VERSION = "v1alpha3"
MOP_PATH = f"/apis/{GROUP}/{API_VERSION}/machineoperations"
MACHINE_PATH = f"/apis/{GROUP}/{API_VERSION}/machines"
EVENTS_PATH = "/api/v1/namespaces/{namespace}/events"
USER_AGENT = f"unbounded-agent/{VERSION}"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
CHECK_FILES_EVERY = 1.0  # seconds between looks at the credential files

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0


class KubeError(Exception):
    """Base of the two errors below."""


class ApiError(KubeError):
    """The API server answered with an error: ``code`` (HTTP status), ``reason`` (Status.reason)."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class Unavailable(KubeError):
    """No usable answer from the API server; retry later."""


def _retryable(code: int) -> bool:
    return code == 429 or code >= 500


def build(kubeconfig: str | None) -> Kube:
    """A client from the kubeconfig file at kubeconfig, else the in-cluster service account.

    Raises Unavailable when neither can be loaded (the file may appear later: the caller retries)."""
    from kubernetes import client, config  # the daemon path only
    files = credential_files(kubeconfig)
    seen = signature(files)  # before loading: a change during the load is seen as a change
    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration, persist_config=False)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except Exception as e:  # ConfigException, OSError, a YAML error, a malformed file's KeyError...
        where = kubeconfig or "the in-cluster service account"
        raise Unavailable(f"cannot load {where}: {e}") from None
    configuration.retries = 0  # the watcher retries with its own backoff
    _keep_tls_files(configuration)
    api = client.ApiClient(configuration)
    api.user_agent = USER_AGENT
    return Kube(api, files, seen)


def _keep_tls_files(configuration) -> None:
    """Copy the certificate, key and CA files the client reads into a directory of this process's own: urllib3
    reads them again for every new connection, and a reset removes the agent's config (the kubeconfig and the
    files beside it) before this daemon publishes the reset's Complete."""
    import shutil
    import tempfile

    private = None
    for attr in ("cert_file", "key_file", "ssl_ca_cert"):
        path = getattr(configuration, attr, None)
        if not path or not os.path.isfile(path):
            continue
        private = private or tempfile.mkdtemp(prefix="unbounded-agent-tls-")  # mode 0700
        copy = os.path.join(private, attr)
        shutil.copyfile(path, copy)
        os.chmod(copy, 0o600)
        setattr(configuration, attr, copy)


def credential_files(kubeconfig: str | None) -> list[str]:
    """The files a client is built from: the kubeconfig and every file its current context names, or the
    service account's token and CA."""
    from .. import kubeconfig as kubeconfig_file

    return kubeconfig_file.files(kubeconfig) if kubeconfig else [IN_CLUSTER_TOKEN, IN_CLUSTER_CA]


def signature(files: list[str]) -> tuple:
    """What changes when any of files is replaced, rewritten or removed."""
    out: list[tuple] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, None))
            continue
        out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def configured(kubeconfig: str | None) -> bool:
    """Whether a cluster is configured at all: a kubeconfig path, or an in-cluster service account."""
    return bool(kubeconfig) or (bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(IN_CLUSTER_TOKEN))


class Client:
    """The current Kube, built on first use from factory and built again when its credentials were refused
    or their files changed. Safe to call from several threads; raises Unavailable until it can be built."""

    def __init__(self, factory: Callable[[], Kube], on_build: Callable[[Kube, str], None] | None = None):
        self.factory = factory
        self.on_build = on_build or (lambda kube, why: None)
        self.current: Kube | None = None
        self.builds = 0
        self._lock = threading.Lock()
        self._checked = 0.0

    def __call__(self) -> Kube:
        with self._lock:
            why = self._why_rebuild()
            if why:
                try:
                    new = self.factory()
                except Unavailable as e:
                    if self.current is None or self.current.stale:
                        raise
                    # The files changed into something that does not load (half written, or removed by a
                    # reset that this daemon still reports on): the client it has still works; try again
                    # only when they change once more.
                    self.current.signature = signature(self.current.files)
                    log.warn(f"kept the current client: {why}, but a new one cannot be built: {e}")
                    return self.current
                self.current = new
                self.builds += 1
                self.on_build(self.current, why)
            assert self.current is not None
            return self.current

    def _why_rebuild(self) -> str:
        kube = self.current
        if kube is None:
            return "first use"
        if kube.stale:
            return f"the API server refused the credentials ({kube.stale})"
        now = time.monotonic()
        if kube.files and now - self._checked >= CHECK_FILES_EVERY:
            self._checked = now
            if signature(kube.files) != kube.signature:
                return "the kubeconfig or a file it names changed"
        return ""


class Kube:
    def __init__(self, api_client, files: list[str] | None = None, seen: tuple = ()):
        self.api = api_client
        self.server = api_client.configuration.host
        self.files = files or []  # what it was built from (empty: built some other way, e.g. by a test)
        self.signature = seen
        self.stale = ""  # why its credentials were refused: the owner builds a new client
        self.requests = 0  # sent, for the status line and the measurements

    def _call(self, method: str, path: str, query: dict | None = None, body=None, content_type: str | None = None,
              timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT)):
        """The raw urllib3 response of a 2xx answer; ApiError / Unavailable otherwise."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        self.requests += 1
        try:
            return self.api.call_api(path, method, query_params=list((query or {}).items()), header_params=headers,
                                     body=body, auth_settings=["BearerToken"], _return_http_data_only=True,
                                     _preload_content=False, _request_timeout=timeout)
        except ApiException as e:
            if e.status == 0:  # TLS and request-building failures
                raise Unavailable(str(e.reason).strip()) from None
            reason, message = _status_of(e.body, e.status, e.reason)
            if _retryable(e.status):
                raise Unavailable(f"{e.status} {reason}: {message}") from None
            if refused_credentials(e.status, message):
                self.stale = f"{e.status} {reason}"
                raise Unavailable(f"the API server refused the credentials: {e.status} {reason}: {message}") from None
            raise ApiError(e.status, reason, message) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from None

    def request(self, method: str, path: str, query: dict | None = None, body=None,
                content_type: str | None = None) -> dict:
        resp = self._call(method, path, query, body, content_type)
        try:
            data = resp.data
        except Exception as e:  # urllib3 raises its own errors for a body cut short
            raise Unavailable(f"reading the answer failed: {type(e).__name__}: {e}") from None
        finally:
            resp.release_conn()
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise Unavailable(f"{method} {path}: the answer is not JSON") from None

    def get(self, path: str, query: dict | None = None) -> dict:
        return self.request("GET", path, query)

    def watch(self, path: str, query: dict, timeout_seconds: int) -> Iterator[dict]:
        """The events of a watch (``{"type", "object"}``), until the server ends it.

        The read timeout is a little longer than timeoutSeconds: a connection that goes silent
        (a dropped network path) ends the watch instead of hanging the watcher."""
        query = dict(query, watch="true", timeoutSeconds=str(timeout_seconds))
        resp = self._call("GET", path, query, timeout=(CONNECT_TIMEOUT, timeout_seconds + 30))
        buf = b""
        try:
            for chunk in resp.stream(amt=None, decode_content=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            raise Unavailable("the watch sent a line that is not JSON") from None
        except KubeError:
            raise
        except Exception as e:  # urllib3 ProtocolError, ReadTimeoutError, ...
            raise Unavailable(f"the watch ended: {type(e).__name__}: {e}") from None
        finally:
            resp.release_conn()


def refused_credentials(code: int, message: str) -> bool:
    """401: the credentials were not accepted. 403 for system:anonymous: none were (a client certificate the
    server does not take is not sent as credentials at all), where anonymous requests are allowed."""
    return code == 401 or (code == 403 and 'User "system:anonymous"' in message)


def _status_of(body, code: int, fallback: str | None) -> tuple[str, str]:
    """reason and message from a metav1.Status body (what every error of a real API server carries)."""
    try:
        st = json.loads(body) if body else {}
    except (ValueError, TypeError):
        st = {}
    if not isinstance(st, dict):
        st = {}
    reason = st.get("reason") or fallback or str(code)
    message = st.get("message") or (body.decode(errors="replace")[:200] if isinstance(body, bytes) else "") or reason
    return str(reason), str(message)
