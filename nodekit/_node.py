"""The `node` decorator: decide everything once, so that the call path does almost nothing.

At decoration time the function is classified (sync or async), its options validated and
compiled (`ConfigError` naming the node and the option), its resource parameters found, and
one of a few wrappers chosen. The common wrapper's success path sets the node context, calls
the function and resets the context; retries, timeouts, idempotency and events are entered
only when they are needed.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from . import _context, _events
from ._context import _LOG_ATTEMPT, _LOG_NODE, _LOG_RUN, NodeContext, Resource
from ._errors import ConfigError
from ._execution import call_async, call_sync, retry_async, retry_sync
from ._map import MapResult, attach_map
from ._policies import (
    Effect,
    Retry,
    RetryPlan,
    Seconds,
    Timeout,
    TimeoutPlan,
    compile_effect,
    compile_retry,
    compile_timeout,
)

__all__ = ["Node", "NodeSpec", "node"]

P = ParamSpec("P")
R = TypeVar("R")

_OPTIONS = ("name", "retry", "timeout", "effect", "idempotency")


class Node(Protocol, Generic[P, R]):
    """A decorated function: called exactly like the original, plus `fn`, `name`, `options`."""

    fn: Callable[P, R]
    name: str
    effect: Effect
    spec: NodeSpec

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def options(self, **changes: Any) -> Node[P, R]: ...

    def map(self, items: Iterable[Any], /, *, concurrency: int | None = None) -> MapResult[Any]:
        """Call the node once per item (threads; see `nodekit._map`); results in input order."""
        ...

    def amap(
        self, items: Iterable[Any], /, *, concurrency: int | None = None
    ) -> Coroutine[Any, Any, MapResult[Any]]:
        """Await the node once per item (tasks, or threads for a sync node), in input order."""
        ...


class NodeSpec:
    """Everything decided about a node at decoration time."""

    __slots__ = (
        "attempt_timeout",
        "config",
        "drive_async",
        "drive_sync",
        "effect",
        "fn",
        "idempotency",
        "is_async",
        "name",
        "named",
        "on_abandoned_finish",
        "replay_safe",
        "resources",
        "retry",
        "return_type",
        "signature",
        "threaded",
        "timeout",
        "total_timeout",
    )

    def __init__(self, fn: Callable[..., Any], config: dict[str, Any]) -> None:
        self.fn = fn
        self.config = config
        name = config.get("name")
        self.named = name is not None
        if name is None:
            name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
            if name is None:
                name = type(fn).__qualname__
        if not isinstance(name, str) or not name:
            raise ConfigError(f"node name must be a non-empty string, got {name!r}", option="name")
        self.name = name
        self.is_async = _is_async(fn)
        self.retry: RetryPlan | None = compile_retry(config.get("retry"), node=name)
        self.timeout: TimeoutPlan | None = compile_timeout(config.get("timeout"), node=name)
        self.attempt_timeout = self.timeout.attempt if self.timeout else None
        self.total_timeout = self.timeout.total if self.timeout else None
        self.threaded = self.timeout is not None
        self.effect = compile_effect(config.get("effect", Effect.WRITE), node=name)
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self.signature = None
        self.resources = _resource_params(name, self.signature)
        self.return_type = _return_type(fn)
        self.on_abandoned_finish: Callable[..., None] | None = None
        self.idempotency: Any = None
        # what runs a call once its context is set: the attempt loop, or the keyed call
        self.drive_sync: Callable[..., Any] = call_sync
        self.drive_async: Callable[..., Coroutine[Any, Any, Any]] = call_async
        # True when a repeated effect is harmless (a key guards it): ambiguous errors retry.
        # nodekit.sql sets it for its transactions, whose key lives in the user's database.
        self.replay_safe = False
        idem = config.get("idempotency")
        if idem is not None:
            from .idempotency._policy import compile_idempotency
            from .idempotency._run import idempotent_async, idempotent_sync, on_abandoned_finish

            self.drive_sync = idempotent_sync
            self.drive_async = idempotent_async

            self.idempotency = compile_idempotency(idem, self)
            self.replay_safe = True
            self.on_abandoned_finish = on_abandoned_finish

    def __repr__(self) -> str:
        return f"NodeSpec({self.name!r}, effect={self.effect!r}, async={self.is_async})"


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable instances with async __call__
    return not inspect.isfunction(fn) and call is not None and inspect.iscoroutinefunction(call)


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


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:
        try:
            hints = dict(getattr(fn, "__annotations__", {}) or {})
        except Exception:
            return inspect.Signature.empty
    return hints.get("return", inspect.Signature.empty)


def _sync_wrapper(spec: NodeSpec) -> Callable[..., Any]:
    fn = spec.fn
    plan = spec.retry
    current = _context._CURRENT
    get, set_, reset = current.get, current.set, current.reset
    hub = _events.HUB
    debug_enabled = _events._is_enabled_for
    DEBUG = _events.DEBUG
    modules = sys.modules
    slow = spec.threaded or spec.resources or spec.idempotency is not None

    if not slow:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            parent = get()
            ctx = NodeContext(spec, parent, None if parent is None else parent.deadline)
            token = set_(ctx)
            try:
                if hub.sinks or debug_enabled(DEBUG):
                    return _observed_sync(spec, ctx, args, kwargs)
                if "structlog" in modules:
                    return _logged_sync(spec, ctx, args, kwargs)
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    if plan is None:
                        raise
                    return retry_sync(spec, ctx, args, kwargs, exc)
            finally:
                reset(token)

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = new_context(spec)
            token = set_(ctx)
            try:
                return _observed_sync(spec, ctx, args, kwargs)
            finally:
                reset(token)

    return wrapper


def _async_wrapper(spec: NodeSpec) -> Callable[..., Coroutine[Any, Any, Any]]:
    fn = spec.fn
    plan = spec.retry
    current = _context._CURRENT
    get, set_, reset = current.get, current.set, current.reset
    hub = _events.HUB
    debug_enabled = _events._is_enabled_for
    DEBUG = _events.DEBUG
    modules = sys.modules
    slow = spec.threaded or spec.resources or spec.idempotency is not None

    if not slow:

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            parent = get()
            ctx = NodeContext(spec, parent, None if parent is None else parent.deadline)
            token = set_(ctx)
            try:
                if hub.sinks or debug_enabled(DEBUG):
                    return await _observed_async(spec, ctx, args, kwargs)
                if "structlog" in modules:
                    return await _logged_async(spec, ctx, args, kwargs)
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    if plan is None:
                        raise
                    return await retry_async(spec, ctx, args, kwargs, exc)
            finally:
                reset(token)

    else:

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = new_context(spec)
            token = set_(ctx)
            try:
                return await _observed_async(spec, ctx, args, kwargs)
            finally:
                reset(token)

    return wrapper


def new_context(spec: NodeSpec) -> NodeContext:
    """A call's context: the enclosing node's deadline, shortened by this node's total timeout."""
    parent = _context._CURRENT.get()
    deadline = None if parent is None else parent.deadline
    total = spec.total_timeout
    if total is not None:
        own = time.monotonic() + total
        deadline = own if deadline is None or own < deadline else deadline
    return NodeContext(spec, parent, deadline)


