"""Breaker and bulkhead steps for the SQL stores: one `_rules` function on one locked row.

A SQL store supplies a `Cell`: it runs a function on a primitive's JSON document inside one
transaction that holds its row (and writes the document back if the function changed it),
on the store's clock. Everything else — which rule, with which arguments — is here, once for
SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ._rules import (
    breaker_admit,
    breaker_force,
    breaker_read,
    breaker_record,
    breaker_release,
    slots_acquire,
    slots_in_use,
    slots_release,
    slots_renew,
)
from ._state import BreakerSettings

__all__ = ["BREAKER", "BULKHEAD", "Cell", "DocBreaker", "DocSlots"]

T = TypeVar("T")
Doc = dict[str, Any]

BREAKER = "breaker"
BULKHEAD = "bulkhead"


class Cell(Protocol):
    """One store's rows of shared state, keyed by (kind, name)."""

    def step(
        self, kind: str, name: str, fn: Callable[[Doc, float], T], *, bounded: bool = True
    ) -> T:
        """`fn(document, now)` in one transaction holding the row; written back if changed.

        `bounded`: waiting for a connection is bounded by the node's deadline (before the
        call); not for what follows the call (an outcome, a release).
        """
        ...

    async def astep(
        self, kind: str, name: str, fn: Callable[[Doc, float], T], *, bounded: bool = True
    ) -> T: ...

    def peek(self, kind: str, name: str) -> tuple[Doc, float]:
        """The document as it stands (no lock) and the store's time."""
        ...


class DocBreaker:
    """`_shared.BreakerSteps` on a `Cell`."""

    def __init__(self, cell: Cell, name: str, settings: BreakerSettings) -> None:
        self.cell = cell
        self.name = name
        self.settings = settings

    def admit(self, successes: int) -> tuple[bool, str, int | None, float | None, bool, bool]:
        s = self.settings
        return self.cell.step(
            BREAKER, self.name, lambda d, now: breaker_admit(d, s, now, successes)
        )

    async def aadmit(
        self, successes: int
    ) -> tuple[bool, str, int | None, float | None, bool, bool]:
        s = self.settings
        return await self.cell.astep(
            BREAKER, self.name, lambda d, now: breaker_admit(d, s, now, successes)
        )

    def record(
        self, successes: int, probe: int | None, failed: bool
    ) -> tuple[str | None, int, int, bool]:
        s = self.settings
        return self.cell.step(
            BREAKER,
            self.name,
            lambda d, now: breaker_record(d, s, now, successes, probe, failed),
            bounded=False,
        )

    async def arecord(
        self, successes: int, probe: int | None, failed: bool
    ) -> tuple[str | None, int, int, bool]:
        s = self.settings
        return await self.cell.astep(
            BREAKER,
            self.name,
            lambda d, now: breaker_record(d, s, now, successes, probe, failed),
            bounded=False,
        )

    def release(self, probe: int) -> None:
        self.cell.step(BREAKER, self.name, lambda d, now: breaker_release(d, probe), bounded=False)

    async def arelease(self, probe: int) -> None:
        await self.cell.astep(
            BREAKER, self.name, lambda d, now: breaker_release(d, probe), bounded=False
        )

    def force(self, state: str) -> bool:
        return self.cell.step(
            BREAKER, self.name, lambda d, now: breaker_force(d, now, state), bounded=False
        )

    def read(self) -> str:
        doc, now = self.cell.peek(BREAKER, self.name)
        return breaker_read(doc, self.settings, now)


class DocSlots:
    """`_shared.SlotSteps` on a `Cell`."""

    def __init__(self, cell: Cell, name: str) -> None:
        self.cell = cell
        self.name = name

    def take(self, token: str, limit: int, queue: int, lease: float) -> str:
        return self.cell.step(
            BULKHEAD, self.name, lambda d, now: slots_acquire(d, now, token, limit, queue, lease)
        )

    async def atake(self, token: str, limit: int, queue: int, lease: float) -> str:
        return await self.cell.astep(
            BULKHEAD, self.name, lambda d, now: slots_acquire(d, now, token, limit, queue, lease)
        )

    def renew(self, token: str, lease: float) -> bool:
        return self.cell.step(
            BULKHEAD, self.name, lambda d, now: slots_renew(d, now, token, lease), bounded=False
        )

    def give(self, token: str) -> None:
        self.cell.step(BULKHEAD, self.name, lambda d, now: slots_release(d, token), bounded=False)

    async def agive(self, token: str) -> None:
        await self.cell.astep(
            BULKHEAD, self.name, lambda d, now: slots_release(d, token), bounded=False
        )

    def count(self) -> int:
        doc, now = self.cell.peek(BULKHEAD, self.name)
        return slots_in_use(doc, now)
