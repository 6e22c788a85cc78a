"""A corrupt record is one error on every store: `IdempotencyCorruptRecord`, permanent, naming
the store, the key's fingerprint and the field; the node does not run again and the record is
kept as it was (never taken for absent, expired, in progress or acquirable)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

import nodekit as nk
from nodekit.cli import main
from nodekit.testing import instant

from .conftest import Backend, FakeClock

# (fields to overwrite, the field the error names); values as text, like a hand-edited row
CORRUPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"state": "DONE"}, "state"),
    ({"expires_at": "nan"}, "expires_at"),
    ({"expires_at": "-inf"}, "expires_at"),
    ({"expires_at": "inf"}, "expires_at"),
    ({"expires_at": "garbage"}, "expires_at"),
    ({"state": "IN_PROGRESS", "lease_expires_at": "nan"}, "lease_expires_at"),
    ({"epoch": "0"}, "epoch"),
    ({"epoch": "x"}, "epoch"),
    ({"format_version": "99"}, "format_version"),
]
IDS = ["-".join(f"{k}={v}" for k, v in fields.items()) for fields, _ in CORRUPTIONS]


def charge_node(store: Any, runs: list[str], *, is_async: bool) -> Any:
    """A keyed WRITE node that retries anything transient: a corrupt record must not be."""
    options: dict[str, Any] = {
        "name": "charge",
        "effect": nk.Effect.WRITE,
        "retry": nk.Retry(attempts=5),
        "idempotency": nk.Idempotency(key=lambda order: order, store=store),
    }
    if is_async:

        async def acharge(order: str) -> str:
            runs.append(order)
            return f"charged {order}"

        return nk.node(**options)(acharge)

    def charge(order: str) -> str:
        runs.append(order)
        return f"charged {order}"

    return nk.node(**options)(charge)


def as_text(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Rows with every value as its repr: NaN never equals itself, its text does."""
    return [{name: repr(value) for name, value in row.items()} for row in rows]


def check(exc: nk.IdempotencyCorruptRecord, field: str, digest: str) -> None:
    assert exc.field == field
    assert exc.key_fingerprint == digest[:12]
    assert exc.store is not None
    assert "Store" in exc.store
    assert field in str(exc)
    assert digest[:12] in str(exc)
    assert "o-1" not in str(exc)  # the raw key never reaches an error


@pytest.mark.parametrize(("fields", "field"), CORRUPTIONS, ids=IDS)
def test_a_corrupt_record_raises_and_runs_nothing(
    backend: Backend, fake_clock: FakeClock, fields: dict[str, Any], field: str
) -> None:
    store = backend.make(fake_clock)
    runs: list[str] = []
    charge = charge_node(store, runs, is_async=False)
    assert charge("o-1") == "charged o-1"
    backend.corrupt(store, **fields)
    rows = backend.rows()
    digest, planted = rows[0]["key_digest"], as_text(rows)
    fake_clock.advance(7 * 24 * 3600.0)  # past the TTL: a sane record would have expired
    with instant() as waits, pytest.raises(nk.IdempotencyCorruptRecord) as caught:
        charge("o-1")
    check(caught.value, field, digest)
    assert waits.sleeps == []  # permanent: never retried
    assert runs == ["o-1"]
    assert as_text(backend.rows()) == planted


@pytest.mark.parametrize(
    ("fields", "field"), [CORRUPTIONS[0], CORRUPTIONS[1], CORRUPTIONS[5]], ids=IDS[:2] + IDS[5:6]
)
async def test_a_corrupt_record_raises_and_runs_nothing_async(
    abackend: Backend, fake_clock: FakeClock, fields: dict[str, Any], field: str
) -> None:
    store = abackend.make(fake_clock)
    runs: list[str] = []
    charge = charge_node(store, runs, is_async=True)
    assert await charge("o-1") == "charged o-1"
    abackend.corrupt(store, **fields)
    rows = abackend.rows()
    digest, planted = rows[0]["key_digest"], as_text(rows)
    with pytest.raises(nk.IdempotencyCorruptRecord) as caught:
        await charge("o-1")
    check(caught.value, field, digest)
    assert runs == ["o-1"]
    assert as_text(abackend.rows()) == planted


def test_store_show_displays_a_corrupt_record_field_by_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.db"
    with nk.SQLiteStore(path) as store:
        charge_node(store, [], is_async=False)("o-1")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE nodekit_idempotency SET state = 'DONE'")
        (digest,) = conn.execute("SELECT key_digest FROM nodekit_idempotency").fetchone()
    conn.close()
    assert main(["store", "show", f"sqlite:///{path}", "charge", digest]) == 3
    out = capsys.readouterr().out
    assert out.startswith("CORRUPT: field 'state'")
    assert "state: DONE" in out
    assert "result: <" in out  # the payload's length, never its text
    assert "charged o-1" not in out
