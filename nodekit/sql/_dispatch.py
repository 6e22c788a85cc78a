"""`Dispatcher`: one of several competing outbox dispatchers, looping until it is stopped.

Run as many as the load needs — threads (one connection each), processes (``nodekit outbox
run``), hosts — on one outbox table: the claim protocol (`_claims`) hands each message to one
of them at a time. `stop` (from a signal handler, another thread) is graceful: the message
being delivered finishes and is marked, the rest of the batch is given back at once.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from ._claims import check_batch, check_seconds, new_owner
from ._message import Message
from ._outbox import Outbox

__all__ = ["Dispatcher"]


def _awaitable(handler: Callable[[Message], Any]) -> Callable[[Message], Awaitable[Any]]:
    async def call(message: Message) -> Any:
        return handler(message)

    return call


class Dispatcher:
    """Claims batches from an outbox and delivers them until `stop` is called.

    ``Dispatcher(conn, handler, topic=, batch=, lease=, idle=, retry_delay=)``: `conn` is the
    dispatcher's own idle sqlite3 or psycopg connection; `handler` takes a `Message` (a
    coroutine function is run on a private event loop); `batch` messages are claimed at a
    time for `lease` seconds (renewed while they are delivered); when nothing could be
    delivered it sleeps `idle` seconds; a message whose handler raised is not claimed again
    for `retry_delay` seconds. `owner` is the name it claims under (``claimed_by``).
    `arun` is the loop on an event loop (for a psycopg ``AsyncConnection``).
    """

    def __init__(
        self,
        conn: Any,
        handler: Callable[[Message], Any],
        *,
        outbox: Outbox | None = None,
        topic: str | None = None,
        batch: int = 100,
        lease: float | timedelta = 30.0,
        idle: float | timedelta = 0.5,
        retry_delay: float | timedelta = 1.0,
    ) -> None:
        self.outbox = outbox if outbox is not None else Outbox()
        self.conn = conn
        self.owner = new_owner()
        self.delivered = 0
        self._stop = threading.Event()
        # checked now (a ConfigError here, not in the loop)
        check_batch(batch, "batch")
        self._round = self.outbox._round(
            owner=self.owner, limit=batch, topic=topic, lease=lease, retry_delay=retry_delay
        )
        self.idle = check_seconds(idle, "idle", positive=False)
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s, for an async handler
        self._async = inspect.iscoroutinefunction(handler)
        self._ahandler = handler if self._async else _awaitable(handler)
        if self._async:

            def run_async(message: Message) -> Any:
                if self._loop is None:
                    return asyncio.run(handler(message))
                return self._loop.run_until_complete(handler(message))

            self.handler: Callable[[Message], Any] = run_async
        else:
            self.handler = handler

    def __repr__(self) -> str:
        return f"Dispatcher({self.outbox.table!r}, owner={self.owner!r})"

    @property
    def stopping(self) -> threading.Event:
        """Set once `stop` was called."""
        return self._stop

    def stop(self) -> None:
        """Finish the message being delivered, give the rest of the batch back, return."""
        self._stop.set()

    def _options(self) -> dict[str, Any]:
        """`Outbox.dispatch`'s options for one round of this dispatcher."""
        r = self._round
        return {
            "limit": r.limit,
            "topic": r.topic,
            "lease": r.lease,
            "retry_delay": r.retry_delay,
            "owner": self.owner,
            "stop": self._stop,
        }

    def run_once(self) -> int:
        """One round: claim a batch, deliver it, settle it; returns how many were delivered."""
        done = self.outbox.dispatch(self.conn, self.handler, **self._options())
        self.delivered += done
        return done

    async def arun_once(self) -> int:
        """`run_once` on the event loop (`Outbox.adispatch`); a sync handler is called inline."""
        done = await self.outbox.adispatch(self.conn, self._ahandler, **self._options())
        self.delivered += done
        return done

    async def arun(self) -> int:
        """`run` on the event loop, for a psycopg ``AsyncConnection`` and an async handler."""
        while not self._stop.is_set():
            if await self.arun_once() == 0:
                # a threading.Event (`stop` may come from a signal handler or another thread)
                # is waited for off the loop
                await asyncio.to_thread(self._stop.wait, self.idle)
        return self.delivered

    def run(self) -> int:
        """Loop over `run_once` until stopped; returns how many this dispatcher delivered.

        Errors of the database propagate (the claims of the batch then end with their lease);
        handler errors never do.
        """
        if self._async:
            self._loop = asyncio.new_event_loop()
        try:
            while not self._stop.is_set():
                if self.run_once() == 0:
                    self._stop.wait(self.idle)
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None
        return self.delivered
