"""Tagged JSON for results a return annotation does not describe: exact in value and type.

Plain JSON stays plain. Any other value becomes an object whose ``"$nk"`` key names what it
is (``{"$nk": "decimal", "v": "1.50"}``); a user dict that has a ``"$nk"`` key itself, or keys
that are not strings, is written as a list of pairs, so nothing is ambiguous. Classes (Enum,
dataclass, pydantic model, NamedTuple) are named ``module:qualname`` and found again among
the classes the return annotation names, then in modules already imported: a record never
makes Python import anything, and nothing is ever unpickled. Dataclasses and models are
rebuilt from their stored state without running ``__init__`` (the first call already ran it).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import sys
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from ._exact import Kind, kind_of

__all__ = ["PREFIX", "BadRecord", "TaggedJSON", "Unstorable", "classes_in"]

PREFIX = "nk1:"  # tagged records start with it; plain JSON never can
TAG = "$nk"


class Unstorable(Exception):
    """A value that tagged JSON cannot hold: `.kind` is the offending type, `.fix` the remedy."""

    def __init__(self, kind: type, why: str, fix: str) -> None:
        super().__init__(f"type {_label(kind)} {why}")
        self.kind = kind
        self.fix = fix


class BadRecord(ValueError):
    """A tagged record that does not decode (tampered, or naming a class not found)."""


def _label(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# ---------------------------------------------------------------------------- annotations


def classes_in(annotation: Any) -> dict[str, type]:
    """Classes a return annotation names, by ``module:qualname``: found without importing.

    Walks type arguments (``dict[str, list[Order]]``), ``Literal`` enum members and the field
    types of dataclasses, pydantic models, NamedTuples and TypedDicts.
    """
    found: dict[str, type] = {}
    seen: set[int] = set()

    def walk(tp: Any) -> None:
        if id(tp) in seen:
            return
        seen.add(id(tp))
        for arg in typing.get_args(tp):
            walk(type(arg) if isinstance(arg, enum.Enum) else arg)
        if not isinstance(tp, type):
            return
        kind = kind_of(tp)
        if kind in ("enum", "namedtuple", "model", "dataclass"):
            found[class_name(tp)] = tp
        if kind == "model":
            fields: list[Any] = [f.annotation for f in tp.model_fields.values()]  # type: ignore[attr-defined]
        elif kind in ("namedtuple", "dataclass") or typing.is_typeddict(tp):
            try:
                fields = list(typing.get_type_hints(tp).values())
            except Exception:
                fields = []
        else:
            return
        for field in fields:
            walk(field)

    with contextlib.suppress(Exception):  # an exotic annotation: what was found still helps
        walk(annotation)
    return found


# ---------------------------------------------------------------------------- tagged JSON


class TaggedJSON:
    """Encodes and decodes tagged JSON, resolving classes as a replay would."""

    def __init__(self, known: dict[str, type]) -> None:
        from pydantic_core import from_json, to_json  # imported with the first keyed node

        self.known = known
        self._resolvable: set[type] = set()
        self._to_json = to_json
        self._from_json = from_json

    # ------------------------------------------------------------------ encode

    def dumps(self, value: Any) -> str:
        """`PREFIX` and the JSON text; `Unstorable` for what cannot be stored or found again."""
        return PREFIX + self._to_json(self._enc(value)).decode("utf-8")

    def _enc(self, value: Any) -> Any:
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            return value
        if kind is float:
            return value if value - value == 0.0 else {TAG: "float", "v": repr(value)}
        if kind is list:
            return [self._enc(item) for item in value]
        if kind is dict:
            if TAG not in value and all(type(key) is str for key in value):
                return {key: self._enc(item) for key, item in value.items()}
            return {TAG: "dict", "v": [[self._enc(k), self._enc(v)] for k, v in value.items()]}
        encode = _ENCODERS.get(kind_of(kind))
        if encode is None:
            raise Unstorable(
                kind,
                "is not a type nodekit stores as JSON",
                "return a JSON-friendly type (dict, list, str, int, Decimal, datetime, Enum, "
                "dataclass, pydantic model, ...) or name it in the return annotation if "
                "pydantic can serialize it",
            )
        return encode(self, value)

    def _class(self, cls: type) -> str:
        name = class_name(cls)
        if cls not in self._resolvable:
            if self.resolve(name) is not cls:
                raise Unstorable(
                    cls,
                    "cannot be found by name when the result is replayed (a class defined "
                    "inside a function, or shadowed)",
                    f"define {cls.__qualname__} at module level, or name it in the node's "
                    "return annotation",
                )
            self._resolvable.add(cls)
        return name

    def _clock(self, tag: str, value: Any) -> dict[str, Any]:
        out: dict[str, Any] = {TAG: tag, "v": value.replace(tzinfo=None).isoformat()}
        if value.tzinfo is not None:
            out["tz"] = self._enc(value.tzinfo)
        if value.fold:
            out["fold"] = 1
        return out

    def _model(self, value: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            TAG: "model",
            "c": self._class(type(value)),
            "v": self._enc(dict(value.__dict__)),
            "s": sorted(value.__pydantic_fields_set__),
        }
        if value.__pydantic_extra__:
            out["x"] = self._enc(dict(value.__pydantic_extra__))
        if value.__pydantic_private__:
            out["p"] = self._enc(dict(value.__pydantic_private__))
        return out

    # ------------------------------------------------------------------ decode

    def loads(self, text: str) -> Any:
        """The value of a tagged record (text after `PREFIX`); `BadRecord` if it is not one."""
        try:
            return self._dec(self._from_json(text, allow_inf_nan=False))
        except BadRecord:
            raise
        except Exception as exc:
            raise BadRecord(f"{type(exc).__name__}: {exc}") from None

    def _dec(self, data: Any) -> Any:
        kind = type(data)
        if kind is list:
            return [self._dec(item) for item in data]
        if kind is dict:
            if TAG not in data:
                return {key: self._dec(item) for key, item in data.items()}
            return _DECODERS[data[TAG]](self, data)
        return data

    def resolve(self, name: str) -> type | None:
        """The class of a ``module:qualname``: annotation first, then imported modules."""
        cls = self.known.get(name)
        if cls is not None:
            return cls
        module, _, qualname = name.partition(":")
        found: Any = sys.modules.get(module)
        for part in qualname.split("."):
            if found is None:
                return None
            found = getattr(found, part, None)
        return found if isinstance(found, type) else None

    def _found(self, data: dict[str, Any], kind: str) -> Any:
        name = data["c"]
        cls = self.resolve(name) if isinstance(name, str) else None
        if cls is None or kind_of(cls) != kind:
            raise BadRecord(
                f"it names {kind} class {name!r}, which is neither in the return annotation "
                "nor in an imported module"
            )
        return cls


def _dataclass_state(value: Any) -> dict[str, Any]:
    if hasattr(value, "__dict__"):
        return dict(value.__dict__)
    return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}


def _timezone(tagged: TaggedJSON, value: dt.timezone) -> dict[str, Any]:
    offset = value.utcoffset(None)
    out: dict[str, Any] = {TAG: "timezone", "v": tagged._enc(offset)}
    name = value.tzname(None)
    if name != dt.timezone(offset).tzname(None):
        out["n"] = name
    return out


def _zoneinfo(tagged: TaggedJSON, value: Any) -> dict[str, Any]:
    if value.key is None:
        raise Unstorable(
            type(value), "was loaded from a file, not by key", "use ZoneInfo('Area/City')"
        )
    return {TAG: "zoneinfo", "v": value.key}


_ENCODERS: dict[Kind, Callable[[TaggedJSON, Any], Any]] = {
    "tuple": lambda t, v: {TAG: "tuple", "v": [t._enc(item) for item in v]},
    "set": lambda t, v: {TAG: "set", "v": [t._enc(item) for item in v]},
    "frozenset": lambda t, v: {TAG: "frozenset", "v": [t._enc(item) for item in v]},
    "decimal": lambda t, v: {TAG: "decimal", "v": str(v)},
    "uuid": lambda t, v: {TAG: "uuid", "v": str(v)},
    "bytes": lambda t, v: {TAG: "bytes", "v": base64.b64encode(v).decode("ascii")},
    "bytearray": lambda t, v: {TAG: "bytearray", "v": base64.b64encode(v).decode("ascii")},
    "datetime": lambda t, v: t._clock("datetime", v),
    "time": lambda t, v: t._clock("time", v),
    "date": lambda t, v: {TAG: "date", "v": v.isoformat()},
    "timedelta": lambda t, v: {TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]},
    "timezone": _timezone,
    "zoneinfo": _zoneinfo,
    "enum": lambda t, v: {TAG: "enum", "c": t._class(type(v)), "v": t._enc(v.value)},
    "namedtuple": lambda t, v: {
        TAG: "namedtuple",
        "c": t._class(type(v)),
        "v": [t._enc(item) for item in v],
    },
    "dataclass": lambda t, v: {
        TAG: "dataclass",
        "c": t._class(type(v)),
        "v": t._enc(_dataclass_state(v)),
    },
    "model": lambda t, v: t._model(v),
}


def _clock_of(tagged: TaggedJSON, data: dict[str, Any], parse: Any) -> Any:
    tz = tagged._dec(data["tz"]) if "tz" in data else None
    if tz is not None and not isinstance(tz, dt.tzinfo):
        raise BadRecord("a time zone that is not a tzinfo")
    return parse(data["v"]).replace(tzinfo=tz, fold=int(data.get("fold", 0)))


def _timezone_of(tagged: TaggedJSON, data: dict[str, Any]) -> dt.timezone:
    offset = tagged._dec(data["v"])
    return dt.timezone(offset, data["n"]) if "n" in data else dt.timezone(offset)


def _zoneinfo_of(tagged: TaggedJSON, data: dict[str, Any]) -> Any:
    import zoneinfo  # the standard library's, only for a record that holds a zone

    return zoneinfo.ZoneInfo(data["v"])


def _dataclass_of(tagged: TaggedJSON, data: dict[str, Any]) -> Any:
    cls = tagged._found(data, "dataclass")
    state = tagged._dec(data["v"])
    obj = object.__new__(cls)
    for name, item in state.items():
        object.__setattr__(obj, name, item)  # frozen dataclasses too: no __init__ runs again
    return obj


def _model_of(tagged: TaggedJSON, data: dict[str, Any]) -> Any:
    cls = tagged._found(data, "model")
    values = tagged._dec(data["v"])
    extra = tagged._dec(data["x"]) if "x" in data else {}
    model = cls.model_construct(_fields_set=set(data["s"]), **values, **extra)
    if "p" in data:
        object.__setattr__(model, "__pydantic_private__", tagged._dec(data["p"]))
    return model


def _pairs(tagged: TaggedJSON, data: dict[str, Any]) -> dict[Any, Any]:
    return {tagged._dec(key): tagged._dec(item) for key, item in data["v"]}


_DECODERS: dict[str, Callable[[TaggedJSON, dict[str, Any]], Any]] = {
    "dict": _pairs,
    "float": lambda t, d: float(d["v"]),
    "tuple": lambda t, d: tuple(t._dec(item) for item in d["v"]),
    "set": lambda t, d: {t._dec(item) for item in d["v"]},
    "frozenset": lambda t, d: frozenset(t._dec(item) for item in d["v"]),
    "decimal": lambda t, d: Decimal(d["v"]),
    "uuid": lambda t, d: uuid.UUID(d["v"]),
    "bytes": lambda t, d: base64.b64decode(d["v"], validate=True),
    "bytearray": lambda t, d: bytearray(base64.b64decode(d["v"], validate=True)),
    "datetime": lambda t, d: _clock_of(t, d, dt.datetime.fromisoformat),
    "time": lambda t, d: _clock_of(t, d, dt.time.fromisoformat),
    "date": lambda t, d: dt.date.fromisoformat(d["v"]),
    "timedelta": lambda t, d: dt.timedelta(*d["v"]),
    "timezone": _timezone_of,
    "zoneinfo": _zoneinfo_of,
    "enum": lambda t, d: t._found(d, "enum")(t._dec(d["v"])),
    "namedtuple": lambda t, d: t._found(d, "namedtuple")._make(t._dec(item) for item in d["v"]),
    "dataclass": _dataclass_of,
    "model": _model_of,
}
