"""Shared state in a `PostgresStore`: one row per primitive, in the store's schema.

Table ``nodekit_resilience (kind, name, doc, tat)``, created on first use under the store's
advisory DDL lock (`_pgsql.DDL_LOCK`), so many processes may start at once. A breaker's or
a bulkhead's step is one transaction holding the row (``SELECT … FOR UPDATE``, the rule in
Python (`_rules`), ``UPDATE`` only if the document changed); a rate limit's GCRA step is one
statement on `tat` (``INSERT … ON CONFLICT DO UPDATE … WHERE <fits the budget>``), decided
by PostgreSQL under the row lock. Time is ``clock_timestamp()`` unless the store has an
injected clock. Connections are the store's pools (`PostgresStore._run` / `_arun`): a
connection broken mid-step is replaced and the step sent once more.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ..idempotency._pgsql import DDL_LOCK
from ._state import LimiterSettings

__all__ = ["PostgresCell", "PostgresLimiter"]

T = TypeVar("T")
Doc = dict[str, Any]

_NOW = "COALESCE(%(now)s::float8, extract(epoch from clock_timestamp())::float8)"
_READY: weakref.WeakSet[Any] = weakref.WeakSet()  # stores whose table exists


class _SQL:
    """The statements, composed once per store with its quoted identifiers."""

    def __init__(self, schema: str | None) -> None:
        from psycopg import sql

        t = (
            sql.Identifier(schema, "nodekit_resilience")
            if schema
            else sql.Identifier("nodekit_resilience")
        )
        self.ddl: list[sql.Composed] = []
        if schema:
            self.ddl.append(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
            )
        self.ddl.append(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (kind text NOT NULL, name text NOT NULL, "
                "doc text NOT NULL DEFAULT '{{}}', tat double precision NOT NULL DEFAULT 0, "
                "PRIMARY KEY (kind, name))"
            ).format(t)
        )
        self.lock = sql.SQL(
            "SELECT doc, " + _NOW + " FROM {} WHERE kind = %(kind)s AND name = %(name)s FOR UPDATE"
        ).format(t)
        self.peek = sql.SQL(
            "SELECT doc, " + _NOW + " FROM {} WHERE kind = %(kind)s AND name = %(name)s"
        ).format(t)
        self.clock = sql.SQL("SELECT " + _NOW)
        self.create = sql.SQL(
            "INSERT INTO {} (kind, name) VALUES (%(kind)s, %(name)s) ON CONFLICT DO NOTHING"
        ).format(t)
        self.write = sql.SQL(
            "UPDATE {} SET doc = %(doc)s WHERE kind = %(kind)s AND name = %(name)s"
        ).format(t)
        # GCRA in one statement. `prev` is the snapshot (for the wait of a refusal only);
        # the upsert's WHERE is evaluated on the row's latest version under its lock.
        self.reserve = sql.SQL(
            "WITH clock AS MATERIALIZED (SELECT " + _NOW + " AS now), "
            "prev AS MATERIALIZED (SELECT tat FROM {t} WHERE kind = 'limit' AND name = %(name)s), "
            "up AS ("
            " INSERT INTO {t} AS r (kind, name, tat)"
            " SELECT 'limit', %(name)s, clock.now + %(interval)s FROM clock"
            " ON CONFLICT (kind, name) DO UPDATE"
            " SET tat = GREATEST(r.tat, (SELECT now FROM clock)) + %(interval)s"
            " WHERE %(budget)s::float8 IS NULL"
            " OR GREATEST(r.tat, (SELECT now FROM clock)) - %(tolerance)s"
            " - (SELECT now FROM clock) <= %(budget)s::float8"
            " RETURNING r.tat) "
            "SELECT clock.now, (SELECT tat FROM up), (SELECT tat FROM prev) FROM clock"
        ).format(t=t)
        self.pause = sql.SQL(
            "WITH clock AS MATERIALIZED (SELECT " + _NOW + " AS now) "
            "INSERT INTO {t} AS r (kind, name, tat)"
            " SELECT 'limit', %(name)s, clock.now + %(seconds)s + %(tolerance)s FROM clock"
            " ON CONFLICT (kind, name) DO UPDATE SET tat = EXCLUDED.tat"
            " WHERE r.tat < EXCLUDED.tat"
        ).format(t=t)


class PostgresCell:
    """`_docs.Cell` on a `PostgresStore`."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.sql = _SQL(store.schema)

    def _now(self) -> float | None:
        clock = self.store._clock
        return None if clock is None else float(clock())

    def _ready(self, conn: Any) -> None:
        if self.store in _READY:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
            for statement in self.sql.ddl:
                conn.execute(statement)
        _READY.add(self.store)

    async def _aready(self, conn: Any) -> None:
        if self.store in _READY:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
            for statement in self.sql.ddl:
                await conn.execute(statement)
        _READY.add(self.store)

    def _params(self, kind: str, name: str) -> dict[str, Any]:
        return {"kind": kind, "name": name, "now": self._now()}

    def step(
        self, kind: str, name: str, fn: Callable[[Doc, float], T], *, bounded: bool = True
    ) -> T:
        params, sql = self._params(kind, name), self.sql

        def op(conn: Any) -> T:
            self._ready(conn)
            # pipelined: BEGIN goes with the SELECT, the UPDATE with the COMMIT (2 round trips)
            with conn.pipeline(), conn.transaction():
                row = conn.execute(sql.lock, params).fetchone()
                if row is None:
                    conn.execute(sql.create, params)
                    row = conn.execute(sql.lock, params).fetchone()
                before, now = row
                doc = json.loads(before)
                answer = fn(doc, now)
                after = json.dumps(doc, separators=(",", ":"))
                if after != before:
                    conn.execute(sql.write, {**params, "doc": after})
                return answer

        result: T = self.store._run(op, bounded=bounded)
        return result

    async def astep(
        self, kind: str, name: str, fn: Callable[[Doc, float], T], *, bounded: bool = True
    ) -> T:
        params, sql = self._params(kind, name), self.sql

        async def op(conn: Any) -> T:
            await self._aready(conn)
            async with conn.pipeline(), conn.transaction():
                row = await (await conn.execute(sql.lock, params)).fetchone()
                if row is None:
                    await conn.execute(sql.create, params)
                    row = await (await conn.execute(sql.lock, params)).fetchone()
                before, now = row
                doc = json.loads(before)
                answer = fn(doc, now)
                after = json.dumps(doc, separators=(",", ":"))
                if after != before:
                    await conn.execute(sql.write, {**params, "doc": after})
                return answer

        result: T = await self.store._arun(op, bounded=bounded)
        return result

    def peek(self, kind: str, name: str) -> tuple[Doc, float]:
        params, sql = self._params(kind, name), self.sql

        def op(conn: Any) -> tuple[Doc, float]:
            self._ready(conn)
            row = conn.execute(sql.peek, params).fetchone()
            if row is None:
                return {}, conn.execute(sql.clock, params).fetchone()[0]
            return json.loads(row[0]), row[1]

        result: tuple[Doc, float] = self.store._run(op, bounded=True)
        return result


