"""`Message`: one outbox message as a handler receives it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Message", "messages_from"]


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox message: `key` is stable, so a redelivery is recognisable downstream."""

    id: int
    topic: str
    key: str
    payload: Any
    attempts: int


def messages_from(rows: Iterable[Sequence[Any]]) -> list[Message]:
    """`Message`s from ``SELECT id, topic, key, payload, attempts`` rows, oldest first."""
    return sorted(
        (Message(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows), key=lambda m: m.id
    )
