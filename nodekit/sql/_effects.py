"""The effects table: one row per (namespace, key digest), written in the user's transaction.

Every driver runs the same five statements, written here once per dialect and parameter style
(``?``, ``%s``, ``$1``), always parameterized. A driver hands the core a `Tx`: the statements
for its connection, the object the user's function receives, and two ways to run a statement.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._errors import ConfigError

__all__ = ["AsyncTx", "Effects", "Statements", "Tx"]


@dataclass(frozen=True, slots=True)
class Statements:
    """The effects table's statements for one dialect and parameter style."""

    ddl: str
    lock: str  # serialises CREATE TABLE between processes starting together (PostgreSQL)
    limit: str  # the remaining deadline as statement_timeout, only ever lowered (PostgreSQL)
    insert: str  # claims the key: 1 row inserted, or 0 when a committed row holds it
    select: str
    update: str


class Tx(Protocol):
    """An open transaction a driver hands the core (sync)."""

    handle: Any  # what the user's function receives: the connection, session or a pooled one
    sql: Statements
    postgres: bool

    def run(self, sql: str, params: Sequence[Any]) -> int:
        """Execute one statement; the number of rows it changed."""
        ...

    def row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...]:
        """Execute one query; its single row."""
        ...


class AsyncTx(Protocol):
    """`Tx` for async drivers."""

    handle: Any
    sql: Statements
    postgres: bool

    async def run(self, sql: str, params: Sequence[Any]) -> int: ...

    async def row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...]: ...


def _marks(style: str, count: int) -> list[str]:
    if style == "qmark":
        return ["?"] * count
    if style in ("format", "pyformat"):
        return ["%s"] * count
    if style == "numeric_dollar":
        return [f"${i}" for i in range(1, count + 1)]
    if style == "numeric":
        return [f":{i}" for i in range(1, count + 1)]
    raise ConfigError(
        f"nodekit.sql: the driver's parameter style {style!r} is not supported", option="connection"
    )


class Effects:
    """The effects table of one `transactional` node: its statements and where it exists.

    SQLite creates the table inside each call's own transaction (a local statement, cheap and
    always true to the file the connection has open). PostgreSQL creates it once per database
    handle (a connection, an engine, a pool) in a transaction of its own, serialised by an
    advisory lock; the handles already set up are held weakly, so a new one that reuses a
    closed one's ``id`` is set up again.
    """

    def __init__(self, table: str) -> None:
        self.table = table
        self._ready: weakref.WeakSet[Any] = weakref.WeakSet()
        self._statements: dict[tuple[str, str], Statements] = {}

    def ddl(self, dialect: str) -> str:
        created = "REAL" if dialect == "sqlite" else "DOUBLE PRECISION"
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (namespace TEXT NOT NULL, "
            "key_digest TEXT NOT NULL, fingerprint TEXT NOT NULL, result TEXT, error TEXT, "
            f"created_at {created} NOT NULL, PRIMARY KEY (namespace, key_digest))"
        )

    def statements(self, dialect: str, style: str) -> Statements:
        """The statements for `dialect` ("sqlite", "postgres") in the driver's `style`."""
        found = self._statements.get((dialect, style))
        if found is None:
            found = self._statements[dialect, style] = self._build(dialect, style)
        return found

    def _build(self, dialect: str, style: str) -> Statements:
        m = _marks(style, 4)
        t = self.table
        return Statements(
            ddl=self.ddl(dialect),
            lock=f"SELECT pg_advisory_xact_lock(hashtext({m[0]}))",
            limit=(
                f"SELECT set_config('statement_timeout', {m[0]}, true) FROM pg_settings "
                "WHERE name = 'statement_timeout' AND "
                f"(setting::bigint = 0 OR setting::bigint > {m[1]})"
            ),
            insert=(
                f"INSERT INTO {t} (namespace, key_digest, fingerprint, created_at) "
                f"VALUES ({m[0]}, {m[1]}, {m[2]}, {m[3]}) "
                "ON CONFLICT (namespace, key_digest) DO NOTHING"
            ),
            select=(
                f"SELECT fingerprint, result, error FROM {t} "
                f"WHERE namespace = {m[0]} AND key_digest = {m[1]}"
            ),
            update=(
                f"UPDATE {t} SET result = {m[0]}, error = {m[1]} "
                f"WHERE namespace = {m[2]} AND key_digest = {m[3]}"
            ),
        )

    def ready(self, handle: Any) -> bool:
        """Whether the table is known to exist (committed) for `handle`'s database."""
        try:
            return handle in self._ready
        except TypeError:
            return False

    def mark_ready(self, handle: Any) -> None:
        # not weakly referenceable: set up again next time (harmless)
        with contextlib.suppress(TypeError):
            self._ready.add(handle)
