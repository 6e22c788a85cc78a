"""The run log of a PostgresStore: a table ``{table}_runs`` beside its records."""

from __future__ import annotations

from typing import Any

from ...idempotency._store import Record
from ._model import _SQL_COLUMNS, CANCELLED, RUNNING, RunInfo, _Backend, _info, _where


class _Postgres(_Backend):
    def __init__(self, store: Any) -> None:
        from psycopg import sql

        from ...idempotency._pgsql import COLUMNS, DDL_LOCK

        self._keep(store)
        schema, table = store.schema, f"{store.table}_runs"

        def name(obj: str) -> sql.Identifier:
            return sql.Identifier(schema, obj) if schema else sql.Identifier(obj)

        t = name(table)
        records = name(store.table)
        self.tname = t.as_string()
        create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (flow text NOT NULL, run_id text NOT NULL, "
            "status text NOT NULL, started_at double precision NOT NULL, "
            "ended_at double precision, updated_at double precision NOT NULL, "
            "lease_expires_at double precision NOT NULL, holder text, nodes text NOT NULL, "
            "events text NOT NULL DEFAULT '', PRIMARY KEY (flow, run_id))"
        ).format(t)
        index = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (started_at)").format(
            sql.Identifier(f"{table}_started"), t
        )
        self.ddl = [create.as_string(), index.as_string()]
        self.lock_id = DDL_LOCK
        f = {"t": t}
        self.begin_sql = (
            sql.SQL(
                "INSERT INTO {t} AS r (" + _SQL_COLUMNS + ", events) VALUES (%(flow)s, "
                "%(run_id)s, %(running)s, %(now)s, NULL, %(now)s, %(lease)s, %(holder)s, "
                "%(nodes)s, '') ON CONFLICT (flow, run_id) DO UPDATE SET status = %(running)s, "
                "ended_at = NULL, updated_at = %(now)s, lease_expires_at = %(lease)s, "
                "holder = %(holder)s, nodes = %(nodes)s WHERE r.status <> %(cancelled)s "
                "RETURNING (xmax = 0) AS inserted"
            )
            .format(**f)
            .as_string()
        )
        self.status_sql = (
            sql.SQL("SELECT status FROM {t} WHERE flow = %(flow)s AND run_id = %(run_id)s")
            .format(**f)
            .as_string()
        )
        self.append_sql = (
            sql.SQL(
                "UPDATE {t} SET events = events || %(lines)s, updated_at = %(now)s, "
                "lease_expires_at = %(lease)s, ended_at = CASE WHEN %(status)s::text IS NULL "
                "OR status = %(cancelled)s THEN ended_at ELSE %(now)s END, "
                "status = CASE WHEN %(status)s::text IS NULL OR status = %(cancelled)s "
                "THEN status ELSE %(status)s END "
                "WHERE flow = %(flow)s AND run_id = %(run_id)s RETURNING status"
            )
            .format(**f)
            .as_string()
        )
        self.set_sql = (
            sql.SQL(
                "UPDATE {t} SET status = %(status)s WHERE flow = %(flow)s AND run_id = %(run_id)s"
            )
            .format(**f)
            .as_string()
        )
        self.delete_sql = (
            sql.SQL("DELETE FROM {t} WHERE flow = %(flow)s AND run_id = %(run_id)s")
            .format(**f)
            .as_string()
        )
        self.select = sql.SQL("SELECT " + _SQL_COLUMNS + ", {} FROM {}")
        self.t = t
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
        self.stats_sql = (
            sql.SQL("SELECT namespace, state, COUNT(*) FROM {} GROUP BY namespace, state")
            .format(records)
            .as_string()
        )
        self.find_sql = (
            sql.SQL(
                "SELECT {} FROM {} WHERE key_digest LIKE %s ORDER BY namespace, scope, key_digest"
            )
            .format(cols, records)
            .as_string()
        )
        # the table is made on first use, on the connection of that use: an async run's on
        # its loop's pool (no sync pool opened, no DDL blocking the loop), else the sync pool's
        self.ready = False

    def _create(self, conn: Any) -> None:
        if self.ready:
            return
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self.tname,)).fetchone()
        if not (row and row[0]):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_id,))
                for statement in self.ddl:
                    conn.execute(statement)
        self.ready = True

    async def _acreate(self, conn: Any) -> None:
        if self.ready:
            return
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self.tname,))
        row = await cur.fetchone()
        if not (row and row[0]):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_id,))
                for statement in self.ddl:
                    await conn.execute(statement)
        self.ready = True

    def _do(self, statement: str, params: Any, fetch: str = "") -> Any:
        def op(conn: Any) -> Any:
            self._create(conn)
            cur = conn.execute(statement, params)
            if fetch == "one":
                return cur.fetchone()
            if fetch == "all":
                return cur.fetchall()
            return cur.rowcount

        return self.store._run(op, bounded=False)

    def begin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        params = {
            "flow": flow,
            "run_id": run_id,
            "now": now,
            "lease": lease,
            "holder": holder,
            "nodes": nodes,
            "running": RUNNING,
            "cancelled": CANCELLED,
        }

        def op(conn: Any) -> str | None:
            self._create(conn)
            with conn.transaction():
                before = conn.execute(self.status_sql, params).fetchone()
                conn.execute(self.begin_sql, params).fetchone()
            return None if before is None else str(before[0])

        result: str | None = self.store._run(op, bounded=False)
        return result

    def append(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        params = _append_params(flow, run_id, lines, now, lease, status)
        row = self._do(self.append_sql, params, "one")
        return None if row is None else str(row[0])

    # async twins: on the store's pool of the running loop

    native_async = True

    def _begin_params(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> dict[str, Any]:
        return {
            "flow": flow,
            "run_id": run_id,
            "now": now,
            "lease": lease,
            "holder": holder,
            "nodes": nodes,
            "running": RUNNING,
            "cancelled": CANCELLED,
        }

    async def abegin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        params = self._begin_params(flow, run_id, now, lease, holder, nodes)

        async def op(conn: Any) -> str | None:
            await self._acreate(conn)
            async with conn.transaction():
                cur = await conn.execute(self.status_sql, params)
                before = await cur.fetchone()
                cur = await conn.execute(self.begin_sql, params)
                await cur.fetchone()
            return None if before is None else str(before[0])

        result: str | None = await self.store._arun(op, bounded=False)
        return result

    async def aappend(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        params = _append_params(flow, run_id, lines, now, lease, status)

        async def op(conn: Any) -> Any:
            await self._acreate(conn)
            cur = await conn.execute(self.append_sql, params)
            return await cur.fetchone()

        row = await self.store._arun(op, bounded=False)
        return None if row is None else str(row[0])

    def runs(
        self,
        *,
        flow: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        events: bool = False,
    ) -> list[RunInfo]:
        from psycopg import sql

        where, params = _where(flow, run_id, since, "%s")
        statement = (
            self.select.format(sql.SQL("events" if events else "NULL"), self.t).as_string()
            + where
            + " ORDER BY started_at"
        )
        rows = self._do(statement, params, "all")
        return [_info(row, events) for row in rows]

    def set_status(self, flow: str, run_id: str, status: str) -> bool:
        params = {"flow": flow, "run_id": run_id, "status": status}
        return bool(self._do(self.set_sql, params) == 1)

    def delete(self, flow: str, run_id: str) -> bool:
        return bool(self._do(self.delete_sql, {"flow": flow, "run_id": run_id}) == 1)

    def stats(self) -> dict[tuple[str, str], int]:
        rows = self._do(self.stats_sql, (), "all")
        return {(str(ns), str(state)): int(count) for ns, state, count in rows}

    def find(self, prefix: str) -> list[Record]:
        from ...idempotency._base import checked_record

        rows = self._do(self.find_sql, (prefix + "%",), "all")
        return [checked_record(row, self.store._label) for row in rows]


def _append_params(
    flow: str, run_id: str, lines: str, now: float, lease: float, status: str | None
) -> dict[str, Any]:
    return {
        "flow": flow,
        "run_id": run_id,
        "lines": lines,
        "now": now,
        "lease": lease,
        "status": status,
        "cancelled": CANCELLED,
    }
