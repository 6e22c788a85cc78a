"""Keyed database writes: `nodekit.sql.transactional` beside the same write without nodekit.

On the local PostgreSQL, in one run, rounds interleaved, best round of each subject:

* **SQLAlchemy ORM, sync** (``postgresql+psycopg``): one ``Order`` added and committed per
  call through a ``sessionmaker`` — by hand (``with Session.begin() as s: s.add(...)``) and
  as a keyed transactional node given the same ``sessionmaker`` (the key row and the order
  commit together);
* **asyncpg**: one ``INSERT`` in a transaction per call on one connection — by hand
  (``async with conn.transaction(): await conn.execute(...)``) and as a keyed transactional
  ``async def`` node given the same connection.

Per call: wall time, and the statements sent to the server (SQLAlchemy's
``before_cursor_execute`` events; asyncpg's query logger), BEGIN and COMMIT included; the
goal is at most one extra statement round trip per call. Every round checks afterwards that
the table holds exactly one row per call (and, for the keyed node, one key row per call).

And the **outbox with competing dispatchers**: 4 ``nodekit outbox run`` worker processes,
idle on an empty outbox, then 20,000 messages committed in one transaction; wall time until
none is pending (the handler, `sink`, does nothing: a local sink). Target: ≥ 2,000 messages/s.

``python -m benchmarks.bench_sql`` writes its section of BENCHMARKS.md; ``--quick`` is a
smoke run that writes nothing. Needs PostgreSQL (``NODEKIT_TEST_POSTGRES_URL``, default
``postgresql://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import nodekit as nk
from nodekit import sql

from . import _common
from ._common import table

SECTION = "sql"
URL = os.environ.get("NODEKIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


class _Base(DeclarativeBase):
    pass


def _order_model(name: str) -> type[Any]:
    return type(
        f"Order_{name}",
        (_Base,),
        {
            "__tablename__": name,
            "__annotations__": {"id": Mapped[str], "amount": Mapped[int]},
            "id": mapped_column(sa.String, primary_key=True),
            "amount": mapped_column(sa.Integer),
        },
    )


class Counted:
    """Statements sent, counted by the client library's own hook."""

    def __init__(self) -> None:
        self.statements = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.statements += 1


def _sqlalchemy_round(n: int, run: str) -> dict[str, tuple[float, float]]:
    """(ns per call, statements per call) for the hand-written and the keyed ORM write."""
    engine = sa.create_engine(URL.replace("postgresql://", "postgresql+psycopg://", 1))
    counted = Counted()
    sa.event.listen(engine, "before_cursor_execute", counted)
    sa.event.listen(engine, "begin", counted)
    sa.event.listen(engine, "commit", counted)
    results: dict[str, tuple[float, float]] = {}
    try:
        for subject in ("by hand", "keyed node"):
            name = f"bench_orm_{run}_{'k' if subject == 'keyed node' else 'p'}"
            model = _order_model(name)
            model.__table__.create(engine)  # type: ignore[attr-defined]
            sessions = sessionmaker(engine)
            write: Callable[[str], Any]
            if subject == "by hand":

                def write(order_id: str, model: Any = model, sessions: Any = sessions) -> None:
                    with sessions.begin() as session:
                        session.add(model(id=order_id, amount=1))

            else:

                @sql.transactional(
                    name=f"orm-{run}",
                    key=lambda order_id: order_id,
                    connection="session",
                    table=f"nodekit_effects_{run}",
                )
                def keyed(order_id: str, *, session: Session = nk.resource()) -> None:
                    session.add(model(id=order_id, amount=1))  # noqa: B023 - one per subject

                def write(order_id: str, keyed: Any = keyed, sessions: Any = sessions) -> None:
                    with nk.use(session=sessions):
                        keyed(order_id)

            write("warm-up")
            counted.statements = 0
            start = time.perf_counter_ns()
            for i in range(n):
                write(f"o-{i}")
            elapsed = time.perf_counter_ns() - start
            results[subject] = (elapsed / n, counted.statements / n)
            with engine.connect() as conn:
                rows = conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar()
            if rows != n + 1:
                raise SystemExit(f"bench_sql: {subject} wrote {rows} rows for {n + 1} calls")
    finally:
        with engine.begin() as conn:
            for table_name in sa.inspect(conn).get_table_names():
                if table_name.startswith((f"bench_orm_{run}", f"nodekit_effects_{run}")):
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table_name}"'))
        engine.dispose()
    return results


