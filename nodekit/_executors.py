"""Running nodes beyond this process: any `concurrent.futures.Executor` (a process pool, Dask).

A node is a plain function (the fast call path has no object around it), so what an executor
ships is `Shipped`: a small callable that calls the node and pickles as a reference. A node
defined at module level in an importable module travels as its module and qualified name and
the worker imports it (its store, breaker, ... re-created there by the import, like any
module global). A node that cannot be imported by name (defined in a function, or in
``__main__``, which a worker cannot import) travels by value: its function and options,
pickled once per node with cloudpickle when that is installed (Dask installs it), rebuilt
once per worker process. Its stores travel as their URL (`PostgresStore`, `RedisStore` and
`SQLiteStore` pickle by re-opening), so that every worker keys its calls in one shared store.

A `ThreadPoolExecutor` runs in this process: nothing is pickled and each item runs in a copy
of the caller's contextvars, as `map` does by default.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import sys
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from ._errors import ConfigError, NodekitWarning
from ._loops import thread_loop
from .idempotency.memory import MemoryStore

__all__ = ["Shipped", "check_executor", "in_process", "offloader", "shipped"]

# per node (weakly): (token, reference or None, pickled rebuild recipe or None)
_RECIPES: weakref.WeakKeyDictionary[Any, tuple[str, tuple[str, str] | None, bytes | None]] = (
    weakref.WeakKeyDictionary()
)
_RECIPES_LOCK = threading.Lock()
# on a worker: the nodes rebuilt from a recipe, by token (one build per node and process)
_BUILT: dict[str, Any] = {}
_BUILT_LOCK = threading.Lock()


def in_process(executor: Executor) -> bool:
    """Whether the executor runs calls in this process (threads), so nothing is pickled."""
    return isinstance(executor, ThreadPoolExecutor)


def check_executor(executor: Any, node: str | None, *, where: str) -> Executor:
    """The executor as given, or a `ConfigError` naming the node and the option."""
    if not isinstance(executor, Executor):
        raise ConfigError(
            f"{where}: executor must be a concurrent.futures.Executor (a ThreadPoolExecutor, "
            f"ProcessPoolExecutor, or a Dask client's get_executor()), got "
            f"{type(executor).__name__}",
            node=node,
            option="executor",
        )
    return executor


def _reference(node: Any) -> tuple[str, str] | None:
    """The node's module and qualified name, if importing them gives back this very node."""
    module = getattr(node, "__module__", None)
    qualname = getattr(node, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__":
        return None
    if "<locals>" in qualname:
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return (module, qualname) if found is node else None


def _recipe(node: Any) -> tuple[str, tuple[str, str] | None, bytes | None]:
    """How the node travels: by reference, else its rebuild (`node.options`) pickled once."""
    with _RECIPES_LOCK:
        known = _RECIPES.get(node)
    if known is not None:
        return known
    name = node.spec.name
    ref = _reference(node)
    data = None
    if ref is None:
        try:
            import cloudpickle  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError(
                f"node {name!r} is not importable by name (defined in a function or in "
                "__main__), so it cannot be sent to another process: define it at module "
                "level in an importable module, or install cloudpickle to send it by value",
                node=name,
                option="executor",
            ) from None
        try:
            data = cloudpickle.dumps(node.options, protocol=cloudpickle.DEFAULT_PROTOCOL)
        except Exception as exc:
            raise ConfigError(
                f"node {name!r} cannot be sent to another process by value (its function or "
                f"an option does not pickle: {type(exc).__name__}); define it at module level "
                "in an importable module so that workers import it",
                node=name,
                option="executor",
            ) from exc
    recipe = (uuid.uuid4().hex, ref, data)
    with _RECIPES_LOCK:
        return _RECIPES.setdefault(node, recipe)


def _load(token: str, ref: tuple[str, str] | None, data: bytes | None) -> Shipped:
    """On the worker: the node imported by name, or rebuilt once per process from its recipe."""
    if ref is not None:
        found: Any = importlib.import_module(ref[0])
        for part in ref[1].split("."):
            found = getattr(found, part)
        return Shipped(found, (token, ref, data))
    node = _BUILT.get(token)
    if node is None:
        with _BUILT_LOCK:
            node = _BUILT.get(token)
            if node is None:
                assert data is not None
                import pickle  # here: `import nodekit` does not load pickle

                node = _BUILT[token] = pickle.loads(data)()
    return Shipped(node, (token, ref, data))


class Shipped:
    """A node as an executor gets it: called like the node (an async node runs to completion
    on the worker thread's loop); pickled as a reference to the node, never with its state."""

    __slots__ = ("_recipe", "node")

    def __init__(
        self, node: Any, recipe: tuple[str, tuple[str, str] | None, bytes | None] | None = None
    ) -> None:
        self.node = node
        self._recipe = recipe

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        node = self.node
        if node.spec.is_async:
            return thread_loop().run(node(*args, **kwargs))
        return node(*args, **kwargs)

    def __reduce__(self) -> tuple[Callable[..., Shipped], tuple[Any, ...]]:
        recipe = self._recipe if self._recipe is not None else _recipe(self.node)
        return (_load, recipe)

    def __repr__(self) -> str:
        return f"Shipped({self.node.spec.name!r})"

    def __dask_tokenize__(self) -> str:
        # a node call is an effect, not a pure function of its arguments: Dask must run each
        # submission (the node's key decides what is replayed), never reuse another's result
        return uuid.uuid4().hex


def shipped(node: Any) -> Shipped:
    """The node ready for an executor that runs in other processes.

    Checks now (not on the worker) that it can travel: a `ConfigError` names the node when it
    cannot be pickled, or when it is keyed without naming a store (each worker would key its
    calls in a store of its own).
    """
    spec = node.spec
    idem = spec.config.get("idempotency")
    store = getattr(idem, "store", None) if idem is not None else None
    if idem is not None and (
        store is None
        or isinstance(store, MemoryStore)
        or (isinstance(store, str) and store.lower().startswith("memory:"))
    ):
        raise ConfigError(
            f"node {spec.name!r} is keyed without a shared store: on an executor each worker "
            "process would keep its keys to itself; give Idempotency(store=...) a shared "
            "store (a PostgreSQL, Redis or SQLite URL or store)",
            node=spec.name,
            option="idempotency",
        )
    if idem is None and spec.effect.value == "write" and spec.name not in _WARNED:
        _WARNED.add(spec.name)
        warnings.warn(
            f"node {spec.name!r} is an unkeyed WRITE sent to an executor that runs it in other "
            "processes: an executor that re-runs the tasks of a worker that died (Dask does) "
            "can make its effect twice; give it an idempotency key "
            "(@nk.node(idempotency=nk.Idempotency(key=..., store=...))) or mark it "
            "effect=nk.Effect.READ if it has none",
            NodekitWarning,
            stacklevel=3,
        )
    recipe = _recipe(node)
    return Shipped(node, recipe)


_WARNED: set[str] = set()  # nodes warned about once per process


def offloader(executor: Executor) -> Callable[[Any, Any, Any], Any]:
    """`await run(call, args, kwargs)`: one sync node call on the executor (a flow's fan-out).

    A thread pool runs it in this process, in a copy of the caller's context; any other
    executor gets the node shipped by reference (`shipped`, checked on first use).
    """
    if in_process(executor):

        async def run_here(call: Any, args: Any, kwargs: Any) -> Any:
            context = contextvars.copy_context()
            return await asyncio.wrap_future(executor.submit(context.run, call, *args, **kwargs))

        return run_here

    async def run_there(call: Any, args: Any, kwargs: Any) -> Any:
        return await asyncio.wrap_future(executor.submit(shipped(call), *args, **kwargs))

    return run_there
