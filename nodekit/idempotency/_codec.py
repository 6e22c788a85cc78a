"""Stored results as JSON through the node's return type; never pickle: a record is data.

A result is encoded with a pydantic `TypeAdapter` of the return annotation, so a replay is
equal in value *and type* to the first result (`None`, `0`, `False`, `""`, `[]`, models and
dataclasses rebuilt). Without an annotation, a result is stored only if it survives the round
trip unchanged in value and type; otherwise the record says "completed, result unavailable"
(the effect ran and will not run again). Anything undecodable is an `IdempotencyCorruptRecord`,
never "absent".
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from .._errors import ConfigError, IdempotencyCorruptRecord
from .._redact import error_text

__all__ = ["UNAVAILABLE", "ResultCodec"]

UNAVAILABLE = "unavailable"


class ResultCodec:
    def __init__(
        self, annotation: Any, node: str, codec: Any, cache_errors: tuple[type[BaseException], ...]
    ) -> None:
        from pydantic import TypeAdapter

        self.node = node
        self.codec = codec
        self.cache_errors = cache_errors
        self.annotated = annotation is not inspect.Signature.empty
        target = annotation if self.annotated else Any
        try:
            self.adapter: Any = TypeAdapter(target)
            # pydantic-core's own entry points: TypeAdapter's wrappers cost a few µs a call
            self._to_json = self.adapter.serializer.to_json
            self._from_json = self.adapter.validator.validate_json
            if self.annotated:
                self.adapter.json_schema(mode="serialization")
        except Exception as exc:
            raise ConfigError(
                f"node {node!r}: its return type {annotation!r} cannot be stored as JSON, so "
                f"its result could not be replayed ({type(exc).__name__}: {exc}). Return a "
                "JSON-friendly type (pydantic model, dataclass, dict, list, str, int, ...)",
                node=node,
                option="return type",
            ) from exc

    # ------------------------------------------------------------------ results

    def encode_result(self, value: Any) -> tuple[str | None, str | None]:
        """(result, error) columns for a successful value: the error column says unavailable."""
        try:
            # A value that does not match the declared type would be stored, then fail every
            # replay as "corrupt": prove here that it decodes, as a replay would decode it.
            # (`warnings=False`, not "none": the same, but pydantic-core parses the string
            # form slowly, about as long as the serialization itself.)
            raw = self._to_json(value, warnings=False)
            back = self._from_json(raw)
            text = raw.decode("utf-8")
            if back != value or (not self.annotated and type(back) is not type(value)):
                raise TypeError(f"{type(value).__qualname__} does not survive JSON unchanged")
        except Exception as exc:
            reason = error_text(exc, 300)  # stored in the record: redacted
            return None, self._wrap(json.dumps({UNAVAILABLE: reason}))
        return self._wrap(text), None

    def decode_result(self, text: str) -> Any:
        raw = self._unwrap(text)
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


def _name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
