"""Persisted state: small JSON documents, each a dataclass whose reader and writer live beside it.

Every schema (upgrade record, reset report and checkpoint, operation progress, request, result) is a
dataclass in the module that owns it; nobody else builds its dict. This module only turns dataclasses
into JSON and back, and replaces files atomically (fsutil), so a ``kill -9`` or a power loss leaves
the old document or the new one, never half of one.

A field may name its JSON key (``field(metadata={"key": "from"})``) where the key is a Python keyword.
Unknown keys are ignored when reading, so a newer writer's extra fields never break an older reader.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import time
import types
import typing
from pathlib import Path

from . import fsutil

T = typing.TypeVar("T")

# A write the file system refuses for a while (full, remounted read-only, a stale NFS handle, an I/O error) is
# retried for this long before the caller hears StateUnwritable: long enough for space to be freed or a
# remount undone, short enough that the units around it (their TimeoutStartSec= counts it) still end.
STATE_RETRY_SECONDS = 20.0
_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE})


class CorruptRecord(ValueError):
    """A state file that is not the JSON object its schema expects (our atomic writes never make one)."""


def read_json(path: str | os.PathLike) -> dict | None:
    """The document at path, None when absent. A corrupt file raises CorruptRecord naming the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        raise CorruptRecord(f"{path}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise CorruptRecord(f"{path}: expected a JSON object")
    return doc


def write_json(path: str | os.PathLike, doc: dict, mode: int = 0o644, parents: bool = True) -> None:
    """Write doc at path atomically; parents=False: the directory must be there (FileNotFoundError otherwise),
    for a writer that must never make again a directory someone removed."""
    if parents:
        Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fsutil.atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _field_hints(cls: type) -> tuple[tuple[dataclasses.Field, object], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


# Cached per class. Typed as a plain callable: mypy does not take a class object for the Hashable
# argument functools.cache's wrapper declares.
_fields: typing.Callable[[type], tuple[tuple[dataclasses.Field, object], ...]] = functools.cache(_field_hints)


def to_dict(obj) -> dict:
    """The JSON document of a record dataclass (nested dataclasses and lists of them included)."""
    out = {}
    for f, _ in _fields(type(obj)):
        out[_key(f)] = _plain(getattr(obj, f.name))
    return out


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], doc: dict) -> T:
    """The record of class cls from its JSON document: missing keys take their defaults, unknown keys
    are ignored. A value of the wrong shape for a nested record raises CorruptRecord."""
    if not isinstance(doc, dict):
        raise CorruptRecord(f"expected an object for {cls.__name__}, got {type(doc).__name__}")
    kwargs = {}
    for f, hint in _fields(cls):
        key = _key(f)
        if key in doc:
            kwargs[f.name] = _convert(hint, doc[key])
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise CorruptRecord(f"{cls.__name__}: {e}") from None


def _convert(hint, value):
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin in (list, tuple) and isinstance(value, list):
        (item,) = typing.get_args(hint)[:1] or (object,)
        return [_convert(item, v) for v in value]
    return value


def load(cls: type[T], path: str | os.PathLike) -> T | None:
    """The record at path, None when absent; CorruptRecord when it cannot be read as one."""
    doc = read_json(path)
    if doc is None:
        return None
    try:
        return from_dict(cls, doc)
    except CorruptRecord as e:
        raise CorruptRecord(f"{path}: {e}") from None


def save(obj, path: str | os.PathLike, mode: int = 0o644, parents: bool = True) -> None:
    write_json(path, to_dict(obj), mode, parents)


def now() -> str:
    """A timestamp for records: UTC, milliseconds, RFC 3339."""
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def persist(write: typing.Callable[[], T], what: str, seconds: float | None = None,
            sleep: typing.Callable[[float], None] = time.sleep, clock: typing.Callable[[], float] = time.monotonic) -> T:
    """Run write(), retrying with backoff while the file system refuses it, for at most ``seconds`` (default
    STATE_RETRY_SECONDS); then OpsError(StateUnwritable) naming what could not be written and why. Other
    errors pass through."""
    from . import log
    from .reasons import OpsError, Reason

    seconds = STATE_RETRY_SECONDS if seconds is None else seconds
    deadline = clock() + seconds
    delay = 0.5
    while True:
        try:
            return write()
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            if clock() + delay > deadline:
                raise OpsError(Reason.STATE_UNWRITABLE, f"cannot write {what}: {e.strerror} (errno {e.errno}); "
                                                        f"retried for {seconds:g} s") from None
            log.warn(f"cannot write {what}: {e.strerror}; retrying in {delay:g} s")
            sleep(delay)
            delay = min(delay * 2, 8.0)
