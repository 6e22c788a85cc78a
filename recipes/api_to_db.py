"""API to database: page through a JSON API and write every row exactly once.

Two nodes, each touching the world in its own way:

- ``fetch_page`` reads one page of ``GET /items`` (a READ: every transient error — 503, 429,
  a dropped connection, a read timeout — is safe to retry);
- ``store_page`` upserts the page's rows with `nodekit.sql.transactional`: the page's key is
  recorded in the same transaction as the rows, so the write commits exactly once. The key is
  the page's rows themselves (ids and values): an unchanged page is *replayed* — nothing is
  written — and a page whose rows changed upstream is a new key, upserted once.

The program follows the API's ``next`` links until there is none. Run it twice: the second
run fetches the pages again and writes nothing. The ``writes`` column of each row counts how
often the row was written, so the database itself shows that no row was written twice. (A
different ``--per-page`` groups the rows into new pages: new keys, so they are upserted again.)

    python -m recipes.api_to_db --faults 0.3
    python -m recipes.api_to_db --db-url postgresql://postgres@127.0.0.1/test
    python -m recipes.api_to_db --db-url postgresql+psycopg://postgres@127.0.0.1/test  # SQLAlchemy
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import httpx

import nodekit as nk
from nodekit import http as nkhttp
from nodekit import sql

from ._common import api_base, connect, data_dir, engine_of, parser

__all__ = ["fetch_page", "main", "store_page"]

TABLE = "items"
RETRY = nk.Retry(attempts=6, initial=0.1, multiplier=2.0, max_wait=2.0, jitter=0.05)

Row = dict[str, Any]


# ---------------------------------------------------------------------------- nodes


@nk.node(
    name="fetch_page",
    effect=nk.Effect.READ,
    retry=RETRY,
    timeout=nk.Timeout(attempt=30, total=120),
)
def fetch_page(url: str, *, http: httpx.Client = nk.resource()) -> dict[str, Any]:
    """One page of ``GET /items``: ``{"items": [...], "page": n, "next": url or None}``.

    A read, so every transient error is retried; the client's timeout bounds each answer.
    """
    return dict(nkhttp.get(http, url).json())


def _q(db: Any, statement: str) -> str:
    """Our statements use ``?`` placeholders; psycopg wants ``%s``."""
    return statement if isinstance(db, sqlite3.Connection) else statement.replace("?", "%s")


def _is_sqlalchemy(db: Any) -> bool:
    """A SQLAlchemy `Engine` (the program's handle) or `Connection` (what the node gets)."""
    return type(db).__module__.startswith("sqlalchemy.")


def _run(db: Any, statement: str, rows: list[tuple[Any, ...]] | None = None) -> list[Any]:
    """Execute on any of the three handles; SQLAlchemy statements get ``:p0, :p1…``."""
    if not _is_sqlalchemy(db):
        if rows is None:
            cursor = db.execute(_q(db, statement))
            return list(cursor.fetchall()) if statement.startswith("SELECT") else []
        for row in rows:
            db.execute(_q(db, statement), row)
        return []
    import sqlalchemy as sa

    names = iter(range(statement.count("?")))
    text = sa.text("".join(f":p{next(names)}" if ch == "?" else ch for ch in statement))
    params = [{f"p{i}": value for i, value in enumerate(row)} for row in rows or []]
    if hasattr(db, "connect"):  # an engine: a connection and a transaction of its own
        with db.begin() as conn:
            result = conn.execute(text, params) if params else conn.execute(text)
            return list(result.all()) if result.returns_rows else []
    result = db.execute(text, params) if params else db.execute(text)
    return list(result.all()) if result.returns_rows else []


@sql.transactional(name="store_page", key=lambda rows: rows, retry=RETRY)
def store_page(rows: list[Row], *, db: Any = nk.resource()) -> int:
    """Upsert one page's rows; returns how many. Exactly once per key (the rows themselves).

    `db` is a sqlite3 or psycopg connection, or a SQLAlchemy `Connection` lent by the
    engine given with ``--db-url dialect+driver://…``; this runs inside the transaction that
    also records the key, so the rows and the key commit together or not at all.
    """
    statement = (
        f"INSERT INTO {TABLE} (id, name, price, category, writes) VALUES (?, ?, ?, ?, 1) "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name, price = excluded.price, "
        f"category = excluded.category, writes = {TABLE}.writes + 1"
    )
    _run(db, statement, [(row["id"], row["name"], row["price"], row["category"]) for row in rows])
    return len(rows)


# ---------------------------------------------------------------------------- the program


def prepare(db: Any) -> None:
    """Create the items table if it is missing (outside any transaction)."""
    _run(
        db,
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "price DOUBLE PRECISION NOT NULL, category TEXT NOT NULL, writes INTEGER NOT NULL)",
    )
    if isinstance(db, sqlite3.Connection):
        db.commit()  # transactional needs an idle connection


def writes_per_row(db: Any) -> dict[int, int]:
    """``{writes: rows written that many times}``, read from the database."""
    found = _run(db, f"SELECT writes, count(*) FROM {TABLE} GROUP BY writes ORDER BY writes")
    if isinstance(db, sqlite3.Connection):
        db.commit()
    return {int(writes): int(rows) for writes, rows in found}


def _replays(metrics: nk.Metrics, name: str) -> int:
    stats = metrics.snapshot().get(name)
    return stats.replays if stats is not None else 0


def copy_pages(first_url: str, metrics: nk.Metrics, counts: dict[str, int]) -> None:
    """Fetch every page from `first_url` on, following ``next``, and store each one.

    Needs the ``http`` and ``db`` resources; adds to `counts` as it goes (so a failed run
    still says how far it got). Nodes run one after the other, so a change of `metrics`'
    replay count across one ``store_page`` call tells whether that page was replayed.
    """
    url: str | None = first_url
    while url:
        page = fetch_page(url)
        rows: list[Row] = list(page.get("items") or [])
        counts["pages"] += 1
        counts["rows"] += len(rows)
        if rows:
            before = _replays(metrics, store_page.name)
            written = store_page(rows)
            if _replays(metrics, store_page.name) > before:
                counts["replayed"] += 1
            else:
                counts["written"] += written
        url = page.get("next")


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser("api_to_db", "Copy every page of GET /items into a database, exactly once.")
    cli.add_argument(
        "--per-page", type=int, default=10, help="rows per page, 1-100 (default: %(default)s)"
    )
    cli.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for each HTTP answer (default: %(default)s)",
    )
    args = cli.parse_args(argv)
    root = data_dir(args.data_dir)
    where = args.db_url or f"sqlite:///{root / 'api_to_db.sqlite'}"
    counts = {"pages": 0, "rows": 0, "written": 0, "replayed": 0}
    writes: dict[int, int] = {}
    failure: Exception | None = None
    metrics = nk.Metrics()
    remove_sink = nk.add_sink(metrics)
    started = time.perf_counter()
    try:
        with (
            contextlib.closing(connect(args.db_url, root / "api_to_db.sqlite")) as opened,
            api_base(args.api_url, faults=args.faults, seed=args.seed) as (base, api),
            httpx.Client(base_url=base, timeout=args.timeout) as client,
            nk.use(http=client, db=engine_of(opened)),
        ):
            db = engine_of(opened)
            source = "a local API" if api is not None else base
            faults = (
                f" failing {args.faults:.0%} of requests" if api is not None and args.faults else ""
            )
            print(f"api_to_db: {source}{faults} -> {_redact(where)} (table {TABLE})")
            prepare(db)
            try:
                copy_pages(f"/items?page=1&per_page={args.per_page}", metrics, counts)
            except Exception as exc:  # reported below, after what was done
                failure = exc
            writes = writes_per_row(db)
    finally:
        remove_sink()
    retries = sum(stats.retries for stats in metrics.snapshot().values())
    print(f"  pages fetched   {counts['pages']:>5}   ({counts['rows']} rows)")
    print(f"  rows written    {counts['written']:>5}   (upserted, one transaction per page)")
    print(f"  pages replayed  {counts['replayed']:>5}   (already written by an earlier run)")
    print(f"  retries         {retries:>5}   (transient errors the nodes rode out)")
    shown = ", ".join(f"{rows} rows written {n}x" for n, rows in writes.items()) or "empty"
    print(f"  table {TABLE}: {sum(writes.values())} rows ({shown})")
    print(f"  took {time.perf_counter() - started:.2f} s")
    if failure is not None:
        notes = " ".join(getattr(failure, "__notes__", ()))
        print(f"FAILED: {type(failure).__name__}: {failure}" + (f" ({notes})" if notes else ""))
        print("Run it again to carry on: the pages already written are replayed, not rewritten.")
        return 1
    if counts["replayed"] and not counts["written"]:
        print("Every page was replayed: nothing was written twice.")
    else:
        print("Run it again: every page is replayed and nothing is written twice.")
    return 0


def _redact(url: str) -> str:
    """The database URL without a password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


if __name__ == "__main__":
    raise SystemExit(main())
