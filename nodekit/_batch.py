"""`batch=nk.Batch(...)`: concurrent calls of an async node coalesce into one call with a list.

The function takes the list of items as its one positional parameter and returns one result
per item, in the same order (``async def send(items: list[T]) -> list[R]``); callers call the
node with one item (``await send(item)``) and get their own result. Each caller takes a seat
in the node's open batch (one per event loop); the batch is flushed — the function called
once with the seated items, in arrival order — when it holds `Batch.max_size` items, or
`Batch.max_wait` seconds after its first item arrived, whichever comes first.

The batch call is one node call: its retries, timeout, circuit breaker, rate limit and
bulkhead apply to the call as a whole (one attempt chain), and its events name the node. An
item's result that is an `Exception` instance is raised to that caller only; an error of the
whole call is raised to every caller of the batch. A function that returns something other
than a list (or tuple) of one result per item fails every caller with `BatchResultError`
naming the node, and no item is recorded as done.

With `idempotency=`, each item is a keyed call of its own, its key computed from the item
(the key function takes the parameter ``item``). The claim protocol (`idempotency._claim`)
runs in the caller's task, with the seat as its body: a completed key is replayed and never
seated, a busy one is waited for or refused as usual, and only an item whose key is held
takes a seat; once the batch returns, each item's result (or listed business error) is
recorded under its own key. A `BatchResultError` is ambiguous — the effects may have
happened — so every keyed item of that batch keeps its key (`OutcomeUnknown`). Inside the
function `nk.context().batch_keys` lists the items' key digests (None for an unkeyed item),
aligned with the items, for a bulk API that takes a key per item.

Also worth knowing: the batch function runs in a task of its own, in a copy of the context
of the caller that opened the batch (its resources, its run id); its deadline is its own
total timeout, not any caller's. The node's events and metrics count batch calls (one
``node.started`` per batch), the claim events count items. A caller cancelled before its
batch is sent leaves it; one cancelled while its batch runs gets no result, and its key, if
any, stays locked until its lease ends (the effect may happen), as for a cancelled keyed
call. Each event loop has its own open batch (`node.map` from sync code uses its thread's
loop); batches never span processes.

Nothing here is imported or runs for a node without `batch=`: `_node.py` imports it for the
first batch node, and `nodekit.Batch` is imported on first use.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import inspect
import math
import sys
import time
import types
import typing
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from ._classifiers import AMBIGUOUS
from ._context import NodeContext
from ._errors import ConfigError, NodekitError
from ._events import structlog_binds
from ._execution import bind_log, call_async, run_async, unbind_log
from ._map import MapResult
from ._policies import Effect, Seconds
from ._resources import Resource, ainject
from ._runtime import CURRENT, RUNTIME
from ._spec import NodeSpec
from .idempotency._claim import drive_async
from .idempotency._keyed import KeyedCall
from .idempotency._policy import IdempotencyPlan, compile_idempotency

__all__ = ["Batch", "BatchContext", "BatchNode", "BatchResultError", "compile_batch"]

T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)

# what an item's key function and fingerprint see: the item, as parameter `item`
_ITEM = inspect.Signature([inspect.Parameter("item", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


@dataclass(frozen=True, slots=True)
class Batch:
    """Coalesce concurrent calls of an async node into one call with the list of their items.

    `max_size` (>= 1) items at most per call; `max_wait` (seconds or a `timedelta`, >= 0) is
    how long the first item of a batch waits for others before the batch is sent anyway.
    """

    max_size: int = 100
    max_wait: Seconds = 0.01


class BatchResultError(NodekitError):
    """The batch function returned no list, or a list of another length than its items.

    Ambiguous: the function ran, so the items' effects may have happened, but no result can
    be matched to its item; keyed items keep their keys (`OutcomeUnknown`).
    """

    nodekit_kind = AMBIGUOUS


class BatchNode(Protocol[T_contra, R_co]):
    """A batch node: called with one item, awaited for that item's result."""

    fn: Callable[..., Any]
    name: str
    effect: Effect
    spec: NodeSpec

    def __call__(self, item: T_contra, /) -> Coroutine[Any, Any, R_co]: ...

    def options(self, **changes: Any) -> BatchNode[T_contra, R_co]: ...

    def map(self, items: Iterable[Any], /, *, concurrency: int | None = None) -> MapResult[Any]:
        """Call the node once per item from sync code (on this thread's loop), in order."""
        ...

    def amap(
        self, items: Iterable[Any], /, *, concurrency: int | None = None
    ) -> Coroutine[Any, Any, MapResult[Any]]:
        """Await the node once per item (they coalesce into batches), in input order."""
        ...


