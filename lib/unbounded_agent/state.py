"""State files under the state directory: small JSON documents, always replaced atomically."""

import json
import os
from pathlib import Path

from . import fsutil

UPGRADE_RECORD = "upgrade.json"  # the upgrade in flight or last finished (written by the upgrade chain)


def read_json(path: str | os.PathLike) -> dict | None:
    """The document at path, None when absent. A corrupt file raises ValueError with the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return doc


def write_json(path: str | os.PathLike, doc: dict, mode: int = 0o600) -> None:
    Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fsutil.atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode)
