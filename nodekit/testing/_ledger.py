"""The ledger: every request a `LocalAPI` received, so tests count effects on the server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Self

from ._routes import matches

__all__ = ["Ledger", "LedgerEntry"]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One request as the server saw it.

    `outcome`: ``"processed"`` (the route ran), ``"replayed"`` (stored response),
    ``"conflict"`` (409), ``"mismatch"`` (422), ``"fault"`` (503/429 before processing) or
    ``"dropped"`` (closed before processing). `effect` is true when the server's state changed
    (see `APIResponse.effect`); `data` says what. `status` is None when no response was sent.
    """

    seq: int
    method: str
    path: str
    idempotency_key: str | None
    status: int | None
    outcome: str
    fault: str | None = None
    effect: bool = False
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LedgerEntry:
        return cls(**values)


class Ledger:
    """The requests a `LocalAPI` received, in order, with queries for the tests.

    A server with routes of its own can subclass it with queries in its own terms (set the
    subclass as the server's `LocalAPI.ledger_type`).
    """

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries = list(entries)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Self:
        """Read a ledger file written by a `LocalAPI` (possibly in another process)."""
        text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
        return cls(
            LedgerEntry.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()
        )

    def append(self, entry: LedgerEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    @property
    def entries(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._entries)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} requests)"

    def find(
        self,
        *,
        method: str | None = None,
        route: str | None = None,
        outcome: str | None = None,
        fault: str | None = None,
        effect: bool | None = None,
    ) -> list[LedgerEntry]:
        """The entries matching every given criterion (`route` as in `FaultPlan.script`)."""
        return [
            entry
            for entry in self.entries
            if (method is None or entry.method == method.upper())
            and (route is None or matches(route, entry.method, entry.path))
            and (outcome is None or entry.outcome == outcome)
            and (fault is None or entry.fault == fault)
            and (effect is None or entry.effect == effect)
        ]

    def keys(self, route: str | None = None) -> list[str | None]:
        """The ``Idempotency-Key`` of every request (to `route`), in order."""
        return [entry.idempotency_key for entry in self.find(route=route)]
