"""The fan-out controller's settings: ``/etc/unbounded/fleet-controller/config.yaml`` (optional), then the
command line. A malformed file or an unknown key is a clear ``InvalidConfig`` error, as for the agent.

    kubeconfig: /etc/unbounded/fleet-controller/kubeconfig  # default: the in-cluster service account
    leaseNamespace: unbounded-system      # default: $POD_NAMESPACE, else unbounded-system
    leaseName: unbounded-agent-fleet-controller
    identity: mgmt-01                     # default: $POD_NAME or the host name, and a random suffix
    leaseDurationSeconds: 15              # client-go's defaults: 15, 10 and 2 seconds
    renewDeadlineSeconds: 10
    retryPeriodSeconds: 2

Every instance that shares the lease namespace and name (a management host's unit, the pods of the
Deployment) takes part in one election: one of them acts.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from typing import Any

from .. import config as agent_config
from ..reasons import OpsError, Reason

DEFAULT_CONFIG_PATH = "/etc/unbounded/fleet-controller/config.yaml"
ENV_CONFIG = "UNBOUNDED_FLEET_CONTROLLER_CONFIG"
DEFAULT_NAMESPACE = "unbounded-system"
DEFAULT_LEASE = "unbounded-agent-fleet-controller"


@dataclasses.dataclass(frozen=True)
class Settings:
    kubeconfig: str | None
    lease_namespace: str
    lease_name: str
    identity: str
    lease_duration_seconds: int = 15
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0
    source: str = ""


_KEYS: dict[str, tuple[str, tuple[type[Any], ...]]] = {
    "kubeconfig": ("kubeconfig", (str,)),
    "leaseNamespace": ("lease_namespace", (str,)),
    "leaseName": ("lease_name", (str,)),
    "identity": ("identity", (str,)),
    "leaseDurationSeconds": ("lease_duration_seconds", (int,)),  # the Lease keeps whole seconds
    "renewDeadlineSeconds": ("renew_deadline_seconds", (int, float)),
    "retryPeriodSeconds": ("retry_period_seconds", (int, float)),
}


def default_identity() -> str:
    """Unique per process, as client-go's hostname_uuid: a restarted controller is a new candidate."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(4)}"


def load(path: str | None = None, overrides: dict | None = None) -> Settings:
    """The settings of the file at path (absent: defaults), with overrides (file keys) on top."""
    path = path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as f:
            data, source = agent_config.parse(f.read(), path), path
    except FileNotFoundError:
        data, source = {}, f"defaults ({path} absent)"
    except OSError as e:
        raise OpsError(Reason.INVALID_CONFIG, f"cannot read {path}: {e.strerror}") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise OpsError(Reason.INVALID_CONFIG, f"{source}: unknown setting(s) {', '.join(unknown)}; known: "
                                              f"{', '.join(_KEYS)}")
    values: dict[str, Any] = {}
    for key, (attr, types) in _KEYS.items():
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} must be a {types[0].__name__}, got "
                                                  f"{type(value).__name__}")
        if types[0] is str and not value:
            raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} must not be empty")
        if types[0] is not str and value <= 0:
            raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} must be greater than 0, got {value}")
        values[attr] = value
    values.setdefault("kubeconfig", None)
    values.setdefault("lease_namespace", os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE)
    values.setdefault("lease_name", DEFAULT_LEASE)
    values.setdefault("identity", default_identity())
    s = Settings(source=source, **values)
    if not s.retry_period_seconds < s.renew_deadline_seconds < s.lease_duration_seconds:
        raise OpsError(Reason.INVALID_CONFIG, f"{source}: retryPeriodSeconds ({s.retry_period_seconds}) < "
                                              f"renewDeadlineSeconds ({s.renew_deadline_seconds}) < "
                                              f"leaseDurationSeconds ({s.lease_duration_seconds}) must hold: a "
                                              "leader that cannot renew must stop before another may take over")
    return s