async def _asyncpg_round(n: int, run: str) -> dict[str, tuple[float, float]]:
    conn = await asyncpg.connect(URL)
    counted = Counted()
    conn.add_query_logger(counted)
    results: dict[str, tuple[float, float]] = {}
    try:
        for subject in ("by hand", "keyed node"):
            name = f"bench_apg_{run}_{'k' if subject == 'keyed node' else 'p'}"
            await conn.execute(f"CREATE TABLE {name} (id text PRIMARY KEY, amount int)")
            insert = f"INSERT INTO {name} (id, amount) VALUES ($1, 1)"
            if subject == "by hand":

                async def write(order_id: str, insert: str = insert) -> None:
                    async with conn.transaction():
                        await conn.execute(insert, order_id)

            else:

                @sql.transactional(
                    name=f"apg-{run}",
                    key=lambda order_id: order_id,
                    table=f"nodekit_effects_apg_{run}",
                )
                async def keyed(order_id: str, *, db: Any = nk.resource()) -> None:
                    await db.execute(insert, order_id)  # noqa: B023 - one per subject

                async def write(order_id: str, keyed: Any = keyed) -> None:
                    await keyed(order_id, db=conn)

            await write("warm-up")
            counted.statements = 0
            start = time.perf_counter_ns()
            for i in range(n):
                await write(f"o-{i}")
            elapsed = time.perf_counter_ns() - start
            results[subject] = (elapsed / n, counted.statements / n)
            rows = await conn.fetchval(f"SELECT count(*) FROM {name}")
            if rows != n + 1:
                raise SystemExit(f"bench_sql: asyncpg {subject} wrote {rows} rows")
    finally:
        conn.remove_query_logger(counted)
        for prefix in (f"bench_apg_{run}", f"nodekit_effects_apg_{run}"):
            for record in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE $1", prefix + "%"
            ):
                await conn.execute(f'DROP TABLE IF EXISTS "{record["tablename"]}"')
        await conn.close()
    return results


def sink(message: Any) -> None:
    """The outbox throughput's handler: a local sink that does nothing."""


