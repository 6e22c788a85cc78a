"""Exact equality: a replayed result must equal the first in value *and* type.

`mismatch` is the type-exact deep comparison that decides whether a value survives a round
trip through JSON: ``1 == True == IntEnum(1)`` and ``(1,) == [1]``-like coincidences do not
pass it, nor does a Decimal that lost its exponent or a datetime that lost its zone. `plain`
says whether a value is JSON as it stands (its round trip is exact without a check).
`kind_of` names what a type is, for the comparison here and for tagged JSON (`_typed`).
They run on every stored result, so the common cases are inlined and dispatch is cached.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

__all__ = ["Kind", "kind_of", "mismatch", "plain"]

Kind = str | None
_KINDS: dict[type, Kind] = {}
_CHECK_OF: dict[type, Callable[[Any, Any], type | None]] = {}


# ---------------------------------------------------------------------------- kinds


def _is_model(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")  # no model exists unless pydantic is imported
    return pydantic is not None and issubclass(cls, pydantic.BaseModel)


def kind_of(cls: type) -> Kind:
    """What a type is for encoding and comparison (None: nothing nodekit knows), cached."""
    try:
        return _KINDS[cls]
    except KeyError:
        pass
    kind: Kind = _SIMPLE.get(cls)
    if kind is None:
        if issubclass(cls, enum.Enum):
            kind = "enum"
        elif issubclass(cls, tuple) and hasattr(cls, "_fields") and hasattr(cls, "_make"):
            kind = "namedtuple"
        elif _is_model(cls):
            kind = "model"
        elif dataclasses.is_dataclass(cls):
            kind = "dataclass"
        elif cls.__module__ == "zoneinfo" and cls.__name__ == "ZoneInfo":
            kind = "zoneinfo"
    if len(_KINDS) > 4096:  # classes made at run time must not pile up
        _KINDS.clear()
    _KINDS[cls] = kind
    return kind


_SIMPLE: dict[type, str] = {
    float: "float",
    dict: "dict",
    list: "list",
    tuple: "tuple",
    set: "set",
    frozenset: "frozenset",
    Decimal: "decimal",
    uuid.UUID: "uuid",
    bytes: "bytes",
    bytearray: "bytearray",
    dt.datetime: "datetime",
    dt.date: "date",
    dt.time: "time",
    dt.timedelta: "timedelta",
    dt.timezone: "timezone",
}


# ---------------------------------------------------------------------------- comparison


def plain(value: Any) -> bool:
    """Whether a value is JSON as it stands: it round-trips exactly, with no tags."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return bool(value - value == 0.0)  # finite: NaN and infinities are tagged
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            inner = type(item)
            if not (inner is str or inner is int or inner is bool or item is None or plain(item)):
                return False
        return True
    if kind is list:
        for item in value:
            inner = type(item)
            if not (inner is str or inner is int or inner is bool or item is None or plain(item)):
                return False
        return True
    return False


def mismatch(a: Any, b: Any) -> type | None:
    """The type of the first part of `a` that `b` does not equal in value *and* type.

    None when `b` is an exact copy: same types all the way down (``True`` is not ``1``, an
    ``IntEnum`` is not an ``int``, a tuple is not a list), dict order kept, Decimal exponent,
    time zone and fold kept.
    """
    if a is b:
        return None
    kind = type(a)
    if kind is not type(b):
        return kind
    if kind is str or kind is int or kind is bool:
        return None if a == b else kind
    try:
        check = _CHECK_OF[kind]
    except KeyError:
        check = _check_of(kind)
    return check(a, b)


def _dict_mismatch(a: dict[Any, Any], b: dict[Any, Any]) -> type | None:
    if len(a) != len(b):
        return dict
    for (ka, va), (kb, vb) in zip(a.items(), b.items()):  # noqa: B905 - lengths checked
        if type(ka) is str and type(kb) is str:
            if ka != kb:
                return dict
        else:
            found = mismatch(ka, kb)
            if found is not None:
                return found
        if va is vb:
            continue
        kind = type(va)
        if kind is not type(vb):
            return kind
        if kind is str or kind is int or kind is bool:
            if va != vb:
                return kind
            continue
        try:  # `mismatch` inlined: one call less per value, the cost of the success path
            check = _CHECK_OF[kind]
        except KeyError:
            check = _check_of(kind)
        found = check(va, vb)
        if found is not None:
            return found
    return None


