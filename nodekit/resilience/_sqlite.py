"""Shared state in a `SQLiteStore`: one row per primitive, changed in one ``BEGIN IMMEDIATE``.

Table ``nodekit_resilience (kind, name, doc)`` in the store's file, created on first use:
`doc` is the primitive's JSON document (`_rules`; a rate limit's is ``{"t": tat}``). Every
step is one transaction on the store's connection for this thread, under its writer lock
(`SQLiteStore._tx`): read the row, apply the rule, write it back if it changed. Time is the
store's clock (the wall clock unless one is injected), the same in every process. The async
twins run the step in the store's worker threads.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ._rules import gcra_pause, gcra_reserve
from ._state import LimiterSettings

__all__ = ["SQLiteCell", "SQLiteLimiter"]

T = TypeVar("T")
Doc = dict[str, Any]

TABLE = "nodekit_resilience"
_DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (kind TEXT NOT NULL, name TEXT NOT NULL, "
    "doc TEXT NOT NULL, PRIMARY KEY (kind, name)) WITHOUT ROWID"
)
_READY: weakref.WeakSet[Any] = weakref.WeakSet()  # stores whose table exists
_READY_LOCK = threading.Lock()


def _dump(doc: Doc) -> str:
    return json.dumps(doc, separators=(",", ":"))


class SQLiteCell:
    """`_docs.Cell` on a `SQLiteStore`."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def _ready(self) -> None:
        store = self.store
        if store in _READY:
            return
        with _READY_LOCK:
            if store not in _READY:
                with store._tx() as conn:
                    conn.execute(_DDL)
                _READY.add(store)

    def step(
        self, kind: str, name: str, fn: Callable[[Doc, float], T], *, bounded: bool = True
    ) -> T:
        self._ready()
        store = self.store
        with store._tx() as conn:
            row = conn.execute(
                f"SELECT doc FROM {TABLE} WHERE kind = ? AND name = ?", (kind, name)
            ).fetchone()
            before = row[0] if row else None
            doc = json.loads(before) if before else {}
            answer = fn(doc, store._clock())
            after = _dump(doc)
            if after != before:
                conn.execute(
                    f"INSERT OR REPLACE INTO {TABLE} (kind, name, doc) VALUES (?, ?, ?)",
                    (kind, name, after),
                )
            return answer

    async def astep(
        self, kind: str, name: str, fn: Callable[[Doc, float], T], *, bounded: bool = True
    ) -> T:
        result: T = await self.store._run(self.step, kind, name, fn)
        return result

    def peek(self, kind: str, name: str) -> tuple[Doc, float]:
        self._ready()
        store = self.store
        with store._use() as conn:
            row = conn.execute(
                f"SELECT doc FROM {TABLE} WHERE kind = ? AND name = ?", (kind, name)
            ).fetchone()
        return (json.loads(row[0]) if row else {}), store._clock()


class SQLiteLimiter:
    """`LimiterBackend` (and async twins): one GCRA step per ``BEGIN IMMEDIATE``."""

    shared = True

    def __init__(self, cell: SQLiteCell, name: str, settings: LimiterSettings) -> None:
        self.cell = cell
        self.name = name
        self.settings = settings
        self.tolerance = (settings.burst - 1) * settings.interval

    def _reserve(self, budget: float | None) -> Callable[[Doc, float], tuple[bool, float]]:
        interval, tolerance = self.settings.interval, self.tolerance

        def rule(doc: Doc, now: float) -> tuple[bool, float]:
            granted, wait, tat = gcra_reserve(doc.get("t", 0.0), now, interval, tolerance, budget)
            if granted:
                doc["t"] = tat
            return granted, wait

        return rule

    def _pause(self, seconds: float) -> Callable[[Doc, float], bool]:
        tolerance = self.tolerance

        def rule(doc: Doc, now: float) -> bool:
            tat = gcra_pause(doc.get("t", 0.0), now, seconds, tolerance)
            if tat is None:
                return False
            doc["t"] = tat
            return True

        return rule

    def reserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        return self.cell.step("limit", self.name, self._reserve(budget))

    async def areserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        return await self.cell.astep("limit", self.name, self._reserve(budget))

    def pause(self, now: float, seconds: float) -> bool:
        return self.cell.step("limit", self.name, self._pause(seconds), bounded=False)

    async def apause(self, now: float, seconds: float) -> bool:
        return await self.cell.astep("limit", self.name, self._pause(seconds), bounded=False)