def _outbox_rate(total: int, run: str) -> float:
    """Messages per second through 4 `nodekit outbox run` processes on one outbox."""
    import psycopg

    table = f"bench_outbox_{run}"
    procs: list[subprocess.Popen[bytes]] = []
    with psycopg.connect(URL, autocommit=True) as conn:
        outbox = sql.Outbox(table)
        with conn.transaction():
            outbox.add(conn, "warm-up", {"n": 0})
        try:
            for _ in range(4):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "nodekit",
                            "outbox",
                            "run",
                            "--db",
                            URL,
                            "--table",
                            table,
                            "--handler",
                            "benchmarks.bench_sql:sink",
                            "--idle",
                            "0.02",
                        ],
                        cwd=_common.ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )

            def pending() -> int:
                row = conn.execute(
                    f"SELECT count(*) FROM {table} WHERE dispatched_at IS NULL"
                ).fetchone()
                return int(row[0]) if row else 0

            deadline = time.monotonic() + 60
            while pending() and time.monotonic() < deadline:  # the workers are up
                time.sleep(0.05)
            rows = [("event", f"m-{n}", f'{{"n": {n}}}', time.time()) for n in range(total)]
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {table} (topic, key, payload, created_at) VALUES (%s, %s, %s, %s)",
                    rows,
                )
            started = time.monotonic()
            while pending() and time.monotonic() < started + 120:
                time.sleep(0.01)
            elapsed = time.monotonic() - started
            left = pending()
            done = conn.execute(
                f"SELECT count(*) FROM {table} WHERE dispatched_at IS NOT NULL"
            ).fetchone()
            if left or done is None or done[0] != total + 1:
                raise SystemExit(f"bench_sql: outbox left {left} pending, {done} dispatched")
            return total / elapsed
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def run(quick: bool) -> str:
    n, rounds = (50, 1) if quick else (500, 3)
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for _ in range(rounds):
        tag = uuid.uuid4().hex[:8]
        found = {("SQLAlchemy ORM (sync)", s): v for s, v in _sqlalchemy_round(n, tag).items()}
        found |= {("asyncpg", s): v for s, v in asyncio.run(_asyncpg_round(n, tag)).items()}
        for key, value in found.items():
            if key not in best or value[0] < best[key][0]:
                best[key] = value
    total = 2_000 if quick else 20_000
    rates = [_outbox_rate(total, uuid.uuid4().hex[:8]) for _ in range(1 if quick else 3)]
    rows = []
    for driver in ("SQLAlchemy ORM (sync)", "asyncpg"):
        hand_ns, hand_st = best[(driver, "by hand")]
        node_ns, node_st = best[(driver, "keyed node")]
        extra = node_st - hand_st
        rows.append(
            [
                driver,
                f"{hand_ns / 1000:,.0f}",
                f"{hand_st:.2f}",
                f"{node_ns / 1000:,.0f}",
                f"{node_st:.2f}",
                f"{(node_ns - hand_ns) / 1000:,.0f}",
                f"{extra:+.2f}",
                "met" if extra <= 1.0 else "**not met**",
            ]
        )
    return "\n".join(
        [
            "## Keyed database writes (`nodekit.sql.transactional`)",
            "",
            _common.machine_markdown(),
            "",
            f"The local PostgreSQL, N = {n:,} calls per subject per round, {rounds} round(s), "
            "each subject on a fresh table, best round. *By hand*: the same write without "
            "nodekit (SQLAlchemy: `with sessionmaker.begin() as s: s.add(Order(...))`; asyncpg: "
            "`async with conn.transaction(): await conn.execute(INSERT)`). *Keyed node*: the "
            "same write in a `sql.transactional` node keyed by the order id (the key row commits "
            "with the order). *Statements*: per call, counted by SQLAlchemy's "
            "`before_cursor_execute`/`begin`/`commit` events and asyncpg's query logger. Goal: "
            "at most one extra statement round trip per call. Checked after every round: one "
            "row per call.",
            "",
            table(
                [
                    "driver",
                    "by hand µs",
                    "statements",
                    "keyed node µs",
                    "statements",
                    "overhead µs",
                    "extra statements",
                    "goal ≤ 1",
                ],
                rows,
                "lrrrrrrl",
            ),
            "",
            "### Outbox with competing dispatchers",
            "",
            f"4 `nodekit outbox run` worker processes on one PostgreSQL outbox, idle, then "
            f"{total:,} messages committed in one transaction; wall time until none is pending; "
            "the handler does nothing (a local sink); checked: every message dispatched once. "
            f"{len(rates)} run(s). Target: ≥ 2,000 messages/s.",
            "",
            table(
                ["dispatchers", "messages", "best msg/s", "median msg/s", "target ≥ 2,000"],
                [
                    [
                        "4 processes",
                        f"{total:,}",
                        f"{max(rates):,.0f}",
                        f"{sorted(rates)[len(rates) // 2]:,.0f}",
                        "met" if sorted(rates)[len(rates) // 2] >= 2000 else "**not met**",
                    ]
                ],
                "lrrrl",
            ),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(_common.main(SECTION, run))
