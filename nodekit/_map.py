"""`node.map(items)` and `await node.amap(items)`: one node over many inputs, bounded.

Each item is one ordinary call of the node (its retries, timeout, key and events apply per
item). Results come back in input order in a `MapResult`; an item's failure is recorded beside
the others' results instead of losing them. `map` runs sync nodes in worker threads (each
item in a copy of the caller's contextvars) and async nodes on the calling thread's event
loop (`_loops.thread_loop`, kept across calls, like a sync flow's); `amap` runs async nodes as
tasks and sync nodes through `asyncio.to_thread`, never blocking the loop. Given an
`executor` (any `concurrent.futures.Executor`: a process pool, a Dask client's
`get_executor()`), both submit every item to it instead (`_executors`: the node travels by
reference, its stores by URL).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from ._errors import ConfigError
from ._execution import thread_bound_error
from ._executors import Shipped, check_executor, in_process, shipped
from ._loops import thread_loop
from ._spec import NodeSpec

__all__ = ["MapResult", "attach_map", "map_async", "map_sync"]

T = TypeVar("T")

_DEFAULT_THREADS = 32


@dataclass(frozen=True, slots=True)
class MapResult(Generic[T]):
    """The outcome of `node.map` / `node.amap`, in input order.

    `results[i]` is item i's return value, or None when it failed; `errors` maps the index of
    every failed item to its exception (the user's own exception, never wrapped). `unwrap()`
    returns the plain list of results, or raises an `ExceptionGroup` of every failure.
    """

    results: tuple[T | None, ...]
    errors: Mapping[int, Exception] = field(default_factory=lambda: MappingProxyType({}))
    node: str = ""

    @property
    def ok(self) -> bool:
        """True when every item succeeded."""
        return not self.errors

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[T | None]:
        return iter(self.results)

    def unwrap(self) -> list[T]:
        """Every result, in input order; raises an `ExceptionGroup` if any item failed."""
        if self.errors:
            indices = sorted(self.errors)
            shown = ", ".join(str(i) for i in indices[:10]) + (", ..." if len(indices) > 10 else "")
            raise ExceptionGroup(
                f"node {self.node!r} failed for {len(indices)} of {len(self.results)} items "
                f"(items {shown})",
                [self.errors[i] for i in indices],
            )
        return list(self.results)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"MapResult(node={self.node!r}, items={len(self.results)}, "
            f"failed={sorted(self.errors)})"
        )


def _limit(concurrency: int | None, node: str) -> int | None:
    if concurrency is None:
        return None
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(
            f"node {node!r}: map concurrency must be a positive int or None, got {concurrency!r}",
            node=node,
            option="concurrency",
        )
    return concurrency


def _result(node: str, results: list[Any], errors: dict[int, Exception]) -> MapResult[Any]:
    return MapResult(tuple(results), MappingProxyType(errors), node)


def map_sync(
    call: Callable[..., Any],
    spec: NodeSpec,
    items: Iterable[Any],
    /,
    *,
    concurrency: int | None = None,
    executor: Executor | None = None,
) -> MapResult[Any]:
    """Call the node once per item; sync nodes in up to `concurrency` threads (default 32).

    With `executor` (any `concurrent.futures.Executor`) every item is submitted to it, at
    most `concurrency` in flight (default: all), sync and async nodes alike.
    """
    limit = _limit(concurrency, spec.name)
    values = list(items)
    if executor is not None:
        return _map_executor(call, spec, values, limit, executor)
    if spec.is_async:
        return thread_loop().run(map_async(call, spec, values, concurrency=limit))
    results: list[Any] = [None] * len(values)
    errors: dict[int, Exception] = {}
    workers = min(limit or _DEFAULT_THREADS, len(values))
    if workers <= 1:
        for index, item in enumerate(values):
            try:
                results[index] = call(item)
            except Exception as exc:
                errors[index] = exc
        return _result(spec.name, results, errors)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"nodekit-map:{spec.name}")
    try:
        # each item runs in its own copy of the caller's context (run id, resources)
        futures: list[Future[Any]] = [
            pool.submit(contextvars.copy_context().run, call, item) for item in values
        ]
        for index, future in enumerate(futures):
            try:
                results[index] = future.result()
            except Exception as exc:
                errors[index] = _in_worker(
                    spec.name, exc, "map runs sync nodes in threads", "map with concurrency=1"
                )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return _result(spec.name, results, errors)


async def map_async(
    call: Callable[..., Any],
    spec: NodeSpec,
    items: Iterable[Any],
    /,
    *,
    concurrency: int | None = None,
    executor: Executor | None = None,
) -> MapResult[Any]:
    """Await the node once per item, at most `concurrency` at a time (default: all at once).

    Async nodes run as tasks; sync nodes in worker threads (`asyncio.to_thread`, contextvars
    kept; the loop's default executor bounds how many run at once). With `executor`, every
    item is submitted to it instead and awaited. Cancelling the caller cancels every item
    still running (an item an executor already started may still finish there).
    """
    limit = _limit(concurrency, spec.name)
    values = list(items)
    results: list[Any] = [None] * len(values)
    errors: dict[int, Exception] = {}
    if not values:
        return _result(spec.name, results, errors)
    pending = iter(enumerate(values))
    is_async = spec.is_async
    submit = None if executor is None else _submitter(call, spec, executor, "amap")

    async def worker() -> None:
        # workers share one iterator: at most `limit` items are in flight at any time
        for index, item in pending:
            try:
                if submit is not None:
                    results[index] = await asyncio.wrap_future(submit(item))
                elif is_async:
                    results[index] = await call(item)
                else:
                    try:
                        results[index] = await asyncio.to_thread(call, item)
                    except Exception as exc:
                        errors[index] = _in_worker(
                            spec.name, exc, "amap runs sync nodes in threads", "use map"
                        )
            except Exception as exc:
                errors[index] = exc

    count = min(limit or len(values), len(values))
    tasks = [asyncio.ensure_future(worker()) for _ in range(count)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return _result(spec.name, results, errors)


def _submitter(
    call: Callable[..., Any], spec: NodeSpec, executor: Any, where: str
) -> Callable[[Any], Future[Any]]:
    """`submit(item)`: one item on the executor (checked now); in this process for a thread
    pool (in a copy of the caller's context), else the node shipped by reference."""
    pool = check_executor(executor, spec.name, where=f"node {spec.name!r}: {where}")
    if in_process(pool):
        local = Shipped(call)
        return lambda item: pool.submit(contextvars.copy_context().run, local, item)
    remote = shipped(call)
    return lambda item: pool.submit(remote, item)


def _map_executor(
    call: Callable[..., Any],
    spec: NodeSpec,
    values: list[Any],
    limit: int | None,
    executor: Any,
) -> MapResult[Any]:
    """`map` on an executor: every item submitted (at most `limit` in flight), in order."""
    submit = _submitter(call, spec, executor, "map")
    results: list[Any] = [None] * len(values)
    errors: dict[int, Exception] = {}
    window = len(values) if limit is None else limit
    futures: dict[Future[Any], int] = {}
    position = 0
    try:
        while position < len(values) or futures:
            while position < len(values) and len(futures) < window:
                futures[submit(values[position])] = position
                position += 1
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                index = futures.pop(future)
                try:
                    results[index] = future.result()
                except Exception as exc:
                    errors[index] = exc
    finally:
        for future in futures:
            future.cancel()
    return _result(spec.name, results, errors)


def attach_map(wrapper: Any, spec: NodeSpec) -> None:
    """Give a node its `map` and `amap` methods (called once, at decoration time)."""
    wrapper.map = functools.partial(map_sync, wrapper, spec)
    wrapper.amap = functools.partial(map_async, wrapper, spec)


def _in_worker(node: str, exc: Exception, where: str, instead: str) -> Exception:
    """An item's error from a worker thread; a sqlite3 object made in another thread becomes
    the `ConfigError` that says how to fix it (chained to sqlite3's error)."""
    bound = thread_bound_error(node, {}, exc, where=where, instead=instead)
    if bound is None:
        return exc
    bound.__cause__ = exc
    return bound
