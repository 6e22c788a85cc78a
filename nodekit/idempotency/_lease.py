"""A claim: one caller's hold on one key — the store, the key, its own token and its lease.

Shared by the claim protocol (`_claim.py`), which acquires and settles it, and the renewer
(`_renewer.py`), which keeps it alive from its own thread; it sits below both.
"""

from __future__ import annotations

import time
from typing import Any

from .._events import emit, wanted
from ._base import new_token
from ._holder import ALIVE, KeyHolder, holder_text, key_holder
from ._store import RecordKey

__all__ = ["Claim"]


class Claim:
    """One caller's claim on one key: the store, the key, its own token and its lease.

    `lease_end` is this process's conservative view of when the lease ends (monotonic
    clock, measured from *before* the acquire or renewal that set it). `renewing`,
    `settling` and `lost` are shared with the renewer thread.
    """

    # Defaults for what most claims never change (a class attribute until set on the
    # instance): a keyed call creates one claim per call, replays included.
    context: Any = None  # a node's context: its run id is computed only when needed
    source: str | None = None
    attempt = 0
    epoch: int | None = None
    lease_end = 0.0
    renewing = False
    settling = False
    lost = False
    outcome: tuple[str | None, str | None] = (None, None)  # for a late completion
    # the owner token of a holder found dead on this host: the next acquire takes its
    # record over even though its lease is valid (`_holder.py`)
    dead: str | None = None
    since = 0.0  # when the store recorded this claim's acquisition (its clock)

    def __init__(
        self,
        store: Any,
        key: RecordKey,
        fingerprint: str,
        lease: float,
        ttl: float,
        takeover: bool,
        node: str | None,
        run_id: str | None,
        source: str | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.fingerprint = fingerprint
        self.token = new_token()
        self.lease = lease
        self.ttl = ttl
        self.takeover = takeover
        self.node = node
        self.given_run_id = run_id
        if source is not None:
            self.source = source

    @property
    def run_id(self) -> str | None:
        context = self.context
        return context.run_id if context is not None else self.given_run_id

    def event(self, name: str, *, exc: BaseException | None = None, **fields: Any) -> None:
        """An event about this claim: the key's short fingerprint, never the key."""
        if not wanted(name):
            return
        if self.epoch is not None:
            fields["epoch"] = self.epoch
        if self.source is not None:
            fields["source"] = self.source
        if self.dead is not None and name == "idempotency.takeover":
            fields["dead_holder"] = True  # taken over from a process gone, before its lease ended
        emit(name, self.node, self.run_id, self.attempt, exc=exc, key=self.key.short, **fields)

    def held_here(self) -> KeyHolder:
        """This process as the holder of this claim, for an error that says who holds the key
        (the lease's end as this process conservatively sees it)."""
        ends = time.time() + (self.lease_end - time.monotonic())
        return key_holder(holder_text(), self.since, ends, ALIVE)

    def lose(self) -> None:
        """The lease was taken over: say so once (the renewer may have said it already)."""
        if not self.lost:
            self.lost = True
            self.event("idempotency.lease_lost")