class BatchContext(NodeContext):
    """The context of one batch call: a `NodeContext` with the items' keys."""

    __slots__ = ("_batch_keys",)

    def __init__(
        self, spec: NodeSpec, deadline: float | None, keys: tuple[str | None, ...]
    ) -> None:
        super().__init__(spec, None, deadline)
        self._batch_keys = keys

    @property
    def batch_keys(self) -> tuple[str | None, ...] | None:
        """The items' idempotency key digests, aligned with the items (None: unkeyed).

        Reading them counts as sending them downstream (like `idempotency_key_for`): a WRITE
        batch whose items are *all* keyed may then retry an ambiguous error, the downstream
        API replaying the items it already processed. One unkeyed item (``optional=True``
        without a key) keeps the batch from retrying one: that item's effect could not be
        deduplicated downstream.
        """
        keys = self._batch_keys
        if keys and all(key is not None for key in keys):
            self.key_carried = True
        return keys


class _Seat:
    """One caller's item in a batch, and the future its caller awaits."""

    __slots__ = ("ctx", "future", "item", "key")

    def __init__(self, ctx: NodeContext | None, item: Any, key: str | None, future: Any) -> None:
        self.ctx = ctx  # None for an unkeyed item called directly: nothing reads it
        self.item = item
        self.key = key
        self.future: asyncio.Future[Any] = future


class _Open:
    """The batch being filled on one event loop: its seats, its timer, the opener's context."""

    __slots__ = ("context", "loop", "seats", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, context: contextvars.Context) -> None:
        self.loop = loop
        self.context = context
        self.seats: list[_Seat] = []
        self.timer: asyncio.TimerHandle | None = None


class _Item(KeyedCall):
    """A keyed item: the claim protocol of one call, whose body is a seat in the batch."""

    def __init__(
        self, batcher: _Batcher, ctx: NodeContext, item: Any, found: tuple[Any, str], store: Any
    ) -> None:
        super().__init__(batcher.item_spec, ctx, (item,), {}, found[0], found[1], store)
        self.batcher = batcher
        self.item = item

    def body_sync(self) -> Any:  # pragma: no cover - a batch node is async
        raise NodekitError(
            f"node {self.spec.name!r} is a batch node: await it", node=self.spec.name
        )

    def body_async(self) -> asyncio.Future[Any]:
        return self.batcher.seat(self.ctx, self.item, self.ctx.idempotency_key)


