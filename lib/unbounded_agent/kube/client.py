"""The Kubernetes API, as the watcher uses it: a few JSON requests and a watch stream.

The ``kubernetes`` package (Debian's python3-kubernetes) is imported here only, and only when a
client is built, so ``unbounded-agent version`` never pays for it. It is used for what it does well —
loading a kubeconfig or the in-cluster service account (TLS, tokens, exec plugins, token refresh) and
sending authenticated requests — while the requests themselves are plain REST calls on the paths of
the API conventions: the watcher must not depend on generated models, nor know which server it talks to.

Errors come in two kinds, because the caller acts differently on them:
- ``ApiError`` — the server answered with an error status (409 Conflict, 404 NotFound, 410 Gone, ...);
- ``Unavailable`` — no answer: refused, reset, timed out, TLS failure, or a 5xx/429 (retry later).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from ..version import VERSION

GROUP = "unbounded-cloud.io"
API_VERSION = "v1alpha3"
MOP_PATH = f"/apis/{GROUP}/{API_VERSION}/machineoperations"
MACHINE_PATH = f"/apis/{GROUP}/{API_VERSION}/machines"
EVENTS_PATH = "/api/v1/namespaces/{namespace}/events"
USER_AGENT = f"unbounded-agent/{VERSION}"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

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
    api = client.ApiClient(configuration)
    api.user_agent = USER_AGENT
    return Kube(api)


def configured(kubeconfig: str | None) -> bool:
    """Whether a cluster is configured at all: a kubeconfig path, or an in-cluster service account."""
    return bool(kubeconfig) or (bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(IN_CLUSTER_TOKEN))


class Kube:
    def __init__(self, api_client):
        self.api = api_client
        self.server = api_client.configuration.host
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
