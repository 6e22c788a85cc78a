"""Canonical JSON and digests: the same inputs give the same key in every process, forever.

Only explicitly supported types are encoded; anything else is a `TypeError` naming the type,
never a silent ``repr()`` (which would differ between processes or releases). `1`, `1.0`,
`True` and `"1"` encode differently; dict keys that are not strings are encoded as pairs, so
``{1: x}`` and ``{"1": x}`` never collide.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import json
import uuid
from decimal import Decimal
from pathlib import PurePath
from typing import Any

__all__ = ["canonical", "canonical_json", "derive_key", "digest", "dumps"]


def canonical(value: Any) -> Any:
    """Turn a value into JSON-native data with explicit tags for non-JSON types."""
    kind = type(value)
    # the common cases first, by exact type (subclasses take the careful path below)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        for name in value:
            if type(name) is not str:
                break
        else:
            return {name: canonical(item) for name, item in value.items()}
    # Enums first: a StrEnum or IntEnum member is also a str or an int, and must not
    # collide with its plain value.
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"$nk:enum": f"{cls.__module__}.{cls.__qualname__}", "v": canonical(value.value)}
    # then one family after another, in this order (a value of two families takes the first)
    if value is None or isinstance(value, bool | str | int | float):
        return _scalar(value)
    if isinstance(value, dict | list | tuple | set | frozenset):
        return _collection(value)
    if isinstance(value, _TAGGED):
        return _tagged(value)
    return _record(value)


def _scalar(value: bool | str | int | float | None) -> Any:
    """A JSON scalar (of any subclass) as its plain type; NaN and infinities are tagged."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if value != value or value in (float("inf"), float("-inf")):
        return {"$nk:float": repr(value)}
    return float(value)


def _collection(
    value: dict[Any, Any] | list[Any] | tuple[Any, ...] | set[Any] | frozenset[Any],
) -> Any:
    """Dicts, sequences and sets; unordered contents are sorted by their canonical JSON."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: canonical(v) for k, v in value.items()}
        pairs = [[canonical(k), canonical(v)] for k, v in value.items()]
        pairs.sort(key=lambda pair: json.dumps(pair, sort_keys=True))
        return {"$nk:map": pairs}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    items = [canonical(v) for v in value]
    items.sort(key=lambda item: json.dumps(item, sort_keys=True))
    return {"$nk:set": items}


_TAGGED = (
    Decimal,
    uuid.UUID,
    dt.date,
    dt.time,
    dt.timedelta,
    PurePath,
    bytes,
    bytearray,
    memoryview,
)


def _tagged(value: Any) -> Any:
    """Decimal, UUID, times, paths and bytes: an object whose one key names the type."""
    if isinstance(value, Decimal):
        return {"$nk:decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$nk:uuid": str(value)}
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise TypeError(
                "cannot fingerprint a naive datetime: give it a timezone (a naive time means "
                "different instants on different hosts)"
            )
        return {"$nk:datetime": value.isoformat()}
    if isinstance(value, dt.date | dt.time | dt.timedelta):
        text = str(value.total_seconds()) if isinstance(value, dt.timedelta) else value.isoformat()
        return {f"$nk:{type(value).__name__}": text}
    if isinstance(value, PurePath):
        return {"$nk:path": value.as_posix()}
    return {"$nk:bytes": base64.b64encode(bytes(value)).decode("ascii")}


def _record(value: Any) -> Any:
    """Dataclasses and pydantic models, tagged with their class; anything else is refused."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        return {
            "$nk:dataclass": f"{kind.__module__}.{kind.__qualname__}",
            "v": {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    dump = getattr(value, "model_dump", None)
    if dump is not None and callable(dump) and hasattr(type(value), "model_fields"):
        cls = type(value)
        return {"$nk:model": f"{cls.__module__}.{cls.__qualname__}", "v": dump(mode="json")}
    raise TypeError(
        f"cannot fingerprint a value of type {type(value).__qualname__}: nodekit encodes "
        "JSON types, Decimal, UUID, datetime, date, Enum, Path, bytes, dataclasses and pydantic "
        "models; pass key= to choose what identifies the call"
    )


_DUMPS = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def dumps(canonical_value: Any) -> str:
    """JSON text of a value `canonical()` already produced."""
    return _DUMPS(canonical_value)


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no spaces, UTF-8 kept."""
    return _DUMPS(canonical(value))


def digest(text: str, secret: bytes | None = None) -> str:
    """SHA-256 hex digest of `text`, or HMAC-SHA-256 when a secret is configured."""
    data = text.encode("utf-8")
    if secret is not None:
        return hmac.new(secret, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def derive_key(parent_digest: str, step: str) -> str:
    """A downstream key derived from a call's key digest: stable across attempts and resumes."""
    return hashlib.sha256(f"nodekit:derive:{parent_digest}:{step}".encode()).hexdigest()[:40]
