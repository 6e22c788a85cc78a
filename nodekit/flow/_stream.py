"""Streaming a run: its events, each node's update, or the state after each step.

``mode="events"`` yields the run's own events (the objects every sink receives), and those of
the runs nested in it (a subflow's run id is ``f"{run_id}/{node}"``);
``"updates"`` yields ``{node: update}`` for each node that completed (replayed ones too, so
the updates folded over the input give the final state); ``"values"`` a copy of the whole
state after each node, the final state last. The data comes from the ``update`` and ``state``
fields of ``flow.node_finished`` (and of a replay's ``flow.node_skipped``), which stay in
process (`_events._UNLOGGED`).

A sync stream runs the flow in a worker thread (in a copy of the caller's context) and hands
its events over a queue as they happen, so ``node.started`` and a node's ``node.progress``
arrive while the node runs. It keeps the lazy pace of iteration: the next node starts only
once the consumer asked for more after every event of the previous one, so closing the
stream early starts no other node; closing waits for the node in progress, then the run is
closed (resources, journal) in its worker thread, which ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from typing import Any, Literal

from .. import _events
from .._errors import ConfigError
from .._execution import thread_bound_error

__all__ = ["MODES", "Mode", "check_mode", "stream_async", "stream_sync"]

Mode = Literal["events", "updates", "values"]
MODES: tuple[str, ...] = ("events", "updates", "values")

_SKIP = object()
_STEP = object()  # the worker finished a step: every event of it is in the queue before this
_END, _ERROR, _CLOSE_ERROR = 0, 1, 2  # how the worker ended: done, failed, failed to close


def check_mode(flow: str, mode: Any) -> None:
    """`mode` as `stream` and `astream` accept it, else a `ConfigError` naming it."""
    if mode not in MODES:
        raise ConfigError(
            f"flow {flow!r}: mode must be one of 'events', 'updates' or 'values', got {mode!r}",
            option="mode",
        )


class _Pick:
    """What a stream of `mode` yields for an event (`_SKIP`: nothing)."""

    __slots__ = ("last", "mode", "run_id")

    def __init__(self, mode: str, run_id: str) -> None:
        self.mode = mode
        self.run_id = run_id
        self.last: Any = _SKIP

    def __call__(self, event: _events.Event) -> Any:
        if event.run_id != self.run_id:  # a nested run's: its state is not this run's
            return _SKIP
        name = event.name
        if name == "flow.node_finished" or (
            name == "flow.node_skipped" and event.fields.get("reason") == "replayed"
        ):
            fields = event.fields
            if "state" not in fields:
                return _SKIP
            if self.mode == "updates":
                update = fields.get("update")
                return {event.node: dict(update) if update else {}}
            state = self.last = fields["state"]
            return _snapshot(state)
        if name == "flow.finished" and self.mode == "values":
            state = event.fields.get("state")
            if state is not self.last:  # reducers folded again in canonical order, or no node
                self.last = state
                return _snapshot(state)
        return _SKIP


def _ours(run_id: str) -> Callable[[str | None], bool]:
    """Whether an event belongs to the stream of `run_id`: its own, or a nested run's (a
    subflow's run id is ``f"{parent_run_id}/{node}"``)."""
    nested = run_id + "/"

    def mine(event_run_id: str | None) -> bool:
        return event_run_id == run_id or (
            event_run_id is not None and event_run_id.startswith(nested)
        )

    return mine


def _snapshot(state: Any) -> Any:
    """A shallow copy of a state (a dict or a pydantic model): the run goes on meanwhile."""
    if isinstance(state, dict):
        return dict(state)
    copy = getattr(state, "model_copy", None)
    return copy() if callable(copy) else state


def stream_sync(
    steps: Callable[[], Generator[None, None, Any]], run_id: str, mode: str
) -> Generator[Any, None, None]:
    """Drive `steps` (the sync driver) in a worker thread, yielding what `mode` asks for."""
    pick = None if mode == "events" else _Pick(mode, run_id)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    go = threading.Semaphore(0)
    stopping = threading.Event()

    mine = _ours(run_id)

    def sink(event: _events.Event) -> None:
        if mine(event.run_id):
            inbox.put(event)

    def work() -> None:
        outcome: tuple[int, BaseException | None] = (_END, None)
        driver = steps()
        try:
            while True:
                go.acquire()
                if stopping.is_set():
                    break
                try:
                    next(driver)
                except StopIteration:
                    break
                inbox.put(_STEP)
        except BaseException as exc:
            outcome = (_ERROR, exc)
        finally:
            try:
                driver.close()  # a run left early: its resources and journal close here
            except BaseException as exc:  # only a run closed early has work left to close
                if outcome[1] is None:
                    outcome = (_CLOSE_ERROR, exc)
            inbox.put(outcome)

    context = contextvars.copy_context()
    remove = _events.add_sink(sink)
    worker = threading.Thread(
        target=context.run, args=(work,), name=f"nodekit-stream-{run_id}", daemon=True
    )
    ended = False
    try:
        worker.start()
        go.release()
        while True:
            item = inbox.get()
            if item is _STEP:
                go.release()  # the consumer asked for more after the step's last event
            elif type(item) is tuple:
                ended = True
                if item[0] != _END:
                    raise _with_hint(item[1])
                return
            elif pick is None:
                yield item
            else:
                out = pick(item)
                if out is not _SKIP:
                    yield out
    finally:
        remove()
        if not ended:
            stopping.set()
            go.release()
            if worker.is_alive() and worker is not threading.current_thread():
                worker.join()  # the node in progress ends (sync code cannot be interrupted)
            _raise_close_error(inbox)


def _with_hint(exc: BaseException | None) -> BaseException:
    """The run's error; a sqlite3 object used across threads gets a note on why."""
    assert exc is not None
    cause = exc.__cause__
    if cause is not None and thread_bound_error("", {}, cause) is not None:
        exc.add_note(
            "flow.stream runs the flow in a worker thread, and sqlite3 objects work only in "
            "the thread that made them: open the connection inside the node or in a resources= "
            "factory of the flow, or run it with flow.run"
        )
    return exc


def _raise_close_error(inbox: queue.SimpleQueue[Any]) -> None:
    """After an early close: raise what closing the run raised (a resource's exit), if any;
    not the run's own failure (the consumer stopped listening to it)."""
    while True:
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return
        if type(item) is tuple:
            error = item[1]
            if item[0] == _CLOSE_ERROR and not isinstance(error, GeneratorExit):
                raise error
            return


async def stream_async(
    arun: Callable[[], Coroutine[Any, Any, Any]], run_id: str, mode: str
) -> AsyncGenerator[Any, None]:
    """Run `arun` as a task on the running loop, yielding what `mode` asks for."""
    pick = None if mode == "events" else _Pick(mode, run_id)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    end = object()

    mine = _ours(run_id)

    def sink(event: _events.Event) -> None:
        if mine(event.run_id):
            # events come from worker threads too: hand them to the loop in order
            loop.call_soon_threadsafe(inbox.put_nowait, event)

    remove = _events.add_sink(sink)
    task = loop.create_task(arun())
    task.add_done_callback(lambda _: loop.call_soon_threadsafe(inbox.put_nowait, end))
    try:
        while True:
            item = await inbox.get()
            if item is end:
                break
            if pick is None:
                yield item
            else:
                out = pick(item)
                if out is not _SKIP:
                    yield out
        await task
    finally:
        remove()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):  # the consumer stopped listening
                await task