def _items_mismatch(a: Any, b: Any, kind: type) -> type | None:
    if len(a) != len(b):
        return kind
    for x, y in zip(a, b):  # noqa: B905 - lengths checked
        if x is y:
            continue
        inner = type(x)
        if inner is not type(y):
            return inner
        if inner is str or inner is int or inner is bool:
            if x != y:
                return inner
            continue
        try:
            check = _CHECK_OF[inner]
        except KeyError:
            check = _check_of(inner)
        found = check(x, y)
        if found is not None:
            return found
    return None


def _float_mismatch(a: float, b: float) -> type | None:
    if a == b:
        return None if a or math.copysign(1.0, a) == math.copysign(1.0, b) else float
    return None if a != a and b != b else float


def _set_mismatch(a: Any, b: Any) -> type | None:
    if len(a) != len(b):
        return type(a)
    mine = {item: item for item in b}
    for item in a:
        if item not in mine:
            return type(a)
        found = mismatch(item, mine[item])
        if found is not None:
            return found
    return None


def _same_zone(a: dt.tzinfo | None, b: dt.tzinfo | None) -> bool:
    if a is b:
        return True
    if a is None or b is None or type(a) is not type(b):
        return False
    if type(a) is dt.timezone:
        return a == b and a.tzname(None) == b.tzname(None)
    return a == b


def _clock_mismatch(a: Any, b: Any) -> type | None:
    """datetime and time: wall clock, offset, fold and the zone itself."""
    same = a.isoformat() == b.isoformat() and a.fold == b.fold and _same_zone(a.tzinfo, b.tzinfo)
    return None if same else type(a)


def _state_mismatch(a: Any, b: Any) -> type | None:
    """Dataclasses: their whole instance dict (or, with slots, their fields)."""
    if hasattr(a, "__dict__"):
        return _dict_mismatch(a.__dict__, b.__dict__)
    for field in dataclasses.fields(a):
        found = mismatch(getattr(a, field.name), getattr(b, field.name))
        if found is not None:
            return found
    return None


def _model_mismatch(a: Any, b: Any) -> type | None:
    """Fields, extra and private attributes, and which fields were set (`model_dump`'s
    ``exclude_unset`` depends on it)."""
    if a.__pydantic_fields_set__ != b.__pydantic_fields_set__:
        return type(a)
    mine, theirs = a.__dict__, b.__dict__
    # one class, so the same fields in the same order: compare the values (the common case,
    # an annotated model's round trip, is on every call's path)
    found = (
        _items_mismatch(mine.values(), theirs.values(), type(a))
        if len(mine) == len(theirs)  # (the same class: the same field names, in order)
        else type(a)
    )
    if found is None and (a.__pydantic_extra__ or b.__pydantic_extra__):
        found = mismatch(a.__pydantic_extra__, b.__pydantic_extra__)
    if found is None and (a.__pydantic_private__ or b.__pydantic_private__):
        found = mismatch(a.__pydantic_private__, b.__pydantic_private__)
    return found


def _equal(a: Any, b: Any) -> type | None:
    return None if a == b else type(a)


def _check_of(cls: type) -> Callable[[Any, Any], type | None]:
    """The comparison for a type (same type already checked), cached like `kind_of`."""
    check = _CHECKS.get(kind_of(cls), _equal)
    if len(_CHECK_OF) > 4096:
        _CHECK_OF.clear()
    _CHECK_OF[cls] = check
    return check


_CHECKS: dict[Kind, Callable[[Any, Any], type | None]] = {
    "float": _float_mismatch,
    "dict": _dict_mismatch,
    "list": lambda a, b: _items_mismatch(a, b, list),
    "tuple": lambda a, b: _items_mismatch(a, b, tuple),
    "namedtuple": lambda a, b: _items_mismatch(a, b, type(a)),
    "set": _set_mismatch,
    "frozenset": _set_mismatch,
    "decimal": lambda a, b: None if not a.compare_total(b) else Decimal,  # 1.50 is not 1.5
    "datetime": _clock_mismatch,
    "time": _clock_mismatch,
    "timezone": lambda a, b: None if _same_zone(a, b) else dt.timezone,
    "enum": lambda a, b: None if a is b or a == b else type(a),
    "dataclass": _state_mismatch,
    "model": _model_mismatch,
    "uuid": _equal,
    "bytes": _equal,
    "bytearray": _equal,
    "date": _equal,
    "timedelta": _equal,
    "zoneinfo": lambda a, b: None if a is b or a.key == b.key else type(a),
}
