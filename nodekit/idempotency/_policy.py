"""`Idempotency`, the policy a node declares, and its compiled form.

Policy lives on the node, never on the store: a store is a plain implementation many nodes
share. Compilation at decoration time checks
every option, names the namespace (node name and version), works out which arguments the key
function takes and which make up the payload fingerprint, derives the lease from the node's
time budget (every in-progress record has a lease) and checks that the return type can be
stored as JSON, so that an unstorable result is found before the first call.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

from .._canonical import canonical, digest, dumps
from .._errors import ConfigError, NodekitWarning
from .._policies import Effect, Seconds, seconds
from .._resources import find_slot
from .._spec import NodeSpec
from ._codec import ResultCodec
from ._open import default_store
from ._store import RecordKey

__all__ = ["Codec", "Idempotency", "IdempotencyPlan", "NodekitWarning", "compile_idempotency"]

_sha256 = hashlib.sha256
_encode_string = json.encoder.encode_basestring
MAX_KEY_LENGTH = 255


def _valid_key_text(text: str) -> bool:
    """1-255 printable ASCII characters (space included), not starting or ending with a
    space (str methods: a regex costs more per call, and its ``$`` let a final newline by)."""
    return (
        0 < len(text) <= MAX_KEY_LENGTH
        and text.isascii()
        and text.isprintable()
        and text[0] != " "
        and text[-1] != " "
    )


class Codec(Protocol):
    """Transforms stored JSON text (encrypt, compress); `decode(encode(t)) == t`."""

    def encode(self, text: str) -> str: ...

    def decode(self, text: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Idempotency:
    """Run a node's effect once per key; duplicates get the stored result.

    `key` is a callable over the node's arguments (it receives the parameters it names), or
    omitted for a fingerprint of all bound arguments (resources excluded). The payload
    fingerprint covers all bound arguments, or only `fields`; the same key with another
    payload raises `IdempotencyMismatch` before anything runs. `scope` (a string or a callable
    like `key`) keeps equal keys of two tenants apart. `version` is the one way to re-execute
    completed keys on purpose. `ttl` (default 24 h) is how long a completed result is replayed;
    `lease` how long an in-progress holder is trusted without a heartbeat (default: the node's
    time budget plus a margin). `on_conflict="wait"` waits up to `wait_timeout` for another
    holder's result instead of raising `IdempotencyInProgress`. `cache_errors` lists business
    errors that are stored and re-raised on replay. `delivery="at_most_once"` refuses to take
    over a key whose holder vanished mid-call (`OutcomeUnknown`) until it is resolved.
    `skew` (seconds) is the clock difference tolerated between hosts sharing a store: leases
    and TTLs are honoured that much past their nominal end (stores with a server clock,
    Redis and PostgreSQL, need none).
    `store` is a store or a URL (`nk.open_store`); default: the `idempotency_store` resource,
    else the process default (`nk.set_default_store`, a `MemoryStore` unless set).
    """

    key: Callable[..., Any] | None = None
    store: Any = None
    ttl: Seconds = timedelta(hours=24)
    on_conflict: Literal["raise", "wait"] = "raise"
    version: str | int | None = None
    scope: str | Callable[..., Any] | None = None
    cache_errors: tuple[type[BaseException], ...] = ()
    delivery: Literal["at_least_once", "at_most_once"] | None = None
    codec: Codec | None = None
    lease: Seconds | None = None
    wait_timeout: Seconds | None = None
    optional: bool = False
    fields: Sequence[str] | None = None
    secret: bytes | str | None = None
    on_replay: Callable[[Any], None] | None = None
    skew: Seconds = 0.0


def _picker(
    fn: Callable[..., Any] | None, node: str, option: str, params: dict[str, inspect.Parameter]
) -> tuple[str, ...] | None:
    """Which node parameters `fn` takes by name (None: it takes them all, as keywords)."""
    if fn is None:
        return None
    if not callable(fn):
        raise ConfigError(
            f"node {node!r}: {option} must be a callable, got {fn!r}", node=node, option=option
        )
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names: list[str] = []
    for param in sig.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise ConfigError(
                f"node {node!r}: {option} takes the node's parameters by name; *args is not allowed",
                node=node,
                option=option,
            )
        if param.name not in params:
            raise ConfigError(
                f"node {node!r}: {option} takes parameter {param.name!r}, which the node does "
                f"not have (it has {list(params)})",
                node=node,
                option=option,
            )
        names.append(param.name)
    return tuple(names)


class IdempotencyPlan:
    """A validated `Idempotency` bound to one node."""

    def __init__(self, policy: Idempotency, spec: NodeSpec) -> None:
        node = spec.name
        self.policy = policy
        self.node = node
        if spec.signature is None:
            raise ConfigError(
                f"node {node!r}: idempotency needs the function's signature",
                node=node,
                option="idempotency",
            )
        self._bind_plan(spec.signature, {param for param, _ in spec.resources})
        self.key_params = _picker(policy.key, node, "idempotency.key", self.params)
        # a key function of one parameter that takes it positionally (`lambda order: order`,
        # the common case) is called with it directly, without a keyword dict
        self._key_arg = _single_positional(policy.key, self.key_params)
        self.scope_params = _check_scope(policy.scope, node, self.params)
        self.fields = _check_fields(policy.fields, node, self.params)
        if policy.on_conflict not in ("raise", "wait"):
            raise ConfigError(
                f"node {node!r}: idempotency.on_conflict must be 'raise' or 'wait', got "
                f"{policy.on_conflict!r}",
                node=node,
                option="idempotency.on_conflict",
            )
        self.delivery = _check_delivery(policy.delivery, node)
        self.takeover = self.delivery == "at_least_once"
        self._times(policy, spec)
        self.cache_errors = _check_cache_errors(policy.cache_errors, node)
        if policy.version is not None and not isinstance(policy.version, str | int):
            raise ConfigError(
                f"node {node!r}: idempotency.version must be a string or an int",
                node=node,
                option="idempotency.version",
            )
        self.namespace = node if policy.version is None else f"{node}@v{policy.version}"
        secret = policy.secret
        self.secret = secret.encode() if isinstance(secret, str) else secret
        # the key text's prefix and the scope digest, unless a scope function gives them
        scope = policy.scope
        self._scope_fn = scope if callable(scope) else None
        self._key_prefix, self._scope_digest = self._scoped(scope if isinstance(scope, str) else "")
        self.codec = _check_codec(policy.codec, node)
        self.optional = bool(policy.optional)
        self.on_replay = policy.on_replay
        self.store_option = policy.store
        self._store: Any = None
        if policy.store is not None and not isinstance(policy.store, str):
            _check_store(policy.store, node, spec.is_async)
        if spec.effect is Effect.WRITE and not spec.named:
            warnings.warn(
                f"node {node!r} is a WRITE node with idempotency but no explicit name: its keys "
                "are namespaced by the function's qualified name, which changes if the function "
                "is renamed or moved. Pass @nk.node(name=...)",
                NodekitWarning,
                stacklevel=5,
            )
        self.results = ResultCodec(spec.return_type, node, self.codec, self.cache_errors)

    def _bind_plan(self, signature: inspect.Signature, resource_names: set[str]) -> None:
        """Which parameters make up the payload (resources excluded), and the fast binding."""
        self.signature = signature
        self.params = {n: p for n, p in signature.parameters.items() if n not in resource_names}
        self.resource_params = resource_names
        kinds = {p.kind for p in signature.parameters.values()}
        plain = kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
        self._positional: tuple[str, ...] | None = (
            tuple(
                n
                for n, p in signature.parameters.items()
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            )
            if plain
            else None
        )
        self._defaults = tuple(
            (n, p.default)
            for n, p in self.params.items()
            if p.default is not inspect.Parameter.empty
        )
        # every parameter passed, positionally or by name: the arguments are the call's own
        self._whole = (
            len(self._positional)
            if self._positional is not None
            and not resource_names
            and len(self._positional) == len(self.params)
            else -1
        )
        self._names = self.params.keys()

    def _times(self, policy: Idempotency, spec: NodeSpec) -> None:
        """TTL, skew, lease (from the node's time budget), and what the store is told."""
        node = spec.name
        ttl = seconds(policy.ttl, node=node, option="idempotency.ttl", allow_none=False)
        assert ttl is not None
        self.ttl = ttl
        if isinstance(policy.skew, timedelta):
            skew = policy.skew.total_seconds()
        elif isinstance(policy.skew, int | float) and not isinstance(policy.skew, bool):
            skew = float(policy.skew)
        else:
            skew = -1.0
        if not 0.0 <= skew < float("inf"):
            raise ConfigError(
                f"node {node!r}: idempotency.skew must be >= 0 seconds, got {policy.skew!r}",
                node=node,
                option="idempotency.skew",
            )
        self.skew = skew
        self.lease = seconds(policy.lease, node=node, option="idempotency.lease") or default_lease(
            spec
        )
        # what the store is told: the lease and the TTL outlast their nominal end by the
        # tolerated clock skew, so a caller whose clock runs ahead takes nothing over early
        self.held = self.lease + self.skew
        self.kept = self.ttl + self.skew
        self.wait_timeout = (
            seconds(policy.wait_timeout, node=node, option="idempotency.wait_timeout") or self.lease
        )

    # ------------------------------------------------------------------ per call

    def store(self) -> Any:
        if self.store_option is not None:
            if self._store is None:
                if isinstance(self.store_option, str):
                    from ._open import open_store

                    self._store = open_store(self.store_option)
                else:
                    self._store = self.store_option
            return self._store
        slot = find_slot("idempotency_store")
        if slot is not None:
            return slot.get()
        return default_store()

    def _bound(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, defaults applied, resources left out."""
        names = self._positional
        # a plain signature without resources, every argument given (checked against the
        # live `params`: `nodekit.sql` takes its connection out of them after compilation)
        if self._whole == len(self.params) and not self.resource_params:
            if not kwargs:
                if len(args) == self._whole:
                    return dict(zip(names, args, strict=True))  # type: ignore[arg-type]
            elif not args and kwargs.keys() == self._names:
                return dict(kwargs)
        if names is not None and len(args) <= len(names):
            # the plain signature's fast path: no *args, no **kwargs, no positional-only
            arguments = dict(zip(names, args, strict=False))
            for name in self.resource_params:  # a resource may be passed positionally
                arguments.pop(name, None)
            for name, value in kwargs.items():
                if name in self.resource_params:
                    continue
                if name in arguments or name not in self.params:
                    break  # let inspect produce the proper TypeError
                arguments[name] = value
            else:
                for name, default in self._defaults:
                    if name not in arguments:
                        arguments[name] = default
                return arguments
        clean = {k: v for k, v in kwargs.items() if k not in self.resource_params}
        try:
            bound = self.signature.bind_partial(*args, **clean)
        except TypeError as exc:
            raise TypeError(f"node {self.node!r}: {exc}") from None
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k not in self.resource_params}

    def key_for(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[RecordKey, str] | None:
        """The record key and payload fingerprint of one call (None: optional and no key).

        The key digest is of ``dumps([namespace, scope, material])``, written as a prefix
        fixed at decoration time (for a fixed scope) plus the material's JSON: the same text,
        without encoding the namespace on every call.
        """
        arguments = self._bound(args, kwargs)
        policy = self.policy
        secret = self.secret
        try:
            if policy.key is None:
                material: Any = arguments
            elif self._key_arg is not None and self._key_arg in arguments:
                material = policy.key(arguments[self._key_arg])
            else:
                material = _call_with(policy.key, self.key_params, arguments)
            if material is None or material == "":
                if self.optional:
                    return None
                raise ConfigError(
                    f"node {self.node!r}: idempotency.key returned {material!r}; a WRITE without a "
                    "key would not be protected (pass Idempotency(optional=True) to run unkeyed)",
                    node=self.node,
                    option="idempotency.key",
                )
            if isinstance(material, str) and not _valid_key_text(material):
                raise ConfigError(
                    f"node {self.node!r}: idempotency key must be 1-{MAX_KEY_LENGTH} printable "
                    f"ASCII characters without surrounding spaces (got {len(material)} characters)",
                    node=self.node,
                    option="idempotency.key",
                )
            prefix, scope_digest = self._key_prefix, self._scope_digest
            if self._scope_fn is not None:  # a scope computed per call
                scope = _call_with(self._scope_fn, self.scope_params, arguments)
                prefix, scope_digest = self._scoped("" if scope is None else str(scope))
            if self.fields is None:
                every = _arguments_json(arguments)
                material_text = every if policy.key is None else _material_json(material)
            else:
                subset = {f: arguments.get(f) for f in self.fields}
                every = _json(canonical(subset))
                material_text = _material_json(material)
        except TypeError as exc:
            raise ConfigError(
                f"node {self.node!r}: {exc}", node=self.node, option="idempotency.key"
            ) from exc
        key_text = prefix + material_text + "]"
        if secret is None:
            fingerprint = _sha256(every.encode()).hexdigest()
            key_digest = _sha256(key_text.encode()).hexdigest()
        else:
            fingerprint, key_digest = digest(every, secret), digest(key_text, secret)
        return RecordKey(self.namespace, scope_digest, key_digest), fingerprint

    def _scoped(self, scope_text: str) -> tuple[str, str]:
        """The key text's prefix for a scope (``dumps([namespace, scope])`` without its
        closing bracket, then a comma) and the scope's digest ("" for no scope)."""
        prefix = dumps([self.namespace, scope_text])[:-1] + ","
        return prefix, digest(scope_text, self.secret)[:32] if scope_text else ""


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# `_canonical.dumps`, without building an encoder per call: json's C encoder with the same
# options (sorted keys, no spaces, UTF-8 kept, no NaN), made once. No circular check: a
# value `canonical()` produced is a fresh tree. `test_replay_cache.py` pins the two alike.
_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
_C_DUMPS = (
    _C_ENCODER(None, _refuse, json.encoder.encode_basestring, None, ":", ",", True, False, False)
    if _C_ENCODER is not None
    else None
)


def _json(canonical_value: Any) -> str:
    """Canonical JSON text of a value `canonical()` produced (`_canonical.dumps`, faster)."""
    if _C_DUMPS is None:  # pragma: no cover - CPython always has the C encoder
        return dumps(canonical_value)
    return "".join(_C_DUMPS(canonical_value, 0))


# Values `canonical()` returns as they are (exact types only: a subclass, a float, anything
# else takes `canonical()`'s careful path).
_AS_IS = frozenset({str, int, bool, type(None)})


def _arguments_json(arguments: dict[str, Any]) -> str:
    """`_json(canonical(arguments))`, without copying the dict when every value is a plain
    scalar (argument names are strings, so `canonical()` would return an equal dict)."""
    for value in arguments.values():
        if type(value) not in _AS_IS:
            return _json(canonical(arguments))
    if _C_DUMPS is None:  # pragma: no cover - CPython always has the C encoder
        return dumps(arguments)
    return "".join(_C_DUMPS(arguments, 0))


def _material_json(material: Any) -> str:
    """The canonical JSON of a key function's result (a string or an int without a detour)."""
    kind = type(material)
    if kind is str:
        return _encode_string(material)
    if kind is int:
        return int.__repr__(material)
    return _json(canonical(material))


def _single_positional(fn: Any, names: tuple[str, ...] | None) -> str | None:
    """The one parameter `fn` takes, if it takes exactly one, positionally or by name."""
    if fn is None or names is None or len(names) != 1:
        return None
    try:
        param = next(iter(inspect.signature(fn).parameters.values()))
    except (TypeError, ValueError, StopIteration):  # pragma: no cover - `_picker` read it
        return None
    return names[0] if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else None


def _check_scope(
    scope: Any, node: str, params: dict[str, inspect.Parameter]
) -> tuple[str, ...] | None:
    if callable(scope):
        return _picker(scope, node, "idempotency.scope", params)
    if scope is not None and not isinstance(scope, str):
        raise ConfigError(
            f"node {node!r}: idempotency.scope must be a string or a callable, got {scope!r}",
            node=node,
            option="idempotency.scope",
        )
    return None


def _check_fields(
    fields: Any, node: str, params: dict[str, inspect.Parameter]
) -> tuple[str, ...] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        raise ConfigError(
            f"node {node!r}: idempotency.fields must be a list of parameter names",
            node=node,
            option="idempotency.fields",
        )
    for name in fields:
        if name not in params:
            raise ConfigError(
                f"node {node!r}: idempotency.fields names {name!r}, which is not a parameter",
                node=node,
                option="idempotency.fields",
            )
    return tuple(fields)


def _check_delivery(delivery: Any, node: str) -> str:
    chosen = delivery or "at_least_once"
    if chosen not in ("at_least_once", "at_most_once"):
        raise ConfigError(
            f"node {node!r}: idempotency.delivery must be 'at_least_once' or 'at_most_once', "
            f"got {delivery!r}",
            node=node,
            option="idempotency.delivery",
        )
    return str(chosen)


def _check_cache_errors(errors: Any, node: str) -> tuple[type[BaseException], ...]:
    for error in errors if isinstance(errors, tuple) else [None]:
        if not (isinstance(error, type) and issubclass(error, Exception)):
            raise ConfigError(
                f"node {node!r}: idempotency.cache_errors must be a tuple of exception types, "
                f"got {errors!r}",
                node=node,
                option="idempotency.cache_errors",
            )
    return errors  # type: ignore[no-any-return]


def _check_codec(codec: Any, node: str) -> Any:
    if codec is not None and not (
        callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
    ):
        raise ConfigError(
            f"node {node!r}: idempotency.codec must have encode() and decode()",
            node=node,
            option="idempotency.codec",
        )
    return codec


def _call_with(
    fn: Callable[..., Any], names: tuple[str, ...] | None, arguments: dict[str, Any]
) -> Any:
    if names is None:
        return fn(**arguments)
    return fn(**{name: arguments[name] for name in names if name in arguments})


def _check_store(store: Any, node: str, is_async: bool) -> None:
    ops = ["acquire", "complete", "release", "renew", "get"]
    if is_async:  # an async node awaits the async half; without it every call would fail
        ops += ["aacquire", "acomplete", "arelease", "arenew", "aget"]
    missing = [op for op in ops if not callable(getattr(store, op, None))]
    if missing:
        raise ConfigError(
            f"node {node!r}: idempotency.store must be a store (MemoryStore, SQLiteStore, "
            f"RedisStore, PostgresStore) or a URL, got {store!r} (it lacks {', '.join(missing)})",
            node=node,
            option="idempotency.store",
        )


def default_lease(spec: NodeSpec) -> float:
    """The node's whole time budget plus a margin; the renewer keeps it alive anyway."""
    if spec.total_timeout is not None:
        budget = spec.total_timeout
    elif spec.attempt_timeout is not None:
        attempts = spec.retry.attempts if spec.retry else 1
        waits = (attempts - 1) * spec.retry.max_wait if spec.retry else 0.0
        budget = attempts * spec.attempt_timeout + waits
    else:
        return 60.0
    return budget * 1.25 + 5.0


def compile_idempotency(policy: Any, spec: NodeSpec) -> IdempotencyPlan:
    if not isinstance(policy, Idempotency):
        raise ConfigError(
            f"node {spec.name!r}: idempotency must be a nk.Idempotency, got {policy!r}",
            node=spec.name,
            option="idempotency",
        )
    return IdempotencyPlan(policy, spec)
