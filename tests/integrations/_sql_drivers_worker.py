"""A process that writes one order through SQLAlchemy or asyncpg, to be SIGKILLed mid-way.

``python tests/integrations/_sql_drivers_worker.py DRIVER --url URL --schema S --crash STAGE``
where DRIVER is ``sa`` (ORM ``Session``), ``sa-async`` (ORM ``AsyncSession`` on asyncpg) or
``asyncpg`` (a plain asyncpg connection). It reports stages on stdout (``stage:<name>``) and
waits at the one it was asked to crash at, so the kill lands exactly there: ``before_write``
(transaction open, key row inserted), ``before_commit`` (the ORM write flushed, COMMIT not
sent), ``after_commit`` (committed, the node has not returned). With ``--crash none`` it runs
to the end and reports ``replayed:<bool>`` and ``result:<order_id>:<amount>``: the test
re-runs the same node in a fresh process this way. Effects are counted from the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import nodekit as nk
from nodekit.sql import transactional

APP = "nk-sql-drivers-worker"
HOOK: list[Callable[[str], None]] = [lambda stage: None]


class Base(DeclarativeBase):
    pass


class Order(Base):
    """The effect: no unique constraint on `order_id`, so a second run shows as a second row."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(String(40))
    amount: Mapped[int] = mapped_column(Integer)


class Receipt(BaseModel):
    order_id: str
    amount: int


@transactional(name="drivers_worker.place", key=lambda order_id: order_id)
def place(order_id: str, amount: int, *, db: Any = nk.resource()) -> Receipt:
    HOOK[0]("before_write")
    db.add(Order(order_id=order_id, amount=amount))
    db.flush()
    HOOK[0]("before_commit")
    return Receipt(order_id=order_id, amount=amount)


@transactional(name="drivers_worker.place", key=lambda order_id: order_id)
async def aplace(order_id: str, amount: int, *, db: Any = nk.resource()) -> Receipt:
    HOOK[0]("before_write")
    if type(db).__module__.startswith("asyncpg"):
        await db.execute("INSERT INTO orders (order_id, amount) VALUES ($1, $2)", order_id, amount)
    else:
        db.add(Order(order_id=order_id, amount=amount))
        await db.flush()
    HOOK[0]("before_commit")
    return Receipt(order_id=order_id, amount=amount)


def report(line: str) -> None:
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def stop_at(crash: str) -> Callable[[str], None]:
    def hook(stage: str) -> None:
        report(f"stage:{stage}")
        if stage == crash:
            time.sleep(60.0)  # blocks the event loop too: nothing moves until the kill
            report("error:not killed")
            os._exit(3)

    return hook


def outcome(result: Receipt, events: Any) -> None:
    report(f"replayed:{'node.replayed' in events.names()}")
    report(f"result:{result.order_id}:{result.amount}")


def run_sa(url: str, schema: str, order_id: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from nodekit.testing import capture_events

    engine = create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1),
        connect_args={"options": f"-csearch_path={schema}", "application_name": APP},
    )
    try:
        with Session(engine) as session, capture_events() as events:
            outcome(place(order_id, 10, db=session), events)
    finally:
        engine.dispose()


async def run_async(driver: str, url: str, schema: str, order_id: str) -> None:
    from nodekit.testing import capture_events

    if driver == "asyncpg":
        import asyncpg

        conn = await asyncpg.connect(
            url, server_settings={"search_path": schema, "application_name": APP}
        )
        try:
            with capture_events() as events:
                outcome(await aplace(order_id, 10, db=conn), events)
        finally:
            await conn.close()
        return
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(
        url.replace("postgresql://", "postgresql+asyncpg://", 1),
        connect_args={"server_settings": {"search_path": schema, "application_name": APP}},
    )
    try:
        async with AsyncSession(engine) as session:
            with capture_events() as events:
                outcome(await aplace(order_id, 10, db=session), events)
    finally:
        await engine.dispose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("driver", choices=["sa", "sa-async", "asyncpg"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--order-id", default="o-1")
    parser.add_argument("--crash", default="none")
    args = parser.parse_args(argv)
    HOOK[0] = stop_at(args.crash)
    # "After commit, before returning": the node reports completion after COMMIT.
    nk.add_sink(
        lambda event: HOOK[0]("after_commit") if event.name == "idempotency.completed" else None
    )
    if args.driver == "sa":
        run_sa(args.url, args.schema, args.order_id)
    else:
        asyncio.run(run_async(args.driver, args.url, args.schema, args.order_id))
    report("stage:done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
