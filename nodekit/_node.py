"""The `node` decorator: decide everything once, so that the call path does almost nothing.

At decoration time the function is classified (sync or async), its options validated and
compiled into a `NodeSpec` (`ConfigError` naming the node and the option), its resource
parameters found, and its driver chosen: the attempt loop, or a keyed call holding its claim
around it. The wrapper sets the node's context and calls the one call path
(`_execution.call_sync` / `call_async`); a plain node with nothing to bind goes straight to
the attempt loop, whose first pass is the success path.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

from ._context import NodeContext
from ._errors import ConfigError
from ._events import DEBUG, is_enabled_for, structlog_binds
from ._execution import (
    bind_log,
    call_async,
    call_sync,
    guarded_async,
    guarded_sync,
    run_async,
    run_sync,
    unbind_log,
)
from ._map import MapResult, attach_map
from ._policies import Effect, Retry, Seconds, Timeout
from ._resources import Resource
from ._runtime import CURRENT, RUNTIME
from ._spec import NodeSpec
from .idempotency._keyed import keyed_async, keyed_sync, on_abandoned_finish
from .idempotency._policy import compile_idempotency
from .resilience import Bulkhead, CircuitBreaker, RateLimit, compile_resilience

if TYPE_CHECKING:  # `_batch` is imported by the first batch node (see `compile_spec`)
    from ._batch import Batch, BatchNode

__all__ = [
    "Node",
    "NodeSpec",
    "build",
    "call_in_context_async",
    "call_in_context_sync",
    "new_context",
    "node",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_OPTIONS = (
    "name",
    "retry",
    "timeout",
    "effect",
    "idempotency",
    "circuit",
    "rate_limit",
    "bulkhead",
    "fallback",
    "batch",
)


class Node(Protocol, Generic[P, R]):
    """A decorated function: called exactly like the original, plus `fn`, `name`, `options`."""

    fn: Callable[P, R]
    name: str
    effect: Effect
    spec: NodeSpec

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def options(self, **changes: Any) -> Node[P, R]: ...

    def map(
        self,
        items: Iterable[Any],
        /,
        *,
        concurrency: int | None = None,
        executor: Executor | None = None,
    ) -> MapResult[Any]:
        """Call the node once per item (threads, or `executor`; see `nodekit._map`); results
        in input order."""
        ...

    def amap(
        self,
        items: Iterable[Any],
        /,
        *,
        concurrency: int | None = None,
        executor: Executor | None = None,
    ) -> Coroutine[Any, Any, MapResult[Any]]:
        """Await the node once per item (tasks, threads for a sync node, or `executor`), in
        input order."""
        ...


def _check_callable(fn: object) -> None:
    if isinstance(fn, type):
        raise ConfigError(
            f"nk.node decorates functions, not classes: got {fn.__qualname__}", option="fn"
        )
    if not callable(fn):
        raise ConfigError(f"nk.node decorates functions, got {fn!r}", option="fn")
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(
            f"node {name!r}: generator functions cannot be nodes (a retry could not replay "
            "what was already yielded); return a list or use a flow",
            node=name,
            option="fn",
        )
    if isinstance(fn, staticmethod | classmethod):
        raise ConfigError(
            f"node {name!r}: put @nk.node below @staticmethod / @classmethod", option="fn"
        )


def _resource_params(node: str, signature: inspect.Signature | None) -> tuple[tuple[str, str], ...]:
    if signature is None:
        return ()
    found = []
    for param in signature.parameters.values():
        if isinstance(param.default, Resource):
            if param.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise ConfigError(
                    f"node {node!r}: parameter {param.name!r} defaults to nk.resource() and "
                    "must be keyword-only (put it after `*`)",
                    node=node,
                    option=param.name,
                )
            found.append((param.name, param.default.name or param.name))
    return tuple(found)


def compile_spec(fn: Callable[..., Any], config: dict[str, Any]) -> NodeSpec:
    """The node's spec: options compiled, resource parameters found, driver chosen."""
    spec = NodeSpec(fn, config, drive_sync=run_sync, drive_async=run_async)
    spec.resources = _resource_params(spec.name, spec.signature)
    idem = config.get("idempotency")
    batch = config.get("batch")
    if batch is not None:  # callers seated in batches; a key per item (`_batch.py`)
        from ._batch import compile_batch  # imported by the first batch node only

        compile_batch(spec, batch, idem)
    elif idem is not None:
        spec.idempotency = compile_idempotency(idem, spec)
        spec.drive_sync = keyed_sync
        spec.drive_async = keyed_async
        spec.on_abandoned_finish = on_abandoned_finish
    # circuit, rate limit, bulkhead around each attempt; the fallback around the whole call
    compile_resilience(spec, config)
    return spec