class PostgresLimiter:
    """`LimiterBackend` (and async twins): one GCRA statement, one round trip."""

    shared = True

    def __init__(self, cell: PostgresCell, name: str, settings: LimiterSettings) -> None:
        self.cell = cell
        self.name = name
        self.settings = settings
        self.tolerance = (settings.burst - 1) * settings.interval

    def _params(self, budget: float | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "now": self.cell._now(),
            "interval": self.settings.interval,
            "tolerance": self.tolerance,
            "budget": budget,
        }

    def _answer(self, row: Any) -> tuple[bool, float]:
        now, granted_tat, prev = row
        if granted_tat is not None:
            wait = granted_tat - self.settings.interval - self.tolerance - now
            return True, max(wait, 0.0)
        return False, max(max(prev or 0.0, now) - self.tolerance - now, 0.0)

    def reserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        params, cell = self._params(budget), self.cell

        def op(conn: Any) -> tuple[bool, float]:
            cell._ready(conn)
            return self._answer(conn.execute(cell.sql.reserve, params).fetchone())

        result: tuple[bool, float] = cell.store._run(op, bounded=True)
        return result

    async def areserve(self, now: float, budget: float | None) -> tuple[bool, float]:
        params, cell = self._params(budget), self.cell

        async def op(conn: Any) -> tuple[bool, float]:
            await cell._aready(conn)
            return self._answer(await (await conn.execute(cell.sql.reserve, params)).fetchone())

        result: tuple[bool, float] = await cell.store._arun(op, bounded=True)
        return result

    def _pause_params(self, seconds: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "now": self.cell._now(),
            "seconds": float(seconds),
            "tolerance": self.tolerance,
        }

    def pause(self, now: float, seconds: float) -> bool:
        params, cell = self._pause_params(seconds), self.cell

        def op(conn: Any) -> bool:
            cell._ready(conn)
            return bool(conn.execute(cell.sql.pause, params).rowcount == 1)

        result: bool = cell.store._run(op, bounded=False)
        return result

    async def apause(self, now: float, seconds: float) -> bool:
        params, cell = self._pause_params(seconds), self.cell

        async def op(conn: Any) -> bool:
            await cell._aready(conn)
            return bool((await conn.execute(cell.sql.pause, params)).rowcount == 1)

        result: bool = await cell.store._arun(op, bounded=False)
        return result