def _bind_log(ctx: NodeContext) -> tuple[Any, ...] | None:
    """Bind node, run_id and attempt for structlog on the observed path (events are on)."""
    if "structlog" not in sys.modules:
        return None
    return (
        _LOG_NODE.set(ctx.node),
        _LOG_RUN.set(ctx.run_id),
        _LOG_ATTEMPT.set(ctx.attempt),
    )


def _unbind_log(tokens: tuple[Any, ...] | None) -> None:
    if tokens is not None:
        _LOG_ATTEMPT.reset(tokens[2])
        _LOG_RUN.reset(tokens[1])
        _LOG_NODE.reset(tokens[0])


def _logged_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The fast path with node, run_id and attempt bound for structlog's merge_contextvars."""
    t_node = _LOG_NODE.set(spec.name)
    t_run = _LOG_RUN.set(_context.bind_run_id(ctx))
    t_attempt = _LOG_ATTEMPT.set(1)
    try:
        try:
            return spec.fn(*args, **kwargs)
        except Exception as exc:
            if spec.retry is None:
                raise
            return retry_sync(spec, ctx, args, kwargs, exc)
    finally:
        _LOG_ATTEMPT.reset(t_attempt)
        _LOG_RUN.reset(t_run)
        _LOG_NODE.reset(t_node)


