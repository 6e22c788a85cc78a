"""Running coroutines from sync code: a private loop (`LoopRunner`) and one per thread
(`ThreadLoop`, `thread_loop()`).

Sync-mode flows and `node.map` over async nodes run their coroutines on the calling thread's
`ThreadLoop`, kept across calls: an async client opened in one call (an ``httpx.AsyncClient``
given with ``nk.use``) stays bound to a loop that is still open in the next. `LoopRunner` is
a loop of its own, closed by its owner; a `ThreadLoop` uses one when its thread already runs
a loop (a thread whose loop is running cannot run another).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopRunner", "ThreadLoop", "thread_loop"]

T = TypeVar("T")


class LoopRunner:
    """Run coroutines to completion from sync code, on a private event loop.

    The loop is created on first use: in the calling thread when no loop runs there, else in
    a helper thread (a thread whose loop is running cannot run another). Coroutines run in a
    copy of the caller's contextvars. `close()` shuts the loop down (async generators, the
    default executor) and must be called once the owner is done.
    """

    __slots__ = ("_loop", "_runner", "_thread")

    def __init__(self) -> None:
        self._runner: asyncio.Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._runner is None and self._loop is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                self._runner = asyncio.Runner()
            else:
                self._start_thread()
        if self._runner is not None:
            return self._runner.run(coro)
        assert self._loop is not None
        # run_coroutine_threadsafe schedules in a copy of this thread's context
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _start_thread(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    loop.close()

        thread = threading.Thread(target=main, name="nodekit-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread

    def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()


class ThreadLoop:
    """The event loop that the sync runs of one thread share, created on first use.

    In a thread where no loop runs, coroutines run on a loop of this thread (an
    `asyncio.Runner` that is never made the thread's current loop), each in a copy of the
    caller's contextvars; where one runs (`flow.run` called from async code), they run on a
    helper thread's loop (`LoopRunner`), also kept. It is closed when its thread ends or,
    for the main thread, at interpreter exit: tasks cancelled, async generators and the
    default executor shut down.
    """

    __slots__ = ("__weakref__", "helper", "owner", "pid", "runner")

    def __init__(self) -> None:
        self.owner = threading.current_thread()
        self.pid = os.getpid()
        self.runner: asyncio.Runner | None = None
        self.helper: LoopRunner | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            runner = self.runner
            if runner is None:
                runner = self.runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
            return runner.run(coro, context=contextvars.copy_context())
        helper = self.helper
        if helper is None:
            helper = self.helper = LoopRunner()
        return helper.run(coro)

    def close(self, ending: bool = False) -> None:
        """Shut the loops down; `ending`: from the ending thread's teardown (`__del__`)."""
        runner, self.runner = self.runner, None
        helper, self.helper = self.helper, None
        if self.pid != os.getpid():
            # inherited by a forked child: its selector is the parent's (epoll), and closing
            # it here would unregister the parent's sockets; kept, so never collected either
            _INHERITED.append((runner, helper))
            return
        try:
            if runner is not None:
                if not ending:
                    runner.close()
                else:
                    # no `shutdown_default_executor` here: a thread started from a thread's
                    # teardown leaves a dummy thread behind; `loop.close()` stops the executor
                    loop = runner.get_loop()
                    try:
                        tasks = asyncio.all_tasks(loop)
                        for task in tasks:
                            task.cancel()
                        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                        loop.run_until_complete(loop.shutdown_asyncgens())
                    finally:
                        loop.close()
        finally:
            if helper is not None:
                helper.close()

    def __del__(self) -> None:  # its thread ended, and the thread-local dropped it
        with contextlib.suppress(Exception):
            self.close(ending=True)


class _Local(threading.local):
    loop: ThreadLoop | None = None


_LOCAL = _Local()
_LOOPS: weakref.WeakSet[ThreadLoop] = weakref.WeakSet()  # every live one, closed at exit
_INHERITED: list[Any] = []  # a forked child's loops of its parent (see `ThreadLoop.close`)


def thread_loop() -> ThreadLoop:
    """The calling thread's `ThreadLoop` (made on first use, and again after a fork)."""
    loop = _LOCAL.loop
    if loop is None or loop.pid != os.getpid():
        if loop is not None:
            loop.close()
        loop = _LOCAL.loop = ThreadLoop()
        _LOOPS.add(loop)
    return loop


@atexit.register
def _close_at_exit() -> None:
    """Close the loops of this thread and of ended threads (a daemon's may still run)."""
    current = threading.current_thread()
    with contextlib.suppress(RuntimeError):  # another thread added one meanwhile
        for loop in list(_LOOPS):
            if loop.owner is current or not loop.owner.is_alive():
                with contextlib.suppress(Exception):
                    loop.close()
