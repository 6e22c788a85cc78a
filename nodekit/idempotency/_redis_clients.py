"""`RedisStore`'s clients: one sync client and one asyncio client per event loop, each with
its scripts and the slots that bound it, closed apart from the store (a finalizer can close
them without keeping the store alive); and the once-per-server durability check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import threading
import warnings
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from .._errors import NodekitWarning
from .._runtime import RUNTIME
from ._redis_scripts import SOURCES

__all__ = [
    "AsyncScript",
    "Clients",
    "Scripts",
    "SyncScript",
    "close_with_loop",
    "config_value",
    "durability_asked",
    "outside_nodekit",
    "report_durability",
    "server_of",
    "text",
]


def text(value: Any) -> str:
    # undecodable bytes survive as surrogates, so a corrupt value fails decoding later
    # (IdempotencyCorruptRecord) instead of being silently altered here
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Scripts:
    """One redis-py client (sync or async), its four scripts, and the slots that bound it.

    `slots` counts the operations in flight on the client: a `threading.BoundedSemaphore` for
    the sync client, an `asyncio.Semaphore` for an event loop's. `owned` says the store made
    the client (and closes it); `watch` is an async client's loop-shutdown hook.
    """

    __slots__ = ("acquire", "client", "complete", "owned", "release", "renew", "slots", "watch")

    def __init__(self, client: Any, slots: Any, *, owned: bool) -> None:
        self.client = client
        self.slots = slots
        self.owned = owned
        self.watch: AsyncGenerator[None, None] | None = None
        kind = AsyncScript if hasattr(client, "aclose") else SyncScript
        self.acquire, self.complete, self.release, self.renew = (
            kind(client, source) for source in SOURCES
        )


class SyncScript:
    """One Lua script on a sync client: ``EVALSHA`` straight through `execute_command`, loaded
    on ``NOSCRIPT`` (a restarted server) and sent again.

    redis-py's own `Script` does the same through two more layers of wrappers, which cost
    about a tenth of a first execution's client time.
    """

    __slots__ = ("client", "sha", "source")

    def __init__(self, client: Any, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(self, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return self.client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = self.client.script_load(self.source)
            return self.client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


class AsyncScript(SyncScript):
    """`SyncScript` on an asyncio client."""

    __slots__ = ()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        client = self.client
        try:
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await client.script_load(self.source)
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


class Clients:
    """The clients of one store, apart from the store: a `weakref.finalize` closes them when
    the store is collected or the interpreter exits, which it could not do if it held the
    store itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sync: Scripts | None = None
        # event loop -> its client; a plain dict (a WeakKeyDictionary would never drop an
        # entry: the client's connections reference the loop). Entries leave when their loop
        # shuts down (`close_with_loop`) or, for a loop closed without that, when the next
        # loop's client is made (`sweep`).
        self.loops: dict[asyncio.AbstractEventLoop, Scripts] = {}

    def sweep(self) -> None:
        """Forget the clients of closed loops (closed without `shutdown_asyncgens`)."""
        for loop in [loop for loop in self.loops if loop.is_closed()]:
            scripts = self.loops.pop(loop)
            watch, scripts.watch = scripts.watch, None
            if watch is not None:
                # finish its watcher here (its `finally` sees watch None and awaits nothing):
                # left suspended, it would be finalized later through its closed loop
                with contextlib.suppress(StopIteration):
                    watch.aclose().send(None)

    def close(self) -> None:
        """Close the sync client if it is the store's; forget the clients of closed loops."""
        with self.lock:
            scripts = self.sync
            if scripts is not None and scripts.owned:
                self.sync = None
            self.sweep()
        if scripts is not None and scripts.owned:
            scripts.client.connection_pool.disconnect()


async def close_with_loop(
    clients: Clients, loop: asyncio.AbstractEventLoop, scripts: Scripts
) -> AsyncGenerator[None, None]:
    """Wait, suspended, for the loop to shut down; then close its client there.

    asyncio has no hook at loop close, but `asyncio.run` and `asyncio.Runner` close every
    async generator still suspended (`loop.shutdown_asyncgens()`) while the loop still runs:
    this one's `finally` then closes the client on its own loop, so no socket outlives it.
    """
    try:
        yield
    finally:
        if scripts.watch is not None:  # None: swept after its loop closed, nothing to await
            scripts.watch = None
            with clients.lock:
                if clients.loops.get(loop) is scripts:
                    del clients.loops[loop]
            await scripts.client.aclose(close_connection_pool=True)


# ---------------------------------------------------------------------------- durability


def durability_asked(server: str) -> bool:
    """Whether this process has asked `server` if it keeps anything on disk (once per server
    and process, so a process with many stores warns once; `RUNTIME.reset()` forgets)."""
    return _DURABILITY + server in RUNTIME.warned


def report_durability(server: str, appendonly: Any, save: Any) -> None:
    """Warn if the server keeps nothing on disk (the first report per server only)."""
    with RUNTIME.lock:
        if durability_asked(server):
            return
        RUNTIME.warned.add(_DURABILITY + server)
    aof, rdb = config_value(appendonly, "appendonly"), config_value(save, "save")
    if aof != "no" or rdb != "":  # persistent, or CONFIG refused (None): say nothing
        return
    warnings.warn(
        f"RedisStore: the Redis server at {server} keeps nothing on disk (appendonly no, "
        'save ""): idempotency records will not survive a Redis restart, and a key called '
        "again after one runs its effect again. Enable AOF: `appendonly yes` in redis.conf "
        "(or CONFIG SET appendonly yes, then CONFIG REWRITE).",
        NodekitWarning,
        stacklevel=outside_nodekit(),
    )


_DURABILITY = "redis-durability "


def config_value(reply: Any, name: str) -> str | None:
    """A CONFIG GET reply's value as text; None if CONFIG was refused or the name unknown."""
    if not isinstance(reply, Mapping):
        return None
    for key, value in reply.items():
        if text(key) == name:
            return text(value)
    return None


def server_of(client: Any) -> str:
    """Where a client's connections go: ``host:port`` or a Unix socket path."""
    options = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    path = options.get("path")
    if path:
        return str(path)
    return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"


def outside_nodekit() -> int:
    """The `stacklevel` of the first caller outside nodekit, seen from this one's caller."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("nodekit."):
        level, frame = level + 1, frame.f_back
    return level