def _deadline(spec: NodeSpec, parent: NodeContext | None) -> float | None:
    """A call's deadline: the enclosing node's, shortened by this node's total timeout."""
    deadline = None if parent is None else parent.deadline
    total = spec.total_timeout
    if total is not None:
        own = time.monotonic() + total
        deadline = own if deadline is None or own < deadline else deadline
    return deadline


def _first_here(spec: NodeSpec, drive: Any, runner: Any) -> bool:
    """Whether the wrapper makes the loop's first attempt itself: nothing to bind, inject or
    key; the function called directly, or through the per-attempt guards (which also carry
    a threaded attempt)."""
    return drive is runner and not spec.resources and (bool(spec.guards) or not spec.threaded)


def _sync_wrapper(spec: NodeSpec) -> Callable[..., Any]:
    get, set_, reset = CURRENT.get, CURRENT.set, CURRENT.reset
    fn, name, modules, runtime, binds = spec.fn, spec.name, sys.modules, RUNTIME, structlog_binds
    here = _first_here(spec, spec.drive_sync, run_sync)
    guarded = bool(spec.guards)
    retries = spec.retry is not None
    total = spec.total_timeout

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        parent = get()
        if total is None:
            ctx = NodeContext(spec, parent, None if parent is None else parent.deadline)
        else:
            ctx = NodeContext(spec, parent, _deadline(spec, parent))
        token = set_(ctx)
        try:
            if not here or runtime.sinks or is_enabled_for(DEBUG):
                return call_sync(spec, ctx, args, kwargs)
            # ids for merge_contextvars: only while a configured chain lacks nk.add_node_context
            bound = bind_log(ctx, name) if "structlog" in modules and binds() else None
            try:
                if guarded:
                    return guarded_sync(spec, ctx, args, kwargs)
                return fn(*args, **kwargs)
            except Exception as exc:
                if not retries:
                    raise
                return run_sync(spec, ctx, args, kwargs, exc)
            finally:
                if bound is not None:
                    unbind_log(bound)
        finally:
            reset(token)

    return wrapper


def _async_wrapper(spec: NodeSpec) -> Callable[..., Coroutine[Any, Any, Any]]:
    get, set_, reset = CURRENT.get, CURRENT.set, CURRENT.reset
    fn, name, modules, runtime, binds = spec.fn, spec.name, sys.modules, RUNTIME, structlog_binds
    here = _first_here(spec, spec.drive_async, run_async)
    guarded = bool(spec.guards)
    retries = spec.retry is not None
    total = spec.total_timeout

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        parent = get()
        ctx = NodeContext(
            spec, parent, _deadline(spec, parent) if total else parent and parent.deadline
        )
        token = set_(ctx)
        try:
            if not here or runtime.sinks or is_enabled_for(DEBUG):
                return await call_async(spec, ctx, args, kwargs)
            bound = bind_log(ctx, name) if "structlog" in modules and binds() else None
            try:
                if guarded:
                    return await guarded_async(spec, ctx, args, kwargs)
                return await fn(*args, **kwargs)
            except Exception as exc:
                if not retries:
                    raise
                return await run_async(spec, ctx, args, kwargs, exc)
            finally:
                if bound is not None:
                    unbind_log(bound)
        finally:
            reset(token)

    return wrapper


def new_context(spec: NodeSpec) -> NodeContext:
    """A call's context under the current one (a flow sets it for the nodes it runs)."""
    parent = CURRENT.get()
    return NodeContext(spec, parent, _deadline(spec, parent))


