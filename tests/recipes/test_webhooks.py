"""recipes.webhooks: each (target, event) is delivered at most once, by the server's ledger.

The DemoAPI verifies every ``X-Signature`` (it answers 401 otherwise), injects faults of
every kind, and answers 410 for a gone target; deliveries are counted from its ledger and
outcomes from the recipe's JSON-lines file. nodekit's waits are instant, and ``--timeout
0.2`` makes slow answers (held 1 s) time out on the client after the server processed them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodekit.testing import FaultPlan, Instant
from recipes import webhooks
from recipes._demo_api import DemoAPI

SECRET = "test-secret"
COUNT = 6
LIVE = ("a", "b")
GONE = "c"
# Every fault kind first, then a seeded storm: 40 % of the requests fail.
SCRIPT: dict[str, Any] = {"POST /webhooks": ["drop_after", "slow", "503", "429", "drop_before"]}


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    plan = FaultPlan(seed=5, rate=0.4, script=SCRIPT, retry_after=0, slow=1.0)
    with DemoAPI(faults=plan, webhook_secret=SECRET) as server:
        server.gone(GONE)
        yield server


def run(api: DemoAPI, tmp_path: Path, *extra: str) -> int:
    return webhooks.main(
        [
            "--api-url",
            api.url,
            "--data-dir",
            str(tmp_path),
            "--secret",
            SECRET,
            "--targets",
            ",".join((*LIVE, GONE)),
            "--count",
            str(COUNT),
            "--timeout",
            "0.2",
            *extra,
        ]
    )


def outcomes(tmp_path: Path) -> list[dict[str, str]]:
    text = (tmp_path / "webhook-outcomes.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def delivered(api: DemoAPI) -> Counter[tuple[str, str]]:
    """(target, event id) -> deliveries the server accepted (its effects, not its replays)."""
    return Counter(
        (entry.data["target"], entry.data["event"]["id"])
        for entry in api.ledger.find(route="POST /webhooks", effect=True)
    )


def test_each_event_reaches_each_live_target_once_through_a_storm_and_a_second_run(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    """Lost answers are retried with the same key and replayed by the server, never redelivered."""
    ids = [event["id"] for event in webhooks.make_events(COUNT)]

    assert run(api, tmp_path) == 0
    first = outcomes(tmp_path)
    after_first = len(api.ledger)
    assert run(api, tmp_path) == 0
    second = outcomes(tmp_path)

    expected = {(target, event): 1 for target in LIVE for event in ids}
    assert delivered(api) == expected  # exactly once each, across both runs
    assert len(api.ledger) == after_first  # the second run sent nothing: replayed locally
    assert {e.fault for e in api.ledger if e.fault} == set(FaultPlan().kinds)
    assert api.ledger.find(route="POST /webhooks", outcome="replayed")  # the server deduped
    keyed = [entry.idempotency_key for entry in api.ledger.find(route="POST /webhooks")]
    assert all(keyed)
    live_first = Counter(r["outcome"] for r in first if r["target"] in LIVE)
    assert set(live_first) <= {"delivered", "replayed"}
    assert sum(live_first.values()) == len(LIVE) * COUNT
    assert Counter(r["outcome"] for r in second if r["target"] in LIVE) == {
        "replayed": len(LIVE) * COUNT
    }


def test_a_gone_target_is_never_called_after_its_first_410(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    """The 410 is recorded as gone and the target's remaining events are skipped, in both runs."""
    assert run(api, tmp_path) == 0
    first = outcomes(tmp_path)
    assert run(api, tmp_path) == 0
    second = outcomes(tmp_path)

    to_gone = api.ledger.find(route=f"POST /webhooks/{GONE}")
    answered = [entry.status for entry in to_gone if entry.status is not None]
    assert answered[-1] == 410
    assert answered.count(410) == 1  # nothing was sent after it, nor in the second run
    assert not api.deliveries(GONE)
    for records in (first, second):
        gone = [r["outcome"] for r in records if r["target"] == GONE]
        assert gone == ["gone"] + ["skipped"] * (COUNT - 1)


def test_a_wrong_secret_fails_every_event_without_retrying_or_delivering(
    tmp_path: Path, nk_instant: Instant, capsys: pytest.CaptureFixture[str]
) -> None:
    """401 is permanent: one request per event, each recorded as failed; the run exits 1."""
    with DemoAPI(webhook_secret="the-real-secret") as api:
        code = webhooks.main(
            [
                *("--api-url", api.url, "--data-dir", str(tmp_path), "--secret", "wrong"),
                *("--targets", "a", "--count", "3"),
            ]
        )
        assert code == 1
        assert [entry.status for entry in api.ledger] == [401, 401, 401]
        assert not api.deliveries("a")
    assert [r["outcome"] for r in outcomes(tmp_path)] == ["failed"] * 3
    assert "FAILED a/evt-0001: HTTPStatusError" in capsys.readouterr().out


def test_outcomes_file_is_replaced_atomically(
    api: DemoAPI, tmp_path: Path, nk_instant: Instant
) -> None:
    """Only the outcome file and the key store are left: no temporary files."""
    assert run(api, tmp_path) == 0
    assert run(api, tmp_path, "--outcomes", str(tmp_path / "out" / "runs.jsonl")) == 0

    assert not list(tmp_path.rglob("*.tmp"))
    lines = (tmp_path / "out" / "runs.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == COUNT * 3


@pytest.mark.services
def test_keys_kept_in_postgres_make_the_second_run_send_nothing(
    api: DemoAPI, tmp_path: Path, postgres_url: str, pg_schema: str, nk_instant: Instant
) -> None:
    """``--db-url postgresql://`` keeps the keys' records in PostgreSQL (a fresh schema)."""
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}options=-csearch_path%3D{pg_schema}"
    assert run(api, tmp_path, "--db-url", url) == 0
    sent = len(api.ledger)
    assert run(api, tmp_path, "--db-url", url) == 0

    assert len(api.ledger) == sent
    assert all(count == 1 for count in delivered(api).values())
    assert len(delivered(api)) == len(LIVE) * COUNT
    assert not (tmp_path / "webhooks.sqlite").exists()


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        webhooks.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--api-url", "--data-dir", "--faults", "--secret", "--targets", "--count"):
        assert flag in out
