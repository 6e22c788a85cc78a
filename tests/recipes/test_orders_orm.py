"""recipes.orders_orm: every order written once through the ORM and announced once.

Counted from the database (the orders table and its ``writes`` column, the key table) and from
the DemoAPI's ledger (the webhook deliveries it processed); nodekit's waits are instant.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from nodekit.testing import FaultPlan, Instant
from recipes import orders_orm
from recipes._demo_api import DemoAPI

SCRIPT = {"POST /webhooks/orders": ["drop_after", "503", "drop_before", "429"]}


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    plan = FaultPlan(seed=5, rate=0.2, script=SCRIPT, retry_after=0)
    with DemoAPI(faults=plan) as server:
        yield server


def run(api: DemoAPI, tmp_path: Path, url: str, *extra: str) -> int:
    return orders_orm.main(
        ["--api-url", api.url, "--data-dir", str(tmp_path), "--db-url", url, *extra]
    )


def announced(api: DemoAPI) -> Counter[str]:
    """Order ids whose event the API processed (a replayed delivery is not counted)."""
    return Counter(entry.data["event"]["order_id"] for entry in api.deliveries("orders"))


def test_every_order_is_written_and_announced_once_through_faults_and_a_second_run(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "orders.sqlite"
    url = f"sqlite+pysqlite:///{db}"
    assert run(api, tmp_path, url, "--orders", "12") == 0
    first = capsys.readouterr().out
    assert run(api, tmp_path, url, "--orders", "12") == 0
    second = capsys.readouterr().out

    with sqlite3.connect(db) as conn:
        writes = conn.execute("SELECT writes, count(*) FROM orm_orders GROUP BY writes").fetchall()
        keys = conn.execute("SELECT count(*) FROM nodekit_sql_effects").fetchone()[0]
        pending = conn.execute(
            "SELECT count(*) FROM nodekit_outbox WHERE dispatched_at IS NULL"
        ).fetchone()[0]
    assert writes == [(1, 12)]  # twelve orders, each written once
    assert keys == 12
    assert pending == 0
    assert announced(api) == dict.fromkeys(announced(api), 1)
    assert len(announced(api)) == 12
    faults = {
        entry.fault for entry in api.ledger.find(route="POST /webhooks/orders") if entry.fault
    }
    assert {"drop_after", "503"} <= faults  # the dropped answer was retried and replayed
    assert "orders placed        12" in first
    assert "orders replayed      12" in second
    assert "events delivered      0" in second


@pytest.mark.services
def test_postgres_orders_are_written_and_announced_once(
    api: DemoAPI,
    tmp_path: Path,
    postgres_url: str,
    pg_schema: str,
    nk_instant: Instant,
) -> None:
    base = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{pg_schema}"
    assert run(api, tmp_path, url, "--orders", "8") == 0
    assert run(api, tmp_path, url, "--orders", "8") == 0

    with psycopg.connect(postgres_url, options=f"-csearch_path={pg_schema}") as conn:
        rows = conn.execute("SELECT writes, count(*) FROM orm_orders GROUP BY writes").fetchall()
    assert rows == [(1, 8)]
    assert len(announced(api)) == 8
    assert set(announced(api).values()) == {1}


def test_a_plain_database_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="SQLAlchemy URL"):
        orders_orm.main(["--data-dir", str(tmp_path), "--db-url", f"sqlite:///{tmp_path}/x"])
