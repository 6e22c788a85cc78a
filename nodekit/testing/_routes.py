"""What a `LocalAPI` route is: a ``"METHOD /path/{param}"`` pattern, a request, a response."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

__all__ = ["APIRequest", "APIResponse", "Handler", "Route", "matches"]


def matches(route: str, method: str, path: str) -> bool:
    """``"POST /charges"`` or ``"/charges"`` (any method); a route matches its sub-paths too.

    This is the loose form faults, gates and ledger queries select requests by; serving uses
    `Route`, which matches a path exactly.
    """
    want_method, _, prefix = route.rpartition(" ")
    if want_method and want_method.upper() != method:
        return False
    prefix = prefix.rstrip("/") or "/"
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class APIRequest:
    """One request as a route handler sees it, its body read in full.

    `params` holds the route's ``{name}`` segments; `query` every value of each query
    parameter; `headers` the header names lower-cased (the last value of a repeated header).
    """

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body parsed as JSON (an empty body is ``None``); raises `ValueError` if it is not."""
        return json.loads(self.body or b"null")

    def arg(self, name: str, default: str) -> str:
        """The first value of query parameter `name`, or `default`."""
        values = self.query.get(name)
        return values[0] if values else default


@dataclass(frozen=True, slots=True)
class APIResponse:
    """A route handler's answer, sent as JSON (`body` None: an empty body).

    `effect` says the server's state changed (a charge made, a message delivered): the ledger
    counts effects, and a retried request that makes a second one is the bug tests look for.
    `data` is what the ledger records about the effect. A response with a status >= 500 is
    not stored for replay under the request's ``Idempotency-Key``.
    """

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    effect: bool = False
    data: Mapping[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


Handler: TypeAlias = Callable[[APIRequest], APIResponse]


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled ``"METHOD /path/{param}"`` pattern (no method: any) and its handler."""

    spec: str
    method: str | None
    segments: tuple[str, ...]
    handler: Handler

    @classmethod
    def parse(cls, spec: str, handler: Handler) -> Route:
        method, _, pattern = spec.strip().rpartition(" ")
        if not pattern.startswith("/"):
            raise ValueError(f"a route is 'METHOD /path' or '/path', got {spec!r}")
        segments = tuple(part for part in pattern.split("/") if part)
        key = f"{method.upper()} /{'/'.join(segments)}".lstrip()
        return cls(key, method.upper() or None, segments, handler)

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The path parameters when this route serves ``method path``, else None."""
        if self.method is not None and self.method != method:
            return None
        parts = [part for part in path.split("/") if part]
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, parts, strict=True):
            if want.startswith("{") and want.endswith("}"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params
