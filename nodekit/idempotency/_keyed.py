"""A keyed node call: one claim per logical call, wrapping the whole retry loop.

The key is computed once; the claim protocol (`_claim.py`) acquires it, runs every attempt
while holding it, and completes or releases it. `KeyedCall` says what a keyed call does at
each step: replay a completed record (equal in value and type), raise on a different payload,
wait for or refuse a busy key, and what a failure means for the key — a safe or permanent
one releases it, an ambiguous one keeps the lease (the effect may have happened) and raises
`OutcomeUnknown`, a listed business error is stored and replayed.

On a `MemoryStore` a replay makes no claim: the store is in process, so its completed record
is read directly (`MemoryStore.replay_record`: same key, same fingerprint, unexpired — what an
acquire would refuse as a replay), the one in-process cache IDEMPOTENCY.md rule 23 allows.
Durable stores get no such cache: a `resolve` or a TTL decided by the server in another
process would not be seen by it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any

from .._classify import AMBIGUOUS, classify
from .._context import NodeContext
from .._errors import (
    IdempotencyInProgress,
    IdempotencyLeaseLost,
    IdempotencyMismatch,
    IdempotencyStoreError,
    NodekitError,
    OutcomeUnknown,
)
from .._events import emit, observed, wanted
from .._execution import run_async, run_sync
from .._policies import Effect
from .._redact import error_text
from .._spec import NodeSpec
from ._claim import KEEP, RELEASE, REPLAY, STORE, Claim, Holder, drive_async, drive_sync
from ._policy import IdempotencyPlan
from ._store import COMPLETED, Acquisition, Record, RecordKey
from .memory import MemoryStore

__all__ = [
    "KeyedCall",
    "keyed_async",
    "keyed_sync",
    "on_abandoned_finish",
    "refusal_error",
    "replayed",
]

# refusal -> (event, error type, what the error says after "key <fingerprint>")
_REFUSALS: dict[str, tuple[str, type[NodekitError], str]] = {
    "mismatch": (
        "idempotency.mismatch",
        IdempotencyMismatch,
        "was used before with a different payload; nothing ran. Use a new key for a new request",
    ),
    "unknown": (
        "idempotency.outcome_unknown",
        OutcomeUnknown,
        "was held by a call that ended without recording its outcome (its process died or its "
        "lease ran out), and the node delivers at most once, so nothing ran: check whether the "
        "effect happened; if it did not, resolve the key (nk.resolve(node, *args), or "
        "`nodekit store resolve`) and call again",
    ),
    "busy": (
        "idempotency.in_progress",
        IdempotencyInProgress,
        "is held by another call (still running, or one that failed with OutcomeUnknown and "
        "keeps the key until its lease ends), so nothing ran: retry after the lease ends, or "
        "wait for it (on_conflict='wait'); if you know the outcome of its effect, resolve the "
        "key (nk.resolve(node, *args), or `nodekit store resolve`)",
    ),
}


def keyed_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Run a keyed sync call: replay, or hold the key while the attempt loop runs."""
    plan: IdempotencyPlan = spec.idempotency
    found = plan.key_for(args, kwargs)
    if found is None:  # Idempotency(optional=True) and no key: an unkeyed call
        return run_sync(spec, ctx, args, kwargs)
    key, fingerprint = found
    ctx.idempotency_key = key.digest
    store = plan.store()
    if isinstance(store, MemoryStore):
        record = store.replay_record(key, fingerprint)
        if record is not None:
            return _replay(spec, ctx, key, record, None, None)
    return drive_sync(KeyedCall(spec, ctx, args, kwargs, key, fingerprint, store))


