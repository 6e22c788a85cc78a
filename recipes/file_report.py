"""File report: read records from files, enrich each one over HTTP concurrently, write a report.

Async mode from end to end:

- the input files (JSON lines ``*.jsonl`` / ``*.ndjson`` and ``*.csv`` in ``--input``; a small
  sample set is generated in ``--data-dir`` when none is given) are read with
  `nodekit.files.aread_text`;
- ``enrich_record`` is an ``async def`` READ node (``GET /enrich/<id>``, retried on every
  transient error, each attempt cancelled at its timeout) run over all records with
  ``await enrich_record.amap(records, concurrency=N)`` on one injected ``httpx.AsyncClient``;
- the report (JSON or CSV) is written with `nodekit.files.awrite_atomic`: a reader, or a crash,
  sees the old report or the new one, never half of one.

`amap` keeps every record's outcome in input order: a record whose enrichment fails for good
(retries exhausted, a 4xx, no id, a malformed line) is in the report with its error, and the
others are not lost.

    python -m recipes.file_report --faults 0.3 --concurrency 16
    python -m recipes.file_report --input ./exports --output report.csv
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import nodekit as nk
from nodekit import files
from nodekit import http as nkhttp

from ._common import api_base, data_dir, parser

__all__ = ["enrich_record", "main", "read_records", "write_sample"]

RETRY = nk.Retry(attempts=6, initial=0.1, multiplier=2.0, max_wait=2.0, jitter=0.05)
JSON_LINES = (".jsonl", ".ndjson")
ENRICHED = ("score", "tier", "tags")

Record = dict[str, Any]


@dataclass(slots=True)
class Entry:
    """One input record, where it came from, and why it could not be read (if it could not)."""

    source: str
    record: Record = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------- the node


@nk.node(
    name="enrich_record",
    effect=nk.Effect.READ,
    retry=RETRY,
    timeout=nk.Timeout(attempt=30, total=120),
)
async def enrich_record(record: Record, *, http: httpx.AsyncClient = nk.resource()) -> Record:
    """`record` with ``score``, ``tier`` and ``tags`` from ``GET /enrich/<id>``.

    A read: every transient error is retried. A record without an id is a `ValueError`, and a
    4xx other than 408/425/429 an `HTTPStatusError`: permanent, not retried.
    """
    record_id = record.get("id")
    if record_id is None or str(record_id).strip() == "":
        raise ValueError("the record has no id")
    response = await nkhttp.aget(http, f"/enrich/{quote(str(record_id), safe='')}")
    data = response.json()
    return {**record, **{name: data.get(name) for name in ENRICHED}}


# ---------------------------------------------------------------------------- input


async def read_records(paths: Sequence[Path]) -> list[Entry]:
    """Every record of every file, in order; a line that cannot be parsed is an `Entry` with
    its error (reported like a failed enrichment, never dropping the other records)."""
    entries: list[Entry] = []
    for path in paths:
        text = await files.aread_text(path)
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for row in reader:
                entries.append(Entry(f"{path.name}:{reader.line_num}", dict(row)))
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            source = f"{path.name}:{number}"
            try:
                value = json.loads(line)
            except ValueError as exc:
                entries.append(Entry(source, error=f"invalid JSON: {exc}"))
                continue
            if isinstance(value, dict):
                entries.append(Entry(source, value))
            else:
                entries.append(Entry(source, error="a line must be a JSON object"))
    return entries


def input_files(directory: Path) -> list[Path]:
    """The JSON-lines and CSV files in `directory`, sorted by name."""
    suffixes = (*JSON_LINES, ".csv")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


async def write_sample(directory: Path) -> list[Path]:
    """A small sample input in `directory` (which exists): orders as JSON lines, returns as
    CSV. Written with the idempotent `aput`: a second run leaves the files untouched."""
    orders = [
        {"id": f"o-{i:03d}", "customer": f"c-{i % 4 + 1}", "amount_cents": 400 + 150 * i}
        for i in range(1, 9)
    ]
    lines = "".join(json.dumps(order) + "\n" for order in orders)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=["id", "order_id", "reason"], lineterminator="\n")
    writer.writeheader()
    for i, reason in enumerate(("damaged", "late", "wrong size", "changed mind"), start=1):
        writer.writerow({"id": f"r-{i:03d}", "order_id": f"o-{i * 2:03d}", "reason": reason})
    paths = [directory / "orders.jsonl", directory / "returns.csv"]
    await files.aput(paths[0], lines)
    await files.aput(paths[1], buffer.getvalue())
    return paths


# ---------------------------------------------------------------------------- output


def _describe(exc: BaseException) -> str:
    notes = " ".join(getattr(exc, "__notes__", ()))
    return f"{type(exc).__name__}: {exc}" + (f" ({notes})" if notes else "")


def report_rows(entries: Sequence[Entry], result: nk.MapResult[Record]) -> list[Record]:
    """One row per input record, in input order: enriched (``status: ok``) or with its error."""
    rows: list[Record] = []
    enriched = iter(enumerate(result.results))
    for entry in entries:
        if entry.error is not None:
            rows.append({"source": entry.source, "status": "failed", "error": entry.error})
            continue
        index, value = next(enriched)
        row: Record = {"source": entry.source, **(value or entry.record)}
        if index in result.errors:
            row.update(status="failed", error=_describe(result.errors[index]))
        else:
            row.update(status="ok", error=None)
        rows.append(row)
    return rows


def render(rows: Sequence[Record], fmt: str) -> str:
    """The report as JSON (counts and rows) or CSV (one line per row, tags joined by ``;``)."""
    failed = sum(1 for row in rows if row["status"] == "failed")
    if fmt == "json":
        summary = {"records": len(rows), "enriched": len(rows) - failed, "failed": failed}
        return json.dumps({**summary, "rows": list(rows)}, indent=2, sort_keys=False) + "\n"
    fields = ["source", "id"]
    for row in rows:
        fields += [name for name in row if name not in fields and name not in ("status", "error")]
    fields += ["status", "error"]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {
            name: ";".join(value) if isinstance(value, list) else value
            for name, value in row.items()
        }
        writer.writerow(flat)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- the program


async def make_report(
    base: str,
    paths: Sequence[Path],
    output: Path,
    fmt: str,
    concurrency: int,
    http_timeout: float,
) -> list[Record]:
    """Read, enrich (`concurrency` at a time), write `output` atomically; returns the rows.

    `output`'s directory must exist. `http_timeout` is the client's timeout for each answer.
    """
    entries = await read_records(paths)
    readable = [entry.record for entry in entries if entry.error is None]
    async with httpx.AsyncClient(base_url=base, timeout=http_timeout) as client:
        with nk.use(http=client):
            result = await enrich_record.amap(readable, concurrency=concurrency)
    rows = report_rows(entries, result)
    await files.awrite_atomic(output, render(rows, fmt))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser("file_report", "Enrich the records of JSON-lines and CSV files into a report.")
    cli.add_argument(
        "--input",
        type=Path,
        help="directory of *.jsonl / *.csv files (default: a sample set in --data-dir)",
    )
    cli.add_argument(
        "--output", type=Path, help="the report file (default: report.<format> in --data-dir)"
    )
    cli.add_argument(
        "--format",
        choices=("json", "csv"),
        help="report format (default: from --output's suffix, else json)",
    )
    cli.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="enrichment requests in flight at once (default: %(default)s)",
    )
    cli.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for each HTTP answer (default: %(default)s)",
    )
    args = cli.parse_args(argv)
    root = data_dir(args.data_dir)
    fmt = args.format or ("csv" if args.output and args.output.suffix.lower() == ".csv" else "json")
    output: Path = args.output or root / f"report.{fmt}"
    if args.input is not None:
        if not args.input.is_dir():
            cli.error(f"--input {args.input} is not a directory")
        paths = input_files(args.input)
        where = args.input
    else:
        where = data_dir(root / "report-input")
        paths = asyncio.run(write_sample(where))
    output.parent.mkdir(parents=True, exist_ok=True)
    metrics = nk.Metrics()
    remove_sink = nk.add_sink(metrics)
    started = time.perf_counter()
    try:
        with api_base(args.api_url, faults=args.faults, seed=args.seed) as (base, api):
            source = "a local API" if api is not None else base
            faults = (
                f" failing {args.faults:.0%} of requests" if api is not None and args.faults else ""
            )
            print(
                f"file_report: {len(paths)} files in {where} -> {source}{faults}, "
                f"{args.concurrency} requests at a time"
            )
            rows = asyncio.run(
                make_report(base, paths, output, fmt, args.concurrency, args.timeout)
            )
    finally:
        remove_sink()
    failed = [row for row in rows if row["status"] == "failed"]
    retries = sum(stats.retries for stats in metrics.snapshot().values())
    print(f"  records    {len(rows):>4}")
    print(f"  enriched   {len(rows) - len(failed):>4}")
    print(
        f"  failed     {len(failed):>4}" + ("   (in the report with their error)" if failed else "")
    )
    for row in failed[:5]:
        print(f"    {row['source']} (id {row.get('id', '?')}): {row['error']}")
    print(f"  retries    {retries:>4}   (transient errors the node rode out)")
    print(
        f"  report     {output} ({fmt}, written atomically) in {time.perf_counter() - started:.2f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
