"""The compiled, frozen description of a node: everything decided once, at decoration time.

`NodeSpec` is read on every call by the drivers, the claim protocol and the flow runner, so
it lives below all of them; `_node.py` builds it (options validated, resource parameters
found, idempotency compiled) and never changes it afterwards.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ._errors import ConfigError
from ._policies import (
    Effect,
    RetryPlan,
    TimeoutPlan,
    compile_effect,
    compile_retry,
    compile_timeout,
    result_checked,
)

__all__ = ["AttemptGuard", "AttemptWait", "NodeSpec", "is_async_callable"]


class AttemptWait(float):
    """Seconds an async attempt must wait before it starts, returned by a guard's `enter`
    that does no I/O (a local rate limit): the async loop awaits them, no coroutine made
    when there is nothing to wait for."""

    __slots__ = ()


class AttemptGuard(Protocol):
    """One per-attempt layer around the function: a circuit breaker, rate limit or bulkhead.

    The attempt loop (`_execution._guarded`) calls `enter` (or `aenter`) of each of the
    node's guards in order before an attempt, and `exit` (or `aexit`) of those entered,
    innermost first, after it (`aexit` exists for state in a shared store, whose I/O an
    async node awaits). `enter` may wait (sync: blocking; async: awaiting) and raises the refusal when
    the attempt may not run; what it returns is handed back to `exit`. `exit` gets the
    attempt's error (None on success; a guard refused by a later one sees that refusal),
    `now` (`time.monotonic()`) and the seconds the function itself ran. The guards live in
    `nodekit.resilience`; this protocol sits here so that the loop never imports them.
    """

    # whether an async node must await `aenter`/`aexit`; False: it calls `enter`/`exit`
    # directly (they do no I/O), which saves two coroutines an attempt. Such an `enter`
    # that must wait in an async node returns an `AttemptWait` instead of sleeping: the
    # async loop awaits it (and hands None to `exit`)
    awaits: bool

    def enter(self, spec: NodeSpec, ctx: Any) -> Any: ...

    async def aenter(self, spec: NodeSpec, ctx: Any) -> Any: ...

    def exit(
        self,
        spec: NodeSpec,
        ctx: Any,
        token: Any,
        error: BaseException | None,
        now: float,
        duration: float,
    ) -> None: ...

    async def aexit(
        self,
        spec: NodeSpec,
        ctx: Any,
        token: Any,
        error: BaseException | None,
        now: float,
        duration: float,
    ) -> None: ...


class NodeSpec:
    """Everything decided about a node at decoration time.

    `drive_sync` / `drive_async` run a call once its context is set: the attempt loop, or a
    keyed call holding its claim around it (set by `_node.py` when the node is keyed).
    `replay_safe` is true when a repeated effect is harmless whatever the attempt did, so that
    ambiguous errors may be retried; `nodekit.sql` sets it for its transactions (the effect
    commits with its key). A keyed node is not: each attempt must carry the key downstream
    (`NodeContext.key_carried`). `guards` are
    the per-attempt layers (circuit breaker, rate limit, bulkhead), outermost first; empty for
    most nodes, which then pay nothing for them.
    """

    __slots__ = (
        "attempt_timeout",
        "batch",
        "config",
        "drive_async",
        "drive_sync",
        "effect",
        "fn",
        "guards",
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

    def __init__(
        self,
        fn: Callable[..., Any],
        config: dict[str, Any],
        *,
        drive_sync: Callable[..., Any],
        drive_async: Callable[..., Coroutine[Any, Any, Any]],
    ) -> None:
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
        self.is_async = is_async_callable(fn)
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
        self.resources: tuple[tuple[str, str], ...] = ()
        self.return_type = _return_type(fn)
        self.on_abandoned_finish: Callable[..., None] | None = None
        self.idempotency: Any = None
        # circuit, rate limit, bulkhead around each attempt, outermost first (set by _node.py)
        self.guards: tuple[AttemptGuard, ...] = ()
        self.drive_sync = drive_sync
        self.drive_async = drive_async
        self.replay_safe = False
        # a batch node's batcher (`nodekit._batch`, set by `_node.py`); None for other nodes
        self.batch: Any = None
        if self.retry is not None and self.retry.on_result is not None:
            # a rejected result becomes an error the attempt loop retries (`ResultRejected`)
            self.fn = result_checked(fn, self.retry.on_result, node=name, is_async=self.is_async)

    def __repr__(self) -> str:
        return f"NodeSpec({self.name!r}, effect={self.effect!r}, async={self.is_async})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as a reference to its node (module and qualified name), never with its
        state (locks, stores, breakers): the other process imports the node and takes its
        spec. A node that cannot be imported by name cannot be pickled (a clear TypeError
        instead of one about a lock); `node.map(items, executor=...)` ships those by value."""
        module = getattr(self.fn, "__module__", None)
        qualname = getattr(self.fn, "__qualname__", None)
        found: Any = sys.modules.get(module) if isinstance(module, str) else None
        if found is not None and module != "__main__" and isinstance(qualname, str):
            for part in qualname.split("."):
                found = getattr(found, part, None)
            if getattr(found, "spec", None) is self:
                return (_spec_of, (module, qualname))
        raise TypeError(
            f"node {self.name!r} cannot be pickled: it is not importable by name (defined in "
            "a function, in __main__, or made by .options()); define it at module level in "
            "an importable module, or use node.map(items, executor=...), which sends it by "
            "value"
        )


def _spec_of(module: str, qualname: str) -> NodeSpec:
    """The spec of the node `module.qualname` (how a pickled `NodeSpec` comes back)."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    spec = found.spec
    assert isinstance(spec, NodeSpec)
    return spec


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """A coroutine function, or a callable instance whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable instances with async __call__
    return not inspect.isfunction(fn) and call is not None and inspect.iscoroutinefunction(call)


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:
        try:
            hints = dict(getattr(fn, "__annotations__", {}) or {})
        except Exception:
            return inspect.Signature.empty
    return hints.get("return", inspect.Signature.empty)
