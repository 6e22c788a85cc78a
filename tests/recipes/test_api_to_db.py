"""recipes.api_to_db: every item of the API lands in the database exactly once.

Counted from the database (the items table, its ``writes`` column, the effects table) and from
the DemoAPI's ledger; nodekit's waits are instant, and ``--timeout 0.2`` makes the server's
slow answers (held 1 s) time out on the client.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from nodekit.testing import FaultPlan, Instant
from recipes import api_to_db
from recipes._demo_api import DemoAPI

# Every fault kind first, in this order, then a seeded 30 % of random ones.
SCRIPT: dict[str, Any] = {"GET /items": ["503", "429", "drop_before", "drop_after", "slow"]}


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    plan = FaultPlan(seed=11, rate=0.3, script=SCRIPT, retry_after=0, slow=1.0)
    with DemoAPI(faults=plan, items=47, seed=3) as server:
        yield server


def run(api: DemoAPI, tmp_path: Path, *extra: str) -> int:
    return api_to_db.main(
        ["--api-url", api.url, "--data-dir", str(tmp_path), "--timeout", "0.2", *extra]
    )


def rows(conn: Any) -> list[tuple[Any, ...]]:
    found = conn.execute(
        "SELECT id, name, price, category, writes FROM items ORDER BY id"
    ).fetchall()
    return [tuple(row) for row in found]


def effects(conn: Any) -> int:
    """Keys recorded by ``nodekit.sql`` (one per page written)."""
    found = conn.execute("SELECT count(*) FROM nodekit_sql_effects").fetchone()
    return int(found[0])


def expected(api: DemoAPI) -> list[tuple[Any, ...]]:
    return [(i["id"], i["name"], i["price"], i["category"], 1) for i in api.items]


def test_every_item_is_written_exactly_once_through_faults_and_a_second_run(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    """Faults of every kind are ridden out; the second run replays every page, writing nothing."""
    db_path = tmp_path / "items.sqlite"
    url = f"sqlite:///{db_path}"

    assert run(api, tmp_path, "--db-url", url, "--per-page", "10") == 0
    first = capsys.readouterr().out
    assert run(api, tmp_path, "--db-url", url, "--per-page", "10") == 0
    second = capsys.readouterr().out

    with sqlite3.connect(db_path) as conn:
        assert rows(conn) == expected(api)  # every item, once, each row written once
        assert effects(conn) == 5
    faults = {entry.fault for entry in api.ledger.find(route="GET /items") if entry.fault}
    assert faults == {"503", "429", "drop_before", "drop_after", "slow"}
    assert "rows written       47" in first
    assert "pages replayed      5" in second
    assert "rows written        0" in second


def test_a_different_page_size_rewrites_but_never_duplicates(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    """New pages are new keys: upserted again, still one row per item."""
    url = f"sqlite:///{tmp_path / 'items.sqlite'}"
    assert run(api, tmp_path, "--db-url", url, "--per-page", "20") == 0
    assert run(api, tmp_path, "--db-url", url, "--per-page", "7") == 0

    with sqlite3.connect(tmp_path / "items.sqlite") as conn:
        found = rows(conn)
    assert [row[:4] for row in found] == [row[:4] for row in expected(api)]
    assert {row[4] for row in found} == {2}  # written once per run, never twice in one
    assert "pages replayed      0" in capsys.readouterr().out


@pytest.mark.services
def test_postgres_gets_every_item_once(
    api: DemoAPI,
    tmp_path: Path,
    postgres_url: str,
    pg_schema: str,
    nk_instant: Instant,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same guarantee on PostgreSQL (a fresh schema through ``search_path``)."""
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}options=-csearch_path%3D{pg_schema}"

    assert run(api, tmp_path, "--db-url", url) == 0
    assert run(api, tmp_path, "--db-url", url) == 0

    with psycopg.connect(postgres_url, options=f"-csearch_path={pg_schema}") as conn:
        assert rows(conn) == expected(api)
        assert effects(conn) == 5
    assert "pages replayed      5" in capsys.readouterr().out
    assert not (tmp_path / "api_to_db.sqlite").exists()  # nothing went to the SQLite default


def test_a_sqlalchemy_url_writes_every_item_once_through_an_engine(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dialect+driver://`` URLs go through SQLAlchemy: the engine lends a connection per
    attempt, and the rows and the key commit together on it."""
    db_path = tmp_path / "orm.sqlite"
    url = f"sqlite+pysqlite:///{db_path}"

    assert run(api, tmp_path, "--db-url", url) == 0
    assert run(api, tmp_path, "--db-url", url) == 0

    with sqlite3.connect(db_path) as conn:
        assert rows(conn) == expected(api)
        assert effects(conn) == 5
    assert "pages replayed      5" in capsys.readouterr().out


@pytest.mark.services
def test_a_postgres_sqlalchemy_url_writes_every_item_once(
    api: DemoAPI,
    tmp_path: Path,
    postgres_url: str,
    pg_schema: str,
    nk_instant: Instant,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{pg_schema}"

    assert run(api, tmp_path, "--db-url", url) == 0
    assert run(api, tmp_path, "--db-url", url) == 0

    with psycopg.connect(postgres_url, options=f"-csearch_path={pg_schema}") as conn:
        assert rows(conn) == expected(api)
        assert effects(conn) == 5
    assert "pages replayed      5" in capsys.readouterr().out


def test_a_page_that_keeps_failing_fails_the_run_and_a_rerun_carries_on(
    tmp_path: Path, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    """Retries run out on page 2: page 1 stays written, the next run replays it and finishes."""
    faults: list[Any] = [None, *["503"] * 6]
    plan = FaultPlan.scripted(*faults, retry_after=0)
    with DemoAPI(faults=plan, items=20) as api:
        assert run(api, tmp_path, "--per-page", "10") == 1
        out = capsys.readouterr().out
        assert "FAILED: HTTPStatusError" in out
        with sqlite3.connect(tmp_path / "api_to_db.sqlite") as conn:
            assert [row[0] for row in rows(conn)] == list(range(1, 11))

        assert run(api, tmp_path, "--per-page", "10") == 0
        assert "pages replayed      1" in capsys.readouterr().out
        with sqlite3.connect(tmp_path / "api_to_db.sqlite") as conn:
            assert rows(conn) == expected(api)
        assert len(api.ledger.find(route="GET /items", fault="503")) == 6


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        api_to_db.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--api-url", "--db-url", "--data-dir", "--faults", "--seed", "--per-page"):
        assert flag in out
