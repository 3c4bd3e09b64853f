"""Agent configuration: ``/etc/unbounded/agent/config.yaml`` (DESIGN.md §2).

A missing file means all defaults. A malformed file is a clear ``InvalidConfig`` error, never a
traceback, so a daemon with a bad config fails once with a readable journal line.
"""

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from .reasons import OpsError, Reason

DEFAULT_CONFIG_PATH = "/etc/unbounded/agent/config.yaml"
DEFAULT_BIN_DIR = "/var/lib/unbounded-agent/bin"
DEFAULT_STATE_DIR = "/var/lib/unbounded-agent"

# The toolset's own state (the operation queue, results, the reset's checkpoint and reports): not the
# agent's, so a reset does not remove it.
OPS_DIR = "/var/lib/unbounded-agent-ops"

# Environment overrides exist for tests and for hosts that keep the config elsewhere.
ENV_CONFIG = "UNBOUNDED_AGENT_CONFIG"
ENV_OPS_DIR = "UNBOUNDED_AGENT_OPS_DIR"


@dataclasses.dataclass(frozen=True)
class Config:
    machine_name: str
    kubeconfig: str | None
    bin_dir: Path
    state_dir: Path
    # AgentUpgrade tunables
    allow_insecure_http: bool = False
    max_archive_bytes: int = 256 << 20
    max_extracted_bytes: int = 256 << 20
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 30.0
    download_deadline_seconds: float = 600.0
    preflight_timeout_seconds: float = 30.0
    ready_timeout_seconds: float = 60.0
    probation_seconds: float = 10.0
    # watcher: report ready to systemd this long after start even if the API server cannot be reached
    ready_without_api_seconds: float = 20.0
    source: str = ""  # where the settings came from, for `status` and error messages


# key in the file -> (attribute, accepted types)
_KEYS: dict[str, tuple[str, tuple[type[Any], ...]]] = {
    "machineName": ("machine_name", (str,)),
    "kubeconfig": ("kubeconfig", (str,)),
    "binDir": ("bin_dir", (str,)),
    "stateDir": ("state_dir", (str,)),
    "allowInsecureHTTP": ("allow_insecure_http", (bool,)),
    "maxArchiveBytes": ("max_archive_bytes", (int,)),
    "maxExtractedBytes": ("max_extracted_bytes", (int,)),
    "connectTimeoutSeconds": ("connect_timeout_seconds", (int, float)),
    "readTimeoutSeconds": ("read_timeout_seconds", (int, float)),
    "downloadDeadlineSeconds": ("download_deadline_seconds", (int, float)),
    "preflightTimeoutSeconds": ("preflight_timeout_seconds", (int, float)),
    "readyTimeoutSeconds": ("ready_timeout_seconds", (int, float)),
    "probationSeconds": ("probation_seconds", (int, float)),
    "readyWithoutApiSeconds": ("ready_without_api_seconds", (int, float)),
}
_PATHS = ("binDir", "stateDir")

# The tunables the units take (upgrade/generator.py writes them into drop-ins at daemon-reload), with the
# bounds a unit can honour: a value outside them is refused here, with the unit it would go into named,
# rather than written into a unit that would cut the step short or never end it.
BOUNDS: dict[str, tuple[float, float, str]] = {
    "readyTimeoutSeconds": (1, 1800, "the daemon unit's TimeoutStartSec= and probation's ready deadline"),
    "probationSeconds": (1, 3600, "the probation unit's TimeoutStartSec="),
    "downloadDeadlineSeconds": (1, 86400, "the stage unit's TimeoutStartSec="),
    "preflightTimeoutSeconds": (1, 600, "the preflight unit's TimeoutStartSec="),
}
# Paths go into unit files (ExecStart=, ReadWritePaths=) unquoted: only characters that need no quoting.
_UNIT_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@-]*")
# The sandboxed units see no /home (ProtectHome=), and kernel file systems are no place for files: the agent's
# cannot live there. (Under /tmp or /var/tmp the generator has the units share the host's /tmp instead.)
_NOT_UNDER = ("/home", "/root", "/run/user", "/proc", "/sys", "/dev")
TMP_DIRS = ("/tmp", "/var/tmp")


def ops_dir() -> Path:
    return Path(os.environ.get(ENV_OPS_DIR) or OPS_DIR)


def config_path() -> str:
    return os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH


def load(path: str | None = None) -> Config:
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return _build({}, f"defaults ({path} absent)")
    except OSError as e:
        raise OpsError(Reason.INVALID_CONFIG, f"cannot read {path}: {e.strerror}") from None
    return _build(parse(raw, path), path)


def parse(raw: bytes, path: str) -> dict:
    import yaml  # only paid for when a config file exists

    try:
        # libyaml's loader where the system has it (Debian's python3-yaml does): the same YAML, a tenth of the time
        data = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise OpsError(Reason.INVALID_CONFIG, f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OpsError(Reason.INVALID_CONFIG, f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _build(data: dict, source: str) -> Config:
    values: dict[str, Any] = {}
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        # Refuse rather than ignore: a typo in a tunable must not silently fall back to a default.
        raise OpsError(Reason.INVALID_CONFIG, f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    for key, (attr, types) in _KEYS.items():
        if key not in data or data[key] is None:
            continue
        value = data[key]
        # bool is an int in Python: `maxArchiveBytes: true` must not pass as 1.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} must be a {types[0].__name__}, got {type(value).__name__}")
        if key in _PATHS:
            value = _check_path(source, key, value)
        if types[0] in (int, float):
            _check_number(source, key, value)
        values[attr] = value
    values["machine_name"] = values.get("machine_name") or os.uname().nodename  # gethostname(), without importing socket
    values["bin_dir"] = Path(values.get("bin_dir", DEFAULT_BIN_DIR))
    values["state_dir"] = Path(values.get("state_dir", DEFAULT_STATE_DIR))
    values.setdefault("kubeconfig", None)
    return Config(source=source, **values)


def _check_number(source: str, key: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} must be a finite number greater than 0, got {value}")
    if key in BOUNDS:
        low, high, where = BOUNDS[key]
        if not low <= value <= high:
            raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} must be between {low:g} and {high:g} seconds "
                                                  f"(it sets {where}), got {value:g}")


def _check_path(source: str, key: str, value: str) -> str:
    if not os.path.isabs(value):
        raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} must be an absolute path, got {value!r}")
    path = os.path.normpath(value)
    if not _UNIT_SAFE_PATH.fullmatch(path) or path == "/":
        raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} {value!r} cannot go into a unit file: use a "
                                              "directory other than / made of letters, digits and . _ + @ - only")
    under = next((d for d in _NOT_UNDER if path == d or path.startswith(d + "/")), None)
    if under:
        raise OpsError(Reason.INVALID_CONFIG, f"{source}: {key} {value!r} is under {under}, which the agent's "
                                              "sandboxed units cannot see: choose another directory")
    return path