class _Batcher:
    """A batch node's driver: seats callers, flushes batches, hands out the results."""

    def __init__(
        self,
        spec: NodeSpec,
        batch: Batch,
        max_wait: float,
        param: str,
        resources: tuple[tuple[str, str], ...],
    ) -> None:
        self.spec = spec
        self.max_size = batch.max_size
        self.max_wait = max_wait
        self.param = param
        self.resources = resources
        self.plan: IdempotencyPlan | None = None
        self.item_spec = spec
        # the open batch of each loop (most programs have one); a loop closed with its batch
        # still open (its timer never fired) is dropped when another batch opens
        self._open: dict[asyncio.AbstractEventLoop, _Open] = {}
        self._last: _Open | None = None  # the batch opened last (on any loop): no lookup
        self._running: set[asyncio.Task[None]] = set()  # batch tasks, kept from the collector

    # ------------------------------------------------------------------ a caller

    def wrapper(self) -> Callable[..., Coroutine[Any, Any, Any]]:
        """The decorated function: the caller's context, then its seat.

        An unkeyed item without a fallback, while no tracer is installed, goes straight to its
        seat; any other goes through the node's call path (`call_async`: log ids, tracer
        span, fallback, then `drive_async`).
        """
        spec, runtime = self.spec, RUNTIME
        get, set_, reset = CURRENT.get, CURRENT.set, CURRENT.reset
        plain = self.plan is None and spec.drive_async == self.drive_async
        item_of, seat = self._item, self.seat

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if plain and runtime.tracer is None:
                return await seat(None, item_of(args, kwargs), None)
            parent = get()
            ctx = NodeContext(spec, parent, None if parent is None else parent.deadline)
            token = set_(ctx)
            try:
                return await call_async(spec, ctx, args, kwargs)
            finally:
                reset(token)

        return wrapper

    async def drive_async(self, spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
        """One caller's item (the node's `drive_async`): replayed, refused, or seated."""
        item = self._item(args, kwargs)
        plan = self.plan
        if plan is not None:
            found = plan.key_for((item,), {})
            if found is not None:  # None: Idempotency(optional=True) and no key
                ctx.idempotency_key = found[0].digest
                return await drive_async(_Item(self, ctx, item, found, plan.store()))
        return await self.seat(ctx, item, None)

    def drive_sync(self, spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
        raise NodekitError(  # pragma: no cover - an async node is never driven sync
            f"node {spec.name!r} is an async batch node: await it", node=spec.name
        )

    def _item(self, args: Any, kwargs: Any) -> Any:
        if not kwargs and len(args) == 1:
            return args[0]
        if not args and len(kwargs) == 1 and self.param in kwargs:
            return kwargs[self.param]
        name = self.spec.name
        raise TypeError(
            f"node {name!r} batches its calls: call it with one item, `await {name}(item)`; "
            f"it got {len(args)} positional and {len(kwargs)} keyword argument(s)"
        )

    def seat(self, ctx: NodeContext | None, item: Any, key: str | None) -> asyncio.Future[Any]:
        """Seat one item in this loop's open batch; the future resolves to its result."""
        loop = asyncio.get_running_loop()
        batch = self._last
        if batch is None or batch.loop is not loop:
            batch = self._open.get(loop)
            if batch is None:
                for other in list(self._open):  # a copy: other threads' loops may open
                    if other.is_closed():
                        self._open.pop(other, None)
                batch = self._open[loop] = _Open(loop, contextvars.copy_context())
                batch.timer = loop.call_later(self.max_wait, self._flush, loop, batch)
            self._last = batch
        future = loop.create_future()
        batch.seats.append(_Seat(ctx, item, key, future))
        if len(batch.seats) >= self.max_size:
            self._flush(loop, batch)
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop, batch: _Open) -> None:
        """Send `batch` (full, or its first item waited `max_wait`) in a task of its own."""
        if self._open.get(loop) is not batch:
            return  # already sent (the timer of a batch that filled up)
        del self._open[loop]
        if self._last is batch:
            self._last = None
        if batch.timer is not None:
            batch.timer.cancel()
        seats = [seat for seat in batch.seats if not seat.future.done()]  # cancelled callers
        if seats:
            # in the context of the caller that opened the batch: its resources, its log ids
            task = loop.create_task(self._run(seats), context=batch.context)
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    # ------------------------------------------------------------------ the batch call

    async def _run(self, seats: list[_Seat]) -> None:
        spec = self.spec
        total = spec.total_timeout
        ctx = BatchContext(
            spec,
            None if total is None else time.monotonic() + total,
            tuple(seat.key for seat in seats),
        )
        token = CURRENT.set(ctx)
        logged = (
            bind_log(ctx, spec.name) if "structlog" in sys.modules and structlog_binds() else None
        )
        try:
            kwargs: dict[str, Any] = {}
            if self.resources:
                await ainject(spec.name, self.resources, kwargs)
            results = await run_async(spec, ctx, ([seat.item for seat in seats],), kwargs)
        except BaseException as exc:
            _fail(seats, ctx, exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            unbind_log(logged)
            CURRENT.reset(token)
        if not isinstance(results, list | tuple) or len(results) != len(seats):
            _fail(seats, ctx, _shape_error(spec.name, results, len(seats)))
            return
        for seat, result in zip(seats, results, strict=True):
            _attempted(seat.ctx, ctx)
            if seat.future.done():
                continue
            if isinstance(result, Exception):
                seat.future.set_exception(result)
            else:
                seat.future.set_result(result)


def _attempted(item: NodeContext | None, batch: NodeContext) -> None:
    """The item's call made the batch's attempts (and carried its keys if the batch did)."""
    if item is None:
        return
    item.attempt = batch.attempt
    item.key_carried = batch.key_carried


def _fail(seats: list[_Seat], ctx: NodeContext, exc: BaseException) -> None:
    for seat in seats:
        _attempted(seat.ctx, ctx)
        if seat.future.done():
            continue
        if isinstance(exc, Exception):
            seat.future.set_exception(exc)
        else:  # the batch task was cancelled (its loop is closing): so are its callers
            seat.future.cancel()


def _shape_error(node: str, results: Any, count: int) -> BatchResultError:
    got = (
        f"{len(results)} results"
        if isinstance(results, list | tuple)
        else f"a {type(results).__name__}"
    )
    return BatchResultError(
        f"node {node!r}: the batch function returned {got} for {count} items; it must return "
        "a list with one result per item, in the items' order. No item was recorded as done; "
        "keyed items keep their keys, since the effects may have happened",
        node=node,
    )


# ---------------------------------------------------------------------------- compilation


def compile_batch(spec: NodeSpec, batch: Any, idempotency: Any) -> None:
    """Make `spec` a batch node: checks (`ConfigError` naming the node and `batch`), the
    per-item idempotency plan, and the drivers that seat callers in batches."""
    node = spec.name
    if not isinstance(batch, Batch):
        raise ConfigError(
            f"node {node!r}: batch must be a nk.Batch(max_size=..., max_wait=...), got {batch!r}",
            node=node,
            option="batch",
        )
    size = batch.max_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"node {node!r}: batch.max_size must be an int >= 1, got {size!r}",
            node=node,
            option="batch.max_size",
        )
    max_wait = _wait(batch.max_wait, node)
    if not spec.is_async:
        raise ConfigError(
            f"node {node!r}: batch= needs an async function, `async def {node}(items: list[T]) "
            "-> list[R]`; this one is sync",
            node=node,
            option="batch",
        )
    param = _items_param(spec)
    batcher = _Batcher(spec, batch, max_wait, param, spec.resources)
    spec.resources = ()  # injected once per batch call, not per caller
    if idempotency is not None:
        item_spec = _copied(spec)
        item_spec.signature = _ITEM
        item_spec.return_type = _item_type(spec.return_type)
        plan = compile_idempotency(idempotency, item_spec)
        item_spec.idempotency = spec.idempotency = batcher.plan = plan
        batcher.item_spec = item_spec
    spec.drive_async = batcher.drive_async
    spec.drive_sync = batcher.drive_sync
    spec.batch = batcher


def _copied(spec: NodeSpec) -> NodeSpec:
    """A shallow copy of `spec` (its slots; not `copy.copy`, which would pickle it)."""
    item = object.__new__(NodeSpec)
    for name in NodeSpec.__slots__:
        if hasattr(spec, name):
            setattr(item, name, getattr(spec, name))
    return item


def _wait(value: Any, node: str) -> float:
    if isinstance(value, timedelta):
        wait = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        wait = float(value)
    else:
        wait = -1.0
    if not (wait >= 0.0 and math.isfinite(wait)):
        raise ConfigError(
            f"node {node!r}: batch.max_wait must be >= 0 seconds (float or timedelta), got "
            f"{value!r}",
            node=node,
            option="batch.max_wait",
        )
    return wait


def _items_param(spec: NodeSpec) -> str:
    """The name of the one positional parameter that takes the list of items."""
    node = spec.name
    shape = f"`async def {node}(items: list[T]) -> list[R]`"
    signature = spec.signature
    if signature is None:
        raise ConfigError(
            f"node {node!r}: batch= needs the function's signature ({shape})",
            node=node,
            option="batch",
        )
    required = []
    for param in signature.parameters.values():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConfigError(
                f"node {node!r}: a batch function takes the list of items as its one "
                f"positional parameter ({shape}); *args and **kwargs are not allowed",
                node=node,
                option="batch",
            )
        if param.kind in _POSITIONAL:
            required.append(param)
        elif param.default is inspect.Parameter.empty:
            raise ConfigError(
                f"node {node!r}: a batch function's keyword-only parameter {param.name!r} "
                "needs a default (a resource, say): callers pass only the item",
                node=node,
                option="batch",
            )
    if len(required) != 1 or required[0].default is not inspect.Parameter.empty:
        raise ConfigError(
            f"node {node!r}: a batch function takes exactly one positional parameter without "
            f"a default, the list of items ({shape}); it has {len(required)}",
            node=node,
            option="batch",
        )
    if isinstance(required[0].default, Resource):  # pragma: no cover - caught above
        raise ConfigError(f"node {node!r}: the items cannot be a resource", node=node)
    hints = _hints(spec.fn)
    for what, hint in (
        (f"parameter {required[0].name!r}", hints.get(required[0].name, inspect.Signature.empty)),
        ("return type", spec.return_type),
    ):
        if hint is not inspect.Signature.empty and not _is_sequence(hint):
            raise ConfigError(
                f"node {node!r}: a batch function's {what} must be a list ({shape}), got {hint!r}",
                node=node,
                option="batch",
            )
    return required[0].name


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return dict(inspect.get_annotations(fn, eval_str=True))
    except Exception:
        return {}


def _is_sequence(hint: Any) -> bool:
    if hint in _SEQUENCES or hint is Any or isinstance(hint, str):
        return True
    return typing.get_origin(hint) in _SEQUENCES


def _item_type(hint: Any) -> Any:
    """One item's result type, from ``list[R]`` (exception types left out): what a replayed
    item is decoded as. Empty when the list is not annotated."""
    if not typing.get_args(hint) or typing.get_origin(hint) not in _SEQUENCES:
        return inspect.Signature.empty
    item = typing.get_args(hint)[0]
    if typing.get_origin(item) in (typing.Union, types.UnionType):
        kept = [
            arg
            for arg in typing.get_args(item)
            if not (isinstance(arg, type) and issubclass(arg, BaseException))
        ]
        if not kept:
            return inspect.Signature.empty
        item = kept[0] if len(kept) == 1 else typing.Union[tuple(kept)]  # noqa: UP007
    elif isinstance(item, type) and issubclass(item, BaseException):
        return inspect.Signature.empty
    return item
