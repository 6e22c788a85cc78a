"""recipes.file_report: every input record is in the report, enriched or with its error.

Requests are counted from the DemoAPI's ledger and records from the report file; nodekit's
waits are instant, and ``--timeout 0.2`` makes slow answers (held 1 s) time out (the async
attempt is cancelled and retried).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodekit.testing import FaultPlan, Instant
from recipes import file_report
from recipes._demo_api import DemoAPI

ROOT = Path(__file__).resolve().parents[2]
# Faults per record (the order of concurrent requests varies, so no random ones): each kind
# once, and one record that fails five times before its sixth and last attempt succeeds.
SCRIPT: dict[str, Any] = {
    "GET /enrich/j-01": ["503"],
    "GET /enrich/j-02": ["429", "429"],
    "GET /enrich/j-03": ["drop_before"],
    "GET /enrich/j-04": ["drop_after", "503"],
    "GET /enrich/j-05": ["slow"],
    "GET /enrich/c-02": ["slow", "drop_after", "503", "drop_before", "429"],
}


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    plan = FaultPlan(rate=0.0, script=SCRIPT, retry_after=0, slow=1.0)
    with DemoAPI(faults=plan) as server:
        yield server


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """20 JSON-lines records (one malformed line among them) and 10 CSV records."""
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [json.dumps({"id": f"j-{i:02d}", "qty": i}) for i in range(1, 21)]
    lines.insert(7, "{not json")
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = "".join(f"c-{i:02d},{i * 10}\n" for i in range(1, 11))
    (folder / "b.csv").write_text("id,amount\n" + rows, encoding="utf-8")
    (folder / "notes.txt").write_text("not an input\n", encoding="utf-8")
    return folder


def run(api: DemoAPI, tmp_path: Path, *extra: str) -> int:
    return file_report.main(
        ["--api-url", api.url, "--data-dir", str(tmp_path / "data"), "--timeout", "0.2", *extra]
    )


def test_every_record_is_enriched_through_faults_and_the_report_is_atomic(
    api: DemoAPI, inputs: Path, tmp_path: Path, nk_instant: Instant
) -> None:
    """30 records through faults of every kind: 30 enriched rows, and the malformed line."""
    output = tmp_path / "out" / "report.json"
    code = run(api, tmp_path, "--input", str(inputs), "--output", str(output), "--concurrency", "4")

    report = json.loads(output.read_text(encoding="utf-8"))
    rows = report["rows"]
    ok = [row for row in rows if row["status"] == "ok"]
    assert sorted(row["id"] for row in ok) == sorted(
        [f"j-{i:02d}" for i in range(1, 21)] + [f"c-{i:02d}" for i in range(1, 11)]
    )
    assert all(isinstance(row["score"], int) and row["tier"] for row in ok)
    [bad] = [row for row in rows if row["status"] == "failed"]
    assert bad["source"] == "a.jsonl:8"
    assert "invalid JSON" in bad["error"]
    assert (report["records"], report["enriched"], report["failed"]) == (31, 30, 1)
    assert code == 1  # a record failed: the exit status says so, the report has the rest
    assert [row["source"] for row in rows][:9] == [f"a.jsonl:{n}" for n in range(1, 10)]
    served = Counter(
        entry.path for entry in api.ledger.find(route="GET /enrich", outcome="processed")
    )
    assert set(served) == {f"/enrich/{row['id']}" for row in ok}  # each one asked for
    faults = Counter(e.fault for e in api.ledger if e.fault)
    assert faults == Counter(kind for kinds in SCRIPT.values() for kind in kinds)
    assert len(api.ledger.find(route="GET /enrich/c-02")) == 6
    # concurrent: while the slow answer is held, other records are asked for, not its retry
    entries = api.ledger.entries
    slow = next(i for i, entry in enumerate(entries) if entry.fault == "slow")
    assert entries[slow + 1].path != entries[slow].path
    assert sorted(os.listdir(output.parent)) == ["report.json"]  # no temporary file left


def test_a_record_that_keeps_failing_is_reported_without_losing_the_others(
    inputs: Path, tmp_path: Path, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    """Enrichment of c-03 fails on every attempt: it is in the report with its error."""
    faults: list[Any] = ["503"] * 10
    storm = FaultPlan.scripted(*faults, route="GET /enrich/c-03", retry_after=0)
    with DemoAPI(faults=storm) as api:
        output = tmp_path / "report.csv"
        assert run(api, tmp_path, "--input", str(inputs), "--output", str(output)) == 1
        assert len(api.ledger.find(route="GET /enrich/c-03")) == 6  # every attempt, then no more

    with output.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 31
    failed = {row["source"]: row for row in rows if row["status"] == "failed"}
    assert set(failed) == {"a.jsonl:8", "b.csv:4"}
    assert failed["b.csv:4"]["id"] == "c-03"
    assert "503" in failed["b.csv:4"]["error"]
    assert all(row["tier"] for row in rows if row["status"] == "ok")
    out = capsys.readouterr().out
    assert "b.csv:4 (id c-03): HTTPStatusError" in out


def test_without_input_a_sample_set_is_generated_and_reported(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    assert run(api, tmp_path) == 0

    report = json.loads((tmp_path / "data" / "report.json").read_text(encoding="utf-8"))
    assert report["failed"] == 0
    assert report["records"] == report["enriched"] > 0
    assert sorted(p.name for p in (tmp_path / "data" / "report-input").iterdir()) == [
        "orders.jsonl",
        "returns.csv",
    ]


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        file_report.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--api-url", "--data-dir", "--faults", "--input", "--output", "--concurrency"):
        assert flag in out


@pytest.mark.slow
def test_runs_as_a_program_with_nothing_but_the_project(tmp_path: Path) -> None:
    """``python -m recipes.file_report`` in an empty directory: its own local API, sample, report."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "recipes.file_report", "--data-dir", "tmp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "report" in done.stdout
    report = json.loads((tmp_path / "tmp" / "report.json").read_text(encoding="utf-8"))
    assert report["records"] == report["enriched"] == 12
