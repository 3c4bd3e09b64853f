"""Reading a kubeconfig file as kubectl does: its current context, and the files that context's cluster and
user name (relative paths are relative to the kubeconfig). The client (kube/client.py) watches those files for
rotation; a reset keeps a self-contained copy of them (reset/reporter_kit.py) while it removes the originals."""

from __future__ import annotations

import base64
import os

# The file each entry names, and the inline key that carries its content instead.
FILE_KEYS = (("cluster", "certificate-authority", "certificate-authority-data"),
             ("user", "client-certificate", "client-certificate-data"),
             ("user", "client-key", "client-key-data"),
             ("user", "tokenFile", "token"))


def load(path: str) -> dict:
    import yaml

    with open(path, "rb") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a kubeconfig (not a mapping)")
    return doc


def current(doc: dict) -> tuple[str | None, dict, dict, dict]:
    """The current context's name, and that context, its cluster and its user entries."""
    name = doc.get("current-context")
    context = _named(doc, "contexts", name).get("context") or {}
    cluster = _named(doc, "clusters", context.get("cluster")).get("cluster") or {}
    user = _named(doc, "users", context.get("user")).get("user") or {}
    return name, context, cluster, user


def files(path: str) -> list[str]:
    """The kubeconfig and every file its current context names."""
    found = [path]
    try:
        _, _, cluster, user = current(load(path))
    except Exception:  # unreadable now: the client says why; the kubeconfig itself is still watched
        return found
    base = os.path.dirname(os.path.abspath(path))
    entries = {"cluster": cluster, "user": user}
    for section, key, _ in FILE_KEYS:
        value = entries[section].get(key)
        if isinstance(value, str) and value:
            found.append(os.path.join(base, value))
    return found


def flattened(path: str) -> dict:
    """The current context of the kubeconfig at path as a kubeconfig of its own, with the content of every file
    it names inline: usable after those files are gone. OSError or ValueError when any cannot be read."""
    name, context, cluster, user = current(load(path))
    if not name or not context:
        raise ValueError(f"{path} has no current context")
    base = os.path.dirname(os.path.abspath(path))
    entries = {"cluster": dict(cluster), "user": dict(user)}
    for section, key, inline in FILE_KEYS:
        value = entries[section].pop(key, None)
        if isinstance(value, str) and value:
            with open(os.path.join(base, value), "rb") as f:
                content = f.read()
            entries[section][inline] = content.decode().strip() if inline == "token" else base64.b64encode(content).decode()
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "contexts": [{"name": name, "context": context}],
            "clusters": [{"name": context.get("cluster"), "cluster": entries["cluster"]}],
            "users": [{"name": context.get("user"), "user": entries["user"]}]}


def _named(doc: dict, section: str, name) -> dict:
    return next((e for e in doc.get(section) or [] if isinstance(e, dict) and e.get("name") == name), {})
