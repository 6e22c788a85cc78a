"""`PostgresStore`: idempotency records in a PostgreSQL table, shared by processes and hosts.

`acquire` is one statement: ``INSERT … ON CONFLICT DO UPDATE … WHERE <acquirable>`` applies
the same decision as every other store on the row's latest version (row-locked by PostgreSQL),
and the same statement reads the record as it stood, so both outcomes cost one round trip
(and a replay writes nothing).
`complete`, `release` and `renew` are single ``UPDATE``/``DELETE`` statements conditional on
``(owner_token, IN_PROGRESS)``. Time is the server's (``clock_timestamp()``) unless a clock is
injected. The schema, table and ``nodekit_meta`` are created on first use under an advisory
lock, so many processes may start at once.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from ._base import Closing, can_acquire, new_token
from ._store import (
    COMPLETED,
    FORMAT_VERSION,
    IN_PROGRESS,
    Acquisition,
    Clock,
    Record,
    RecordKey,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresStore"]

_COLUMNS = (
    "namespace",
    "scope",
    "key_digest",
    "fingerprint",
    "state",
    "owner_token",
    "epoch",
    "lease_expires_at",
    "created_at",
    "expires_at",
    "result",
    "error",
    "format_version",
)

# one lock for every nodekit DDL in the database: concurrent CREATE … IF NOT EXISTS can fail
_DDL_LOCK = 0x6E6F64656B6974  # "nodekit"

# the store's time: the injected clock's, else the server's
_NOW = "COALESCE(%(now)s::float8, extract(epoch from clock_timestamp())::float8)"

_KEY = "namespace = %(namespace)s AND scope = %(scope)s AND key_digest = %(digest)s"

_HOLDS = _KEY + " AND owner_token = %(token)s AND state = %(in_progress)s"


class _Statements:
    """The store's SQL, composed once with its quoted identifiers."""

    def __init__(self, schema: str | None, table: str) -> None:
        from psycopg import sql

        def name(obj: str) -> sql.Identifier:
            return sql.Identifier(schema, obj) if schema else sql.Identifier(obj)

        t = name(table)
        meta = name("nodekit_meta")
        # to_regclass() takes the names as text, quoted like SQL
        self.names = (t.as_string(), meta.as_string())
        self.exists = sql.SQL("SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL")
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
        self.ddl: list[sql.Composed] = []
        if schema:
            self.ddl.append(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
            )
        self.ddl += [
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                "namespace text NOT NULL, scope text NOT NULL, key_digest text NOT NULL, "
                "fingerprint text NOT NULL, state text NOT NULL, owner_token text NOT NULL, "
                "epoch bigint NOT NULL, lease_expires_at double precision NOT NULL, "
                "created_at double precision NOT NULL, expires_at double precision NOT NULL, "
                "result text, error text, format_version integer NOT NULL, "
                "PRIMARY KEY (namespace, scope, key_digest))"
            ).format(t),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (expires_at)").format(
                sql.Identifier(f"{table}_expires"), t
            ),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, value text NOT NULL)"
            ).format(meta),
            sql.SQL(
                "INSERT INTO {} (name, value) VALUES ('format_version', {}) "
                "ON CONFLICT (name) DO NOTHING"
            ).format(meta, sql.Literal(str(FORMAT_VERSION))),
        ]
        # `prev` is the record as the statement found it (its snapshot). If the snapshot
        # already refuses, nothing is written (a replay is a plain read, no row lock);
        # otherwise `up` upserts, and PostgreSQL evaluates its WHERE on the row's latest
        # version under the row lock, so two callers never both acquire.
        self.acquire = sql.SQL(
            "WITH clock AS MATERIALIZED (SELECT " + _NOW + " AS now), "
            "prev AS MATERIALIZED (SELECT {cols} FROM {t} WHERE " + _KEY + "), "
            "up AS ("
            " INSERT INTO {t} AS r ({cols})"
            " SELECT %(namespace)s, %(scope)s, %(digest)s, %(fingerprint)s, %(in_progress)s,"
            " %(token)s, 1, clock.now + %(lease)s, clock.now, clock.now + %(span)s, NULL, NULL,"
            " %(format_version)s FROM clock"
            " WHERE NOT EXISTS (SELECT 1 FROM prev p WHERE NOT ("
            " p.expires_at <= clock.now OR (p.state = %(in_progress)s"
            " AND p.lease_expires_at <= clock.now AND p.fingerprint = %(fingerprint)s"
            " AND %(takeover)s)))"
            " ON CONFLICT (namespace, scope, key_digest) DO UPDATE SET"
            " fingerprint = EXCLUDED.fingerprint, state = EXCLUDED.state,"
            " owner_token = EXCLUDED.owner_token, epoch = r.epoch + 1,"
            " lease_expires_at = EXCLUDED.lease_expires_at, created_at = EXCLUDED.created_at,"
            " expires_at = EXCLUDED.expires_at, result = NULL, error = NULL,"
            " format_version = EXCLUDED.format_version"
            " WHERE r.expires_at <= EXCLUDED.created_at"
            " OR (r.state = %(in_progress)s AND r.lease_expires_at <= EXCLUDED.created_at"
            " AND r.fingerprint = EXCLUDED.fingerprint AND %(takeover)s)"
            " RETURNING {cols}) "
            "SELECT true, clock.now, up.* FROM up, clock "
            "UNION ALL SELECT false, clock.now, prev.* FROM prev, clock"
        ).format(cols=cols, t=t)
        self.complete = sql.SQL(
            "UPDATE {t} SET state = %(completed)s, result = %(result)s, error = %(error)s,"
            " expires_at = " + _NOW + " + %(ttl)s WHERE " + _HOLDS
        ).format(t=t)
        self.release = sql.SQL("DELETE FROM {t} WHERE " + _HOLDS).format(t=t)
        self.renew = sql.SQL(
            "WITH clock AS MATERIALIZED (SELECT " + _NOW + " AS now) "
            "UPDATE {t} SET lease_expires_at = clock.now + %(lease)s,"
            " expires_at = GREATEST(expires_at, clock.now + %(lease)s) FROM clock WHERE " + _HOLDS
        ).format(t=t)
        self.get = sql.SQL("SELECT {cols} FROM {t} WHERE " + _KEY).format(cols=cols, t=t)
        self.delete = sql.SQL("DELETE FROM {t} WHERE " + _KEY).format(t=t)
        self.put = sql.SQL(
            "INSERT INTO {t} ({cols}) VALUES ({values}) ON CONFLICT (namespace, scope, key_digest)"
            " DO UPDATE SET {sets}"
        ).format(
            t=t,
            cols=cols,
            values=sql.SQL(", ").join(sql.Placeholder(c) for c in _COLUMNS),
            sets=sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                for c in _COLUMNS[3:]
            ),
        )


