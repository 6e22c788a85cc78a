"""A flow's state: its kind, fields, reducers, validation and its journal codec.

State is a dict (``state=None``), a `TypedDict` or a pydantic model, validated on the way in
and after every update; the state is never mutated in place (each update makes a new dict or
model), so a node always sees the state as it stood when it started, and an update that fails
validation changes nothing. A field with a reducer (``Annotated[list[int], operator.add]``,
or ``Flow(reducers={"field": fn})``) combines every update with the value before it; at the
end of an async run the reducers are folded again in the flow's canonical order, so the final
state does not depend on which of two parallel nodes finished first.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .._canonical import canonical
from .._errors import ConfigError
from .._events import short_error

_UNTYPED, _TYPEDDICT, _MODEL = "dict", "TypedDict", "model"
_FAIL = object()


class Problem(Exception):
    """Internal: why a node's step failed other than by raising (never escapes the package)."""

    def __init__(self, message: str, field: str | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.cause = cause


def error_field(exc: BaseException) -> str | None:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            loc = errors()[0]["loc"]
        except Exception:
            return None
        if loc:
            return str(loc[0])
    return None


class Schema:
    """What a flow knows about its state: kind, fields, reducers, validation and its codec."""

    __slots__ = ("_adapters", "annotations", "cls", "extra", "fields", "flow", "kind", "reducers")

    def __init__(
        self, flow: str, state: Any, reducers: Mapping[str, Callable[[Any, Any], Any]] | None
    ) -> None:
        self.flow = flow
        self.cls = state
        self.extra = False
        self._adapters: dict[str, Any] = {}
        found: dict[str, Callable[[Any, Any], Any]] = {}
        if state is None:
            self.kind = _UNTYPED
            self.fields: frozenset[str] | None = None
            self.annotations: dict[str, Any] = {}
        elif isinstance(state, type) and typing.is_typeddict(state):
            self.kind = _TYPEDDICT
            self.annotations = typing.get_type_hints(state, include_extras=True)
            self.fields = frozenset(self.annotations)
            for name, hint in self.annotations.items():
                reducer = reducer_in(getattr(hint, "__metadata__", ()))
                if reducer is not None:
                    found[name] = reducer
        elif (
            isinstance(state, type)
            and hasattr(state, "model_fields")
            and hasattr(state, "model_validate")
        ):
            self.kind = _MODEL
            infos = state.model_fields
            self.annotations = dict(infos)
            self.fields = frozenset(infos)
            self.extra = (getattr(state, "model_config", {}) or {}).get("extra") == "allow"
            for name, info in infos.items():
                reducer = reducer_in(info.metadata)
                if reducer is not None:
                    found[name] = reducer
        else:
            raise ConfigError(
                f"flow {flow!r}: state must be None (a dict), a TypedDict or a pydantic model "
                f"class, got {state!r}",
                option="state",
            )
        for name, reducer in (reducers or {}).items():
            if not callable(reducer):
                raise ConfigError(
                    f"flow {flow!r}: the reducer of field {name!r} must be a callable "
                    f"(old, update) -> new, got {reducer!r}",
                    option=name,
                )
            if self.fields is not None and name not in self.fields:
                raise ConfigError(
                    f"flow {flow!r}: reducers names field {name!r}, which the state does not "
                    f"have (fields: {sorted(self.fields)})",
                    option=name,
                )
            found[name] = reducer
        self.reducers = found

    # ------------------------------------------------------------------ validation

    def initial(self, state: Any) -> tuple[dict[str, Any], Any]:
        """Validate the input state: (values by field, the public state object)."""
        if self.kind == _MODEL:
            cls = self.cls
            if state is None:
                data: Any = {}
            elif isinstance(state, cls):
                data = {**(state.__pydantic_extra__ or {}), **state.__dict__}
            elif isinstance(state, Mapping):
                data = dict(state)
            else:
                raise ConfigError(
                    f"flow {self.flow!r}: the input state must be a {cls.__qualname__} or a "
                    f"dict, got {type(state).__qualname__}",
                    option="state",
                )
            model = cls.model_validate(data, by_name=True)
            return model.__dict__, model
        if state is None:
            values: dict[str, Any] = {}
        elif isinstance(state, Mapping):
            values = dict(state)
        else:
            raise ConfigError(
                f"flow {self.flow!r}: the input state must be a dict, got {type(state).__qualname__}",
                option="state",
            )
        if self.kind == _TYPEDDICT:
            # field by field: pydantic validates a whole typing.TypedDict only on 3.12+
            assert self.fields is not None
            unknown = sorted(set(values) - self.fields)
            missing = sorted(set(self.cls.__required_keys__) - set(values))
            if unknown or missing:
                raise ConfigError(
                    f"flow {self.flow!r}: the input state "
                    + (f"lacks required field(s) {missing}" if missing else "")
                    + (" and " if unknown and missing else "")
                    + (f"has unknown field(s) {unknown}" if unknown else ""),
                    option=(missing or unknown)[0],
                )
            values = {key: self.adapter(key).validate_python(v) for key, v in values.items()}
        return values, values

    def adapter(self, field: str) -> Any:
        """The field's TypeAdapter (typed states only), built on first use."""
        adapter = self._adapters.get(field)
        if adapter is None:
            if self.fields is None or field not in self.fields:
                return None
            from pydantic import TypeAdapter

            hint = self.annotations[field]
            if self.kind == _MODEL:
                hint = hint.rebuild_annotation()
            adapter = self._adapters[field] = TypeAdapter(hint)
        return adapter

    def any_adapter(self) -> Any:
        adapter = self._adapters.get("$any")
        if adapter is None:
            from pydantic import TypeAdapter

            adapter = self._adapters["$any"] = TypeAdapter(Any)
        return adapter

    def merge(
        self, values: dict[str, Any], public: Any, update: Mapping[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """The state after `update` (reducers applied, validated); raises `Problem`."""
        fields = self.fields
        reducers = self.reducers
        if self.kind == _MODEL and public.__pydantic_extra__:
            new = {**public.__pydantic_extra__, **values}
        else:
            new = values.copy()
        for key, value in update.items():
            if fields is not None and key not in fields and not self.extra:
                raise Problem(
                    f"it updates field {key!r}, which the state does not have "
                    f"(fields: {sorted(fields)})",
                    key,
                )
            if reducers:
                reducer = reducers.get(key)
                if reducer is not None and key in new:
                    try:
                        value = reducer(new[key], value)
                    except Exception as exc:
                        raise Problem(
                            f"the reducer of field {key!r} failed: {short_error(exc)}", key, exc
                        ) from exc
            new[key] = value
        if self.kind == _UNTYPED:
            return new, new
        if self.kind == _TYPEDDICT:
            for key in update:
                try:
                    new[key] = self.adapter(key).validate_python(new[key])
                except Exception as exc:
                    raise Problem(
                        f"it returned an invalid value for field {key!r}: {short_error(exc, 400)}",
                        key,
                        exc,
                    ) from exc
            return new, new
        try:
            model = self.cls.model_validate(new, by_name=True)
        except Exception as exc:
            field = error_field(exc)
            if field is None and len(update) == 1:
                field = next(iter(update))
            raise Problem(
                f"it returned an invalid update for field {field!r}: {short_error(exc, 400)}",
                field,
                exc,
            ) from exc
        return model.__dict__, model

    def revalidate(
        self, values: dict[str, Any], public: Any, keys: Iterable[str]
    ) -> tuple[dict[str, Any], Any]:
        """Validate a state whose reducer fields `keys` were folded again (async runs)."""
        if self.kind == _UNTYPED:
            return values, values
        if self.kind == _TYPEDDICT:
            for key in keys:
                values[key] = self.adapter(key).validate_python(values[key])
            return values, values
        model = self.cls.model_validate(
            {**(public.__pydantic_extra__ or {}), **values}, by_name=True
        )
        return model.__dict__, model

    def view(self, values: dict[str, Any], public: Any) -> Any:
        """What a node's ``state`` parameter receives: the model, or a read-only mapping."""
        return public if self.kind == _MODEL else MappingProxyType(values)

    # ------------------------------------------------------------------ fingerprints, journal

    def fingerprint_json(self, values: dict[str, Any], public: Any) -> Any:
        """The input state as JSON data, for the durable run's input fingerprint."""
        if self.kind == _MODEL:
            return public.model_dump(mode="json")
        if self.kind == _TYPEDDICT:
            return {k: self.adapter(k).dump_python(v, mode="json") for k, v in values.items()}
        return canonical(values)

    def _round_trip(self, adapter: Any, value: Any) -> Any:
        try:
            data = adapter.dump_python(value, mode="json", warnings="error")
            back = adapter.validate_json(json.dumps(data, allow_nan=False))
        except Exception:
            return _FAIL
        if type(back) is not type(value) or back != value:
            return _FAIL
        return data

    def encode(self, update: Mapping[str, Any], values: dict[str, Any]) -> str:
        """A journal entry: the update as canonical JSON that decodes to equal, typed values.

        Fields without a reducer are journaled as validated (`values`, the state after the
        update); a reducer field's contribution as the node returned it. A value that would
        not come back equal in value and type is refused (`Problem`): a resume must replay
        exactly what the node returned.
        """
        out: dict[str, Any] = {}
        untyped: list[str] = []
        for key, raw in update.items():
            value = raw if key in self.reducers or key not in values else values[key]
            adapter = self.adapter(key)
            data = _FAIL if adapter is None else self._round_trip(adapter, value)
            if data is _FAIL:
                data = self._round_trip(self.any_adapter(), value)
                if data is _FAIL:
                    raise Problem(
                        f"its update of field {key!r} (a {type(value).__qualname__}) cannot be "
                        "journaled: it does not survive JSON unchanged in value and type. "
                        "Declare the field's type on a TypedDict or pydantic state, or return "
                        "JSON-friendly values",
                        key,
                    )
                untyped.append(key)
            out[key] = data
        return json.dumps(
            {"any": sorted(untyped), "update": out},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )

    def decode(self, text: str) -> dict[str, Any]:
        """The update a journal entry holds; raises `Problem` when it no longer decodes."""
        key: str | None = None
        try:
            data = json.loads(text)
            untyped = set(data["any"])
            update: dict[str, Any] = {}
            for key, value in data["update"].items():
                adapter = None if key in untyped else self.adapter(key)
                adapter = adapter or self.any_adapter()
                update[key] = adapter.validate_json(json.dumps(value))
        except Exception as exc:
            raise Problem(
                f"its journaled update no longer decodes ({short_error(exc, 300)})",
                key,
                exc,
            ) from exc
        return update


def reducer_in(metadata: Iterable[Any]) -> Callable[[Any, Any], Any] | None:
    for item in metadata:
        if callable(item) and not isinstance(item, type):
            return typing.cast(Callable[[Any, Any], Any], item)
    return None