async def _logged_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    t_node = _LOG_NODE.set(spec.name)
    t_run = _LOG_RUN.set(_context.bind_run_id(ctx))
    t_attempt = _LOG_ATTEMPT.set(1)
    try:
        try:
            return await spec.fn(*args, **kwargs)
        except Exception as exc:
            if spec.retry is None:
                raise
            return await retry_async(spec, ctx, args, kwargs, exc)
    finally:
        _LOG_ATTEMPT.reset(t_attempt)
        _LOG_RUN.reset(t_run)
        _LOG_NODE.reset(t_node)


def _observed_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    tokens = _bind_log(ctx)
    try:
        if spec.resources:
            kwargs = dict(kwargs)
            _context.inject(spec.name, spec.resources, kwargs)
        return spec.drive_sync(spec, ctx, args, kwargs)
    finally:
        _unbind_log(tokens)


async def _observed_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    tokens = _bind_log(ctx)
    try:
        if spec.resources:
            kwargs = dict(kwargs)
            await _context.ainject(spec.name, spec.resources, kwargs)
        return await spec.drive_async(spec, ctx, args, kwargs)
    finally:
        _unbind_log(tokens)


def call_in_context_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Call the node in a context its caller prepared (a flow's journal sets the key on it).

    The same steps as the wrapper's observed path; the wrappers inline them for speed.
    """
    token = _context._CURRENT.set(ctx)
    try:
        return _observed_sync(spec, ctx, args, kwargs)
    finally:
        _context._CURRENT.reset(token)


async def call_in_context_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `call_in_context_sync`."""
    token = _context._CURRENT.set(ctx)
    try:
        return await _observed_async(spec, ctx, args, kwargs)
    finally:
        _context._CURRENT.reset(token)


def _build(fn: Callable[..., Any], config: dict[str, Any]) -> Any:
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
    spec = NodeSpec(fn, config)
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
    return _build(fn, {**config, **changes})


@overload
def node(fn: Callable[P, R], /) -> Node[P, R]: ...


@overload
def node(
    *,
    name: str | None = ...,
    retry: Retry | bool | None = ...,
    timeout: Timeout | Seconds | None = ...,
    effect: Effect = ...,
    idempotency: Any = ...,
) -> Callable[[Callable[P, R]], Node[P, R]]: ...


def node(fn: Callable[..., Any] | None = None, /, **config: Any) -> Any:
    """Turn a function, sync or async, into a resilient, side-effect-aware node.

    Options (keyword-only): `name` (defaults to the function's qualified name), `retry`
    (`nk.Retry`, ``True`` for the defaults, or None: no retry), `timeout` (seconds, a
    `timedelta` or `nk.Timeout`), `effect` (`nk.Effect`, default WRITE), `idempotency`
    (`nk.Idempotency`). Every option is validated here; a bad one is a `ConfigError` naming
    the node and the option. The result is called exactly like `fn` and keeps its signature,
    docstring and call style (an async node stays a coroutine function).
    """
    if fn is not None:
        if config:  # pragma: no cover - the overloads forbid it
            raise ConfigError("use @nk.node or @nk.node(...), not both")
        return _build(fn, {})

    def decorate(target: Callable[..., Any]) -> Any:
        # Options are checked here, not above, so that the error can name the node.
        return _build(target, dict(config))

    return decorate