def _key(key: RecordKey) -> dict[str, Any]:
    return {"namespace": key.namespace, "scope": key.scope, "digest": key.digest}


def _answer(rows: Sequence[Sequence[Any]], fingerprint: str, takeover: bool) -> Acquisition | None:
    """The acquisition the statement's rows mean, or None: ask again.

    Rows are ``(acquired, now, *record)``: the upserted record if this caller acquired, and
    the record as the statement's snapshot found it. That snapshot can be older than the
    version the upsert was decided on (a concurrent takeover, completion or release); a
    refusal whose record would have been acquirable, or a vanished record, is such a race,
    and asking again sees the newer version.
    """
    mine = prev = None
    now = rows[0][1] if rows else 0.0
    for acquired, _, *fields in rows:
        if acquired:
            mine = Record(*fields)
        else:
            prev = Record(*fields)
    if mine is not None:
        took = (
            prev is not None
            and prev.epoch + 1 == mine.epoch
            and prev.state == IN_PROGRESS
            and prev.expires_at > now
        )
        return Acquisition(True, mine, takeover=took, now=now)
    if prev is None or can_acquire(prev, fingerprint, now, takeover)[0]:
        return None
    return Acquisition(False, prev, now=now)


class PostgresStore(Closing):
    """Idempotency records in a PostgreSQL table (created, with its schema, if missing).

    `dsn` is a libpq URL or conninfo string. The sync methods use one autocommit connection
    per thread; the async ones one `psycopg.AsyncConnection` per event loop, so they never
    block it. Connections open lazily and reopen after a failure. `schema` (default: the
    connection's search path) and `table` place the records. `clock` is injectable (tests);
    otherwise time is the server's. psycopg errors propagate.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        table: str = "nodekit_idempotency",
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ConfigError(f"PostgresStore needs a DSN string, got {dsn!r}", option="dsn")
        for option, value in (("schema", schema), ("table", table)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(
                    f"PostgresStore {option} must be a non-empty string, got {value!r}",
                    option=option,
                )
        self.dsn = dsn
        self.schema = schema
        self.table = table
        self._clock = clock
        self._sql = _Statements(schema, table)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sync_conns: list[psycopg.Connection[Any]] = []
        self._async_conns: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, psycopg.AsyncConnection[Any]
        ] = weakref.WeakKeyDictionary()
        self._async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._ready = False
        self._closed = False

    def __repr__(self) -> str:
        try:
            from psycopg.conninfo import conninfo_to_dict

            info = conninfo_to_dict(self.dsn)
        except Exception:
            where = "?"
        else:
            where = " ".join(
                f"{k}={v}" for k, v in info.items() if k in ("host", "port", "dbname", "user")
            )
        table = f"{self.schema}.{self.table}" if self.schema else self.table
        return f"PostgresStore({where!r}, table={table!r})"

    # ------------------------------------------------------------------ connections

    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        import psycopg

        if self._closed:
            raise RuntimeError("PostgresStore is closed")
        conn = psycopg.connect(self.dsn, autocommit=True)
        with self._lock:
            self._sync_conns = [c for c in self._sync_conns if not c.closed]
            self._sync_conns.append(conn)
        self._local.conn = conn
        if not self._ready:
            row = conn.execute(self._sql.exists, self._sql.names).fetchone()
            if not (row and row[0]):
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
                    for statement in self._sql.ddl:
                        conn.execute(statement)
            self._ready = True
        return conn

    async def _aconn(self) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        conn = self._async_conns.get(loop)
        if conn is not None and not conn.closed:
            return conn
        lock = self._async_locks.setdefault(loop, asyncio.Lock())
        async with lock:
            conn = self._async_conns.get(loop)
            if conn is not None and not conn.closed:
                return conn
            import psycopg

            if self._closed:
                raise RuntimeError("PostgresStore is closed")
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            if not self._ready:
                try:
                    cur = await conn.execute(self._sql.exists, self._sql.names)
                    row = await cur.fetchone()
                    if not (row and row[0]):
                        async with conn.transaction():
                            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
                            for statement in self._sql.ddl:
                                await conn.execute(statement)
                except BaseException:
                    await conn.close()
                    raise
                self._ready = True
            self._async_conns[loop] = conn
            return conn

    def _now(self) -> float | None:
        return None if self._clock is None else float(self._clock())

    def _acquire_params(
        self,
        key: RecordKey,
        fingerprint: str,
        lease: float,
        ttl: float,
        takeover: bool,
        token: str | None,
    ) -> dict[str, Any]:
        return {
            **_key(key),
            "now": self._now(),
            "fingerprint": fingerprint,
            "token": token or new_token(),
            "lease": float(lease),
            "span": float(max(ttl, lease)),
            "takeover": bool(takeover),
            "in_progress": IN_PROGRESS,
            "format_version": FORMAT_VERSION,
        }

    def _complete_params(
        self, key: RecordKey, token: str, result: str | None, error: str | None, ttl: float
    ) -> dict[str, Any]:
        return {
            **_key(key),
            "now": self._now(),
            "token": token,
            "in_progress": IN_PROGRESS,
            "completed": COMPLETED,
            "result": result,
            "error": error,
            "ttl": float(ttl),
        }

    def _holds_params(self, key: RecordKey, token: str, **extra: Any) -> dict[str, Any]:
        return {**_key(key), "token": token, "in_progress": IN_PROGRESS, **extra}

    # ------------------------------------------------------------------ sync protocol

    def acquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
    ) -> Acquisition:
        conn = self._conn()
        while True:
            params = self._acquire_params(key, fingerprint, lease, ttl, takeover, token)
            rows = conn.execute(self._sql.acquire, params).fetchall()
            answer = _answer(rows, fingerprint, takeover)
            if answer is not None:
                return answer

    def complete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        params = self._complete_params(key, token, result, error, ttl)
        return self._conn().execute(self._sql.complete, params).rowcount == 1

    def release(self, key: RecordKey, token: str) -> bool:
        params = self._holds_params(key, token)
        return self._conn().execute(self._sql.release, params).rowcount == 1

    def renew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        params = self._holds_params(key, token, now=self._now(), lease=float(lease))
        return self._conn().execute(self._sql.renew, params).rowcount == 1

    def get(self, key: RecordKey) -> Record | None:
        row = self._conn().execute(self._sql.get, _key(key)).fetchone()
        return None if row is None else Record(*row)

    def delete(self, key: RecordKey) -> bool:
        return self._conn().execute(self._sql.delete, _key(key)).rowcount == 1

    def close(self) -> None:
        """Close the sync connections (async ones close in `aclose`, in their loop)."""
        with self._lock:
            self._closed = True
            conns, self._sync_conns = self._sync_conns, []
        for conn in conns:
            with suppress(Exception):
                conn.close()
        self._local = threading.local()

    # ------------------------------------------------------------------ async protocol

    async def aacquire(
        self,
        key: RecordKey,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool = True,
        token: str | None = None,
    ) -> Acquisition:
        conn = await self._aconn()
        while True:
            params = self._acquire_params(key, fingerprint, lease, ttl, takeover, token)
            cur = await conn.execute(self._sql.acquire, params)
            answer = _answer(await cur.fetchall(), fingerprint, takeover)
            if answer is not None:
                return answer

    async def acomplete(
        self, key: RecordKey, token: str, *, result: str | None, error: str | None, ttl: float
    ) -> bool:
        params = self._complete_params(key, token, result, error, ttl)
        conn = await self._aconn()
        return (await conn.execute(self._sql.complete, params)).rowcount == 1

    async def arelease(self, key: RecordKey, token: str) -> bool:
        params = self._holds_params(key, token)
        conn = await self._aconn()
        return (await conn.execute(self._sql.release, params)).rowcount == 1

    async def arenew(self, key: RecordKey, token: str, *, lease: float) -> bool:
        params = self._holds_params(key, token, now=self._now(), lease=float(lease))
        conn = await self._aconn()
        return (await conn.execute(self._sql.renew, params)).rowcount == 1

    async def aget(self, key: RecordKey) -> Record | None:
        conn = await self._aconn()
        row = await (await conn.execute(self._sql.get, _key(key))).fetchone()
        return None if row is None else Record(*row)

    async def adelete(self, key: RecordKey) -> bool:
        conn = await self._aconn()
        return (await conn.execute(self._sql.delete, _key(key))).rowcount == 1

    async def aclose(self) -> None:
        """Close this loop's async connection and the sync ones.

        An async connection belongs to the loop that opened it; one opened in another loop
        must be closed there (call `aclose` from it).
        """
        conn = self._async_conns.pop(asyncio.get_running_loop(), None)
        if conn is not None:
            await conn.close()
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------------ tests

    def _put(self, record: Record) -> None:
        """Write a record as is (tests use it to plant corrupt or foreign records)."""
        params = {c: getattr(record, c) for c in _COLUMNS}
        self._conn().execute(self._sql.put, params)
