"""Stored results as JSON, equal in value and type on replay; never pickle: a record is data.

A result is first encoded with a pydantic `TypeAdapter` of the return annotation (the fast
path for models, dataclasses and typed containers). It is stored that way only if it decodes
back as an exact copy, compared type by type all the way down (`_typed.mismatch`). Otherwise,
and for results without an annotation (or `Any`, `object`) that are not plain JSON, it is
stored as tagged JSON (`_typed`), marked by a prefix that plain JSON never starts with, so
records written as plain JSON decode exactly as before.

A result that neither can hold (a class defined inside a function, a lock) is known before
the first call returns: the record says "completed, result unavailable" (the effect ran and
will not run again), the call returns its value, and the node warns once per type. Anything
undecodable is an `IdempotencyCorruptRecord`, never "absent".
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
import warnings
from typing import Any

from .._errors import ConfigError, IdempotencyCorruptRecord, NodekitWarning
from .._redact import error_text
from ._exact import mismatch, plain
from ._typed import PREFIX, BadRecord, TaggedJSON, Unstorable, classes_in

__all__ = ["UNAVAILABLE", "ResultCodec"]

UNAVAILABLE = "unavailable"
_OPEN = (inspect.Signature.empty, Any, object)


class ResultCodec:
    def __init__(
        self, annotation: Any, node: str, codec: Any, cache_errors: tuple[type[BaseException], ...]
    ) -> None:
        from pydantic import TypeAdapter

        self.node = node
        self.codec = codec
        self.cache_errors = cache_errors
        self.annotated = annotation is not inspect.Signature.empty
        # no annotation, Any or object: plain JSON is stored as it is, the rest tagged
        self.untyped = any(annotation is kind for kind in _OPEN)
        target = annotation if self.annotated else Any
        try:
            try:
                self.adapter: Any = TypeAdapter(target)
            except Exception as exc:
                if getattr(exc, "code", None) != "typed-dict-version":
                    raise
                # pydantic takes only typing_extensions' TypedDict before Python 3.12: the
                # result is a plain dict at run time, stored like one without an annotation
                self.untyped = True
                self.adapter = TypeAdapter(Any)
            # pydantic-core's own entry points: TypeAdapter's wrappers cost a few µs a call
            self._to_json = self.adapter.serializer.to_json
            self._from_json = self.adapter.validator.validate_json
            if self.annotated and not self.untyped:
                self.adapter.json_schema(mode="serialization")
        except Exception as exc:
            raise ConfigError(
                f"node {node!r}: its return type {annotation!r} cannot be stored as JSON, so "
                f"its result could not be replayed ({type(exc).__name__}: {exc}). Return a "
                "JSON-friendly type (pydantic model, dataclass, dict, list, str, int, ...)",
                node=node,
                option="return type",
            ) from exc
        self.tagged = TaggedJSON(classes_in(annotation) if self.annotated else {})
        self._warned: set[type] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ results

    def encode_result(self, value: Any) -> tuple[str | None, str | None]:
        """(result, error) columns for a successful value: the error column says unavailable."""
        text, error, _ = self.encode(value)
        return text, error

    def encode(self, value: Any) -> tuple[str | None, str | None, str | None]:
        """(result, error, warning): `warning` is set the first time a type cannot be stored.

        The caller warns once the record is completed (a warning turned into an error must not
        break the completion); the call still returns its value.
        """
        try:
            text = self._json(value)
        except Unstorable as exc:
            return self._unavailable(exc, exc.kind, exc.fix)
        except Exception as exc:  # e.g. text JSON cannot hold (a lone surrogate)
            return self._unavailable(exc, type(value), _FIX)
        return self._wrap(text), None, None

    def _json(self, value: Any) -> str:
        """Plain JSON if it comes back exact, else tagged JSON proven to; or `Unstorable`."""
        if self.untyped:
            if plain(value):  # exact JSON types: the round trip is exact, nothing to prove
                return str(self._to_json(value).decode("utf-8"))
        else:
            # (`warnings=False`, not "none": the same, but pydantic-core parses the string
            # form slowly, about as long as the serialization itself. `exclude_unset`: a
            # model's unset fields come back as defaults, and still unset.)
            try:
                raw = self._to_json(value, warnings=False, exclude_unset=True)
                if mismatch(value, self._from_json(raw)) is None:
                    return str(raw.decode("utf-8"))
            except Exception:
                pass  # the annotation does not describe it: tagged JSON may
        text = self.tagged.dumps(value)
        try:
            back = self.tagged.loads(text[len(PREFIX) :])
        except BadRecord as exc:
            raise Unstorable(type(value), f"does not decode from JSON ({exc})", _FIX) from None
        differs = mismatch(value, back)
        if differs is not None:
            raise Unstorable(differs, "does not come back equal in value and type from JSON", _FIX)
        return text

    def _unavailable(self, exc: Exception, kind: type, fix: str) -> tuple[None, str, str | None]:
        # stored in the record and shown in the warning: redacted
        reason = error_text(exc, 300).removeprefix(f"{Unstorable.__name__}: ")
        error = self._wrap(json.dumps({UNAVAILABLE: reason}))
        with self._lock:
            if kind in self._warned:
                return None, error, None
            self._warned.add(kind)
        warning = (
            f"node {self.node!r}: its result cannot be stored: {reason}. The call returns it, "
            "but a repeat call with the same key raises an error saying the effect ran (it "
            f"will not run again). Fix: {fix}"
        )
        return None, error, warning

    def warn(self, warning: str) -> None:
        """Issue the `encode` warning at the first caller outside nodekit."""
        level, frame = 2, sys._getframe(1)
        while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
            "nodekit."
        ):
            level, frame = level + 1, frame.f_back
        warnings.warn(warning, NodekitWarning, stacklevel=level)

    def decode_result(self, text: str) -> Any:
        raw = self._unwrap(text)
        if raw.startswith(PREFIX):
            try:
                return self.tagged.loads(raw[len(PREFIX) :])
            except BadRecord as exc:
                raise IdempotencyCorruptRecord(
                    f"node {self.node!r}: the stored result cannot be decoded "
                    f"({error_text(exc, 300)}); the node was not run and the record was kept",
                    node=self.node,
                ) from None
        try:
            return self._from_json(raw)
        except Exception as exc:
            raise IdempotencyCorruptRecord(
                f"node {self.node!r}: the stored result does not validate as the node's return "
                f"type ({type(exc).__name__}); the node was not run and the record was kept",
                node=self.node,
            ) from None

    # ------------------------------------------------------------------ errors

    def encode_error(self, exc: BaseException) -> str:
        """The error column for a cached business error.

        `listed` names the `cache_errors` entry it matched, so that a subclass (which a replay
        cannot import by name) is rebuilt as the listed type it was caught as.
        """
        listed = next((cls for cls in self.cache_errors if isinstance(exc, cls)), type(exc))
        return self._wrap(
            json.dumps(
                {"type": _name(type(exc)), "listed": _name(listed), "message": str(exc)},
                ensure_ascii=False,
            )
        )

    def decode_error(self, text: str) -> tuple[BaseException | None, str | None]:
        """(exception to re-raise, None) or (None, reason the result is unavailable)."""
        raw = self._unwrap(text)
        try:
            data = json.loads(raw)
        except ValueError:
            raise self._corrupt("error is not JSON") from None
        if not isinstance(data, dict):
            raise self._corrupt("error is not an object")
        if UNAVAILABLE in data:
            return None, str(data[UNAVAILABLE])
        name, listed, message = data.get("type"), data.get("listed"), data.get("message")
        by_name = {_name(cls): cls for cls in self.cache_errors}
        cls = by_name.get(name) if isinstance(name, str) else None
        if cls is None and isinstance(listed, str):
            cls = by_name.get(listed)
        if cls is not None:
            try:
                error = cls(message)
            except Exception:
                error = cls.__new__(cls)
                Exception.__init__(error, message)
            return error, None
        raise self._corrupt(f"stored error type {name!r} is not in cache_errors")

    # ------------------------------------------------------------------ helpers

    def _wrap(self, text: str) -> str:
        return self.codec.encode(text) if self.codec is not None else text

    def _unwrap(self, text: str) -> str:
        if self.codec is not None:
            try:
                return str(self.codec.decode(text))
            except Exception:
                raise self._corrupt("codec could not decode it") from None
        return text

    def _corrupt(self, why: str) -> IdempotencyCorruptRecord:
        return IdempotencyCorruptRecord(
            f"node {self.node!r}: the stored record cannot be decoded ({why}); the node was not "
            "run and the record was kept",
            node=self.node,
        )


_FIX = (
    "return a JSON-friendly type (dict, list, str, int, Decimal, datetime, Enum, dataclass, "
    "pydantic model, ...), defined at module level or named in the return annotation"
)


def _name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
