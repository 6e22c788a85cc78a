"""`PostgresStore`'s SQL: its statements, composed once with quoted identifiers, and what
the acquire statement's rows mean.

`acquire` is one statement: ``INSERT … ON CONFLICT DO UPDATE … WHERE <acquirable>`` applies
the same decision as every other store on the row's latest version (row-locked by PostgreSQL),
and the same statement reads the record as it stood, so both outcomes cost one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._base import can_acquire, checked_record
from ._store import FORMAT_VERSION, IN_PROGRESS, Acquisition, RecordKey

__all__ = ["COLUMNS", "DDL_LOCK", "Statements", "decide", "key_params"]

COLUMNS = (
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
    "holder",
)

# one lock for every nodekit DDL in the database: concurrent CREATE … IF NOT EXISTS can fail
DDL_LOCK = 0x6E6F64656B6974  # "nodekit"

# the store's time: the injected clock's, else the server's
_NOW = "COALESCE(%(now)s::float8, extract(epoch from clock_timestamp())::float8)"

_KEY = "namespace = %(namespace)s AND scope = %(scope)s AND key_digest = %(digest)s"

_HOLDS = _KEY + " AND owner_token = %(token)s AND state = %(in_progress)s"


def _sane(row: str) -> str:
    """SQL: `row` is a record nodekit could have written (what `checked_record` accepts).

    Only a sane row may be acquired: a corrupt one is returned untouched, and reading it
    raises. NaN compares greater than every number in PostgreSQL, ``'Infinity'`` included.
    """
    times = " AND ".join(
        f"{row}.{c} > '-Infinity' AND {row}.{c} < 'Infinity'"
        for c in ("lease_expires_at", "created_at", "expires_at")
    )
    return (
        f"({row}.state IN (%(in_progress)s, %(completed)s) AND {row}.epoch >= 1"
        f" AND {row}.format_version BETWEEN 1 AND %(format_version)s"
        f" AND {row}.owner_token <> '' AND {row}.fingerprint <> '' AND {times})"
    )


class Statements:
    """The store's SQL, composed once with its quoted identifiers."""

    def __init__(self, schema: str | None, table: str) -> None:
        from psycopg import sql

        def name(obj: str) -> sql.Identifier:
            return sql.Identifier(schema, obj) if schema else sql.Identifier(obj)

        t = name(table)
        meta = name("nodekit_meta")
        # to_regclass() takes the names as text, quoted like SQL
        self.names = (t.as_string(), meta.as_string(), t.as_string())
        # ready: both tables exist, and the records table has every column this nodekit
        # writes (a table made by an older one gets them added, under the DDL lock)
        self.exists = sql.SQL(
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s)"
            " AND attname = 'holder' AND NOT attisdropped)"
        )
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
        ddl: list[sql.Composed] = []
        if schema:
            ddl.append(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        ddl += [
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                "namespace text NOT NULL, scope text NOT NULL, key_digest text NOT NULL, "
                "fingerprint text NOT NULL, state text NOT NULL, owner_token text NOT NULL, "
                "epoch bigint NOT NULL, lease_expires_at double precision NOT NULL, "
                "created_at double precision NOT NULL, expires_at double precision NOT NULL, "
                "result text, error text, format_version integer NOT NULL, holder text, "
                "PRIMARY KEY (namespace, scope, key_digest))"
            ).format(t),
            # additive migrations of tables made by older versions: nullable columns only,
            # so processes of the older version on the same table keep working
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS holder text").format(t),
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
        # already refuses (or is not sane), nothing is written (a replay is a plain read, no row lock);
        # otherwise `up` upserts, and PostgreSQL evaluates its WHERE on the row's latest
        # version under the row lock, so two callers never both acquire.
        self.acquire = sql.SQL(
            "WITH clock AS MATERIALIZED (SELECT " + _NOW + " AS now), "
            "prev AS MATERIALIZED (SELECT {cols} FROM {t} WHERE " + _KEY + "), "
            "up AS ("
            " INSERT INTO {t} AS r ({cols})"
            " SELECT %(namespace)s, %(scope)s, %(digest)s, %(fingerprint)s, %(in_progress)s,"
            " %(token)s, 1, clock.now + %(lease)s, clock.now, clock.now + %(span)s, NULL, NULL,"
            " %(format_version)s, %(holder)s FROM clock"
            " WHERE NOT EXISTS (SELECT 1 FROM prev p WHERE NOT (" + _sane("p") + " AND ("
            " p.expires_at <= clock.now OR (p.state = %(in_progress)s"
            " AND (p.lease_expires_at <= clock.now OR p.owner_token = %(dead)s)"
            " AND p.fingerprint = %(fingerprint)s AND %(takeover)s))))"
            " ON CONFLICT (namespace, scope, key_digest) DO UPDATE SET"
            " fingerprint = EXCLUDED.fingerprint, state = EXCLUDED.state,"
            " owner_token = EXCLUDED.owner_token, epoch = r.epoch + 1,"
            " lease_expires_at = EXCLUDED.lease_expires_at, created_at = EXCLUDED.created_at,"
            " expires_at = EXCLUDED.expires_at, result = NULL, error = NULL,"
            " format_version = EXCLUDED.format_version, holder = EXCLUDED.holder"
            " WHERE " + _sane("r") + " AND (r.expires_at <= EXCLUDED.created_at"
            " OR (r.state = %(in_progress)s"
            " AND (r.lease_expires_at <= EXCLUDED.created_at OR r.owner_token = %(dead)s)"
            " AND r.fingerprint = EXCLUDED.fingerprint AND %(takeover)s))"
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
            values=sql.SQL(", ").join(sql.Placeholder(c) for c in COLUMNS),
            sets=sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                for c in COLUMNS[3:]
            ),
        )
        # Rendered to text once: psycopg renders a composed statement again on every
        # execute (about a tenth of a first execution's client time), while the conversion
        # of a plain string is cached. Identifiers are quoted the same without a connection.
        for attr in ("exists", "acquire", "complete", "release", "renew", "get", "delete", "put"):
            setattr(self, attr, getattr(self, attr).as_string())
        self.ddl = [statement.as_string() for statement in ddl]


def key_params(key: RecordKey) -> dict[str, Any]:
    return {"namespace": key.namespace, "scope": key.scope, "digest": key.digest}


def decide(
    rows: Sequence[Sequence[Any]],
    fingerprint: str,
    takeover: bool,
    store: str,
    dead: str | None = None,
) -> Acquisition | None:
    """The acquisition the statement's rows mean, or None: ask again.

    Rows are ``(acquired, now, *record)``: the upserted record if this caller acquired, and
    the record as the statement's snapshot found it. That snapshot can be older than the
    version the upsert was decided on (a concurrent takeover, completion or release); a
    refusal whose record would have been acquirable, or a vanished record, is such a race,
    and asking again sees the newer version. A corrupt record raises (the statement never
    acquires one), so it is never asked about again.
    """
    mine = prev = None
    now = rows[0][1] if rows else 0.0
    for acquired, _, *fields in rows:
        if acquired:
            mine = fields
        else:
            prev = fields
    if mine is not None:
        record = checked_record(mine, store)
        # prev as raw fields: (…, state 4, …, epoch 6, …, expires_at 9, …)
        took = (
            prev is not None
            and prev[6] + 1 == record.epoch
            and prev[4] == IN_PROGRESS
            and prev[9] > now
        )
        return Acquisition(True, record, takeover=took, now=now)
    if prev is None:
        return None
    record = checked_record(prev, store)
    if can_acquire(record, fingerprint, now, takeover, dead)[0]:
        return None
    return Acquisition(False, record, now=now)