async def keyed_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `keyed_sync`: store I/O awaited, never blocking the loop."""
    plan: IdempotencyPlan = spec.idempotency
    found = plan.key_for(args, kwargs)
    if found is None:
        return await run_async(spec, ctx, args, kwargs)
    key, fingerprint = found
    ctx.idempotency_key = key.digest
    store = plan.store()
    if isinstance(store, MemoryStore):
        record = store.replay_record(key, fingerprint)
        if record is not None:
            return _replay(spec, ctx, key, record, None, None)
    return await drive_async(KeyedCall(spec, ctx, args, kwargs, key, fingerprint, store))


class KeyedCall(Holder):
    """What a keyed node call does at each step of the claim protocol."""

    def __init__(
        self,
        spec: NodeSpec,
        ctx: NodeContext,
        args: Any,
        kwargs: Any,
        key: RecordKey,
        fingerprint: str,
        store: Any,
    ) -> None:
        plan: IdempotencyPlan = spec.idempotency
        self.spec = spec
        self.ctx = ctx
        self.args = args
        self.kwargs = kwargs
        self.plan = plan
        claim = self.claim = Claim(
            store, key, fingerprint, plan.held, plan.kept, plan.takeover, spec.name, None
        )
        claim.context = ctx
        claim.attempt = ctx.attempt
        if plan.policy.on_conflict == "wait":
            self.wait_until = time.monotonic() + plan.wait_timeout
        self.unstored: str | None = None  # the warning for a result that cannot be stored

    # ------------------------------------------------------------------ acquire

    def refused(self, reason: str, got: Acquisition) -> Any:
        if reason == REPLAY:
            event = "idempotency.waited" if self.waited else None
            return _replay(self.spec, self.ctx, self.claim.key, got.record, event, self.claim)
        claim = self.claim
        claim.epoch = got.record.epoch
        claim.event(_REFUSALS[reason][0])
        raise refusal_error(reason, self.spec.name, claim.key)

    def acquired(self, got: Acquisition) -> None:
        ctx = self.ctx
        ctx.epoch = got.record.epoch
        ctx.lease = self  # an abandoned sync attempt that finishes later settles through it
        if got.takeover:
            self.claim.event("idempotency.takeover")
        elif observed():  # its level (DEBUG), asked directly: the path of every first call
            self.claim.event("idempotency.acquired")

    def store_error(self, op: str, exc: Exception) -> Exception:
        self.claim.event("idempotency.store_error", exc=exc, op=op)
        return IdempotencyStoreError(
            f"node {self.spec.name!r}: the idempotency store failed at {op} "
            f"({error_text(exc)}); the node did not run",
            node=self.spec.name,
        )

    # ------------------------------------------------------------------ run

    def body_sync(self) -> Any:
        return run_sync(self.spec, self.ctx, self.args, self.kwargs)

    def body_async(self) -> Awaitable[Any]:
        return run_async(self.spec, self.ctx, self.args, self.kwargs)

    # ------------------------------------------------------------------ outcomes

    def encode(self, result: Any) -> tuple[str | None, str | None]:
        self.claim.attempt = self.ctx.attempt
        text, error, self.unstored = self.plan.results.encode(result)
        return text, error

    def completed(self, result: Any) -> Any:
        if observed():  # DEBUG, like `acquired`
            self.claim.event("idempotency.completed")
        if self.unstored is not None:  # warned once recorded: a warning filter may raise
            self.plan.results.warn(self.unstored)
        return result

    def lost(self, record: Record | None, result: Any) -> Any:
        claim = self.claim
        if (
            record is not None
            and record.state == COMPLETED
            and record.fingerprint == claim.fingerprint
        ):
            return _replay(self.spec, self.ctx, claim.key, record, None, claim)
        raise IdempotencyLeaseLost(
            f"node {self.spec.name!r}: the lease on key {claim.key.short} was taken over before "
            "this call finished; its result was not stored",
            node=self.spec.name,
            key_fingerprint=claim.key.short,
        )

    def failure(self, exc: BaseException) -> tuple[str, str | None]:
        self.claim.attempt = self.ctx.attempt
        plan = self.plan
        if plan.cache_errors and isinstance(exc, plan.cache_errors):
            return STORE, plan.results.encode_error(exc)
        if _keeps_lease(exc):
            return KEEP, None
        return RELEASE, None

    def failed(self, exc: BaseException, action: str) -> BaseException:
        if action != KEEP or not isinstance(exc, Exception):
            return exc
        self.claim.event("idempotency.outcome_unknown", exc=exc)
        why = ""
        if self.spec.effect is Effect.WRITE and not self.ctx.key_carried:
            why = (
                " It was not retried: the attempt sent no idempotency key downstream, so a "
                "retry could repeat the effect. Send it with nodekit.http, nodekit.sql or "
                "nk.context().idempotency_key_for(...) to make retries replays."
            )
        return OutcomeUnknown(
            f"node {self.spec.name!r}: the call failed with an ambiguous error "
            f"({type(exc).__name__}); the effect may have happened, so key "
            f"{self.claim.key.short} stays locked until its lease expires.{why}",
            node=self.spec.name,
            key_fingerprint=self.claim.key.short,
        )

    def unrecorded(self, exc: Exception) -> Exception:
        claim = self.claim
        claim.event("idempotency.outcome_unknown", exc=exc, op="complete")
        return OutcomeUnknown(
            f"node {self.spec.name!r}: the call ran, but the idempotency store failed "
            f"({type(exc).__name__}) until its lease ran out, so its outcome is not recorded; key "
            f"{claim.key.short} stays locked until the lease expires",
            node=self.spec.name,
            key_fingerprint=claim.key.short,
        )


def _replay(
    spec: NodeSpec,
    ctx: NodeContext,
    key: RecordKey,
    record: Record,
    event: str | None,
    claim: Claim | None,
) -> Any:
    """The stored outcome, equal in value and type to the first result (or its error).

    `claim` is None for a record read in process before any claim was made (`MemoryStore`):
    the events then carry what the claim's would (node, run id, attempt, key, epoch).
    """
    plan: IdempotencyPlan = spec.idempotency
    ctx.replayed = True
    ctx.epoch = record.epoch
    if claim is not None:
        claim.epoch = record.epoch
    value, error = replayed(plan, spec.name, key, record.result, record.error)
    if wanted("node.replayed"):  # the replay events share its level (INFO)
        run_id = ctx.run_id
        emit(
            event or "idempotency.replayed",
            spec.name,
            run_id,
            ctx.attempt,
            key=key.short,
            epoch=record.epoch,
        )
        emit(
            "node.replayed", spec.name, run_id, ctx.attempt, key=key.short, error=error is not None
        )
    if plan.on_replay is not None:
        plan.on_replay(ctx)
    if error is not None:
        raise error
    return value


def refusal_error(reason: str, node: str, key: RecordKey) -> NodekitError:
    """The error for a refused key (`MISMATCH`, `UNKNOWN` or `BUSY`); shared with `nodekit.sql`."""
    _, error, what = _REFUSALS[reason]
    return error(f"node {node!r}: key {key.short} {what}", node=node, key_fingerprint=key.short)


def replayed(
    plan: IdempotencyPlan, node: str, key: RecordKey, result: str | None, error: str | None
) -> tuple[Any, BaseException | None]:
    """Decode a completed record's result or error: (value, None) or (None, the error).

    A record whose result could not be stored gives an error that says the effect ran (it
    will not run again). Shared by keyed calls and `nodekit.sql`.
    """
    failure, unavailable = plan.results.decode_error(error) if error is not None else (None, None)
    if failure is not None:
        return None, failure
    if unavailable is None:
        if result is not None:
            return plan.results.decode_result(result), None
        unavailable = "no result stored"
    return None, NodekitError(
        f"node {node!r}: key {key.short} already ran, but its result could not be stored "
        f"({unavailable}); the effect happened and will not run again",
        node=node,
        key_fingerprint=key.short,
    )


def _keeps_lease(exc: BaseException) -> bool:
    """Ambiguous failures (and interruptions) keep the lease; safe and permanent release it.

    A nested keyed node's `OutcomeUnknown` or `IdempotencyLeaseLost` means its effect may have
    happened (or did, unrecorded): releasing the outer key would let a retry run it again.
    """
    if not isinstance(exc, Exception):
        return True
    if isinstance(exc, OutcomeUnknown | IdempotencyLeaseLost):
        return True
    return classify(exc) == AMBIGUOUS


def on_abandoned_finish(
    ctx: NodeContext, ok: bool, result: Any, error: BaseException | None
) -> None:
    """An abandoned sync attempt finished: it may complete only if it still holds the lease."""
    holder = ctx.lease
    if not isinstance(holder, KeyedCall) or not ok:
        return
    claim = holder.claim
    text, err = holder.plan.results.encode_result(result)
    try:
        stored = claim.store.complete(claim.key, claim.token, result=text, error=err, ttl=claim.ttl)
    except Exception:
        return  # the lease expires; a takeover runs the call again (at least once)
    if stored:
        claim.event("idempotency.completed", late=True)
        return
    try:
        record = claim.store.get(claim.key)
    except Exception:
        return
    if record is None or record.owner_token != claim.token:  # not settled by this call
        claim.lose()