def call_in_context_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Call the node in a context its caller prepared (a flow's journal sets the key on it):
    the same call path as the decorated function's."""
    token = CURRENT.set(ctx)
    try:
        return call_sync(spec, ctx, args, kwargs)
    finally:
        CURRENT.reset(token)


async def call_in_context_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `call_in_context_sync`."""
    token = CURRENT.set(ctx)
    try:
        return await call_async(spec, ctx, args, kwargs)
    finally:
        CURRENT.reset(token)


def build(fn: Callable[..., Any], config: dict[str, Any]) -> Any:
    _check_callable(fn)
    unknown = set(config) - set(_OPTIONS)
    if unknown:
        label = config.get("name") or getattr(fn, "__qualname__", None) or type(fn).__qualname__
        raise ConfigError(
            f"node {label!r}: nk.node got unknown option(s) {sorted(unknown)}; options are "
            f"{list(_OPTIONS)}",
            node=label,
            option=sorted(unknown)[0],
        )
    spec = compile_spec(fn, config)
    if spec.batch is not None:  # callers seated in batches (`_batch.py`)
        wrapper = spec.batch.wrapper()
    else:
        wrapper = _async_wrapper(spec) if spec.is_async else _sync_wrapper(spec)
    try:
        functools.update_wrapper(wrapper, fn)
    except AttributeError:  # pragma: no cover - callables without __name__ etc.
        setattr(wrapper, "__wrapped__", fn)  # noqa: B010
    if not hasattr(fn, "__name__"):
        wrapper.__name__ = spec.name
        wrapper.__qualname__ = spec.name
    attrs: dict[str, Any] = {
        "fn": fn,
        "name": spec.name,
        "effect": spec.effect,
        "spec": spec,
        "options": functools.partial(_options, fn, config),
    }
    for key, value in attrs.items():
        setattr(wrapper, key, value)
    attach_map(wrapper, spec)
    return wrapper


def _options(fn: Callable[..., Any], config: dict[str, Any], **changes: Any) -> Any:
    """A re-configured copy of the node (e.g. ``charge.options(retry=None)`` in one test)."""
    return build(fn, {**config, **changes})


@overload
def node(fn: Callable[P, R], /) -> Node[P, R]: ...


@overload
def node(
    *,
    batch: Batch,
    name: str | None = ...,
    retry: Retry | bool | None = ...,
    timeout: Timeout | Seconds | None = ...,
    effect: Effect = ...,
    idempotency: Any = ...,
    circuit: CircuitBreaker | None = ...,
    rate_limit: RateLimit | None = ...,
    bulkhead: Bulkhead | None = ...,
    fallback: Callable[..., Any] | None = ...,
) -> Callable[[Callable[[list[T]], Coroutine[Any, Any, list[R]]]], BatchNode[T, R]]: ...


@overload
def node(
    *,
    name: str | None = ...,
    retry: Retry | bool | None = ...,
    timeout: Timeout | Seconds | None = ...,
    effect: Effect = ...,
    idempotency: Any = ...,
    circuit: CircuitBreaker | None = ...,
    rate_limit: RateLimit | None = ...,
    bulkhead: Bulkhead | None = ...,
    fallback: Callable[..., Any] | None = ...,
) -> Callable[[Callable[P, R]], Node[P, R]]: ...


def node(fn: Callable[..., Any] | None = None, /, **config: Any) -> Any:
    """Turn a function, sync or async, into a resilient, side-effect-aware node.

    Options (keyword-only): `name` (defaults to the function's qualified name), `retry`
    (`nk.Retry`, ``True`` for the defaults, or None: no retry), `timeout` (seconds, a
    `timedelta` or `nk.Timeout`), `effect` (`nk.Effect`, default WRITE), `idempotency`
    (`nk.Idempotency`), `circuit` (`nk.CircuitBreaker`), `rate_limit` (`nk.RateLimit`),
    `bulkhead` (`nk.Bulkhead`), `fallback` (``fn(error, *args, **kwargs)``, sync or async
    like the node) and `batch` (`nk.Batch`: concurrent ``await node(item)`` calls of an
    ``async def fn(items: list[T]) -> list[R]`` coalesce into one call; see `nodekit._batch`).
    Layers, outermost first: fallback, idempotency, retry (within the total timeout), then
    per attempt circuit, rate limit, bulkhead, attempt timeout. Every option is validated
    here; a bad one is a `ConfigError` naming
    the node and the option. The result is called exactly like `fn` and keeps its signature,
    docstring and call style (an async node stays a coroutine function).
    """
    if fn is not None:
        if config:  # pragma: no cover - the overloads forbid it
            raise ConfigError("use @nk.node or @nk.node(...), not both")
        return build(fn, {})

    def decorate(target: Callable[..., Any]) -> Any:
        # Options are checked here, not above, so that the error can name the node.
        return build(target, dict(config))

    return decorate
