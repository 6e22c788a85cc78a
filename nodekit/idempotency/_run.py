"""The idempotent call: one acquisition per logical call, wrapping the retry loop (rule 24).

Decisions (which outcome a record means, what a failure does to the key) are made once here
in I/O-free helpers; `idempotent_sync` and `idempotent_async` only talk to the store, sleep,
and run the node's attempt loop, and read line for line alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any

from .._context import NodeContext
from .._errors import (
    IdempotencyInProgress,
    IdempotencyLeaseLost,
    IdempotencyMismatch,
    IdempotencyStoreError,
    NodekitError,
    OutcomeUnknown,
)
from .._events import emit
from .._execution import CLOCK, call_async, call_sync, run_async, run_sync
from .._policies import AMBIGUOUS, classify
from ._store import COMPLETED, Acquisition, Record, RecordKey

if TYPE_CHECKING:
    from .._node import NodeSpec
    from ._policy import IdempotencyPlan

__all__ = ["idempotent_async", "idempotent_sync"]

_COMPLETE_TRIES = 3


class Lease:
    """What a holder needs to settle its call: the store, key, owner token and epoch."""

    __slots__ = ("epoch", "fingerprint", "key", "lost", "plan", "run_id", "store", "token")

    def __init__(
        self,
        plan: IdempotencyPlan,
        store: Any,
        key: RecordKey,
        record: Record,
        fingerprint: str,
        run_id: str,
    ):
        self.plan = plan
        self.store = store
        self.key = key
        self.token = record.owner_token
        self.epoch = record.epoch
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.lost = False

    def emit(self, name: str, **fields: Any) -> None:
        """An event about this lease from outside the call (heartbeats, late finishes)."""
        emit(name, self.plan.node, self.run_id, 0, key=self.key.short, epoch=self.epoch, **fields)


# ---------------------------------------------------------------------------- decisions


def _ids(key: RecordKey, epoch: int | None = None) -> dict[str, Any]:
    """An event's record fields: the key's short fingerprint (never the key) and the epoch."""
    fields: dict[str, Any] = {"key": key.short}
    if epoch is not None:
        fields["epoch"] = epoch
    return fields


def _refuse(fp: str, got: Acquisition) -> str:
    """Why an acquire that failed cannot proceed: 'mismatch', 'replay', 'unknown' or 'busy'."""
    record = got.record
    if record.fingerprint != fp:
        return "mismatch"
    if record.state == COMPLETED:
        return "replay"
    if record.lease_expires_at <= got.now:
        return "unknown"  # at_most_once: the previous holder vanished mid-call
    return "busy"


# refusal reason -> (event, error type, what the error says after "key <fingerprint>")
_REFUSALS: dict[str, tuple[str, type[NodekitError], str]] = {
    "mismatch": (
        "idempotency.mismatch",
        IdempotencyMismatch,
        "was used before with a different payload; nothing ran. Use a new key for a new request",
    ),
    "unknown": (
        "idempotency.outcome_unknown",
        OutcomeUnknown,
        "was held by a call that vanished mid-effect and the node delivers at most once: "
        "resolve the key (store.delete) once you know whether the effect happened",
    ),
    "busy": (
        "idempotency.in_progress",
        IdempotencyInProgress,
        "is being processed by another caller",
    ),
}


def _raise_refusal(
    reason: str, spec: NodeSpec, ctx: NodeContext, key: RecordKey, record: Record
) -> None:
    """Report and raise why an acquire that was refused cannot proceed (`_refuse`)."""
    event, error, what = _REFUSALS[reason]
    emit(event, spec.name, ctx.run_id, ctx.attempt, **_ids(key, record.epoch))
    raise error(
        f"node {spec.name!r}: key {key.short} {what}",
        node=spec.name,
        key_fingerprint=key.short,
    )


def _replay(
    spec: NodeSpec,
    ctx: NodeContext,
    plan: IdempotencyPlan,
    key: RecordKey,
    record: Record,
    waited: bool,
) -> Any:
    ctx.replayed = True
    ctx.epoch = record.epoch
    if record.error is not None:
        error, unavailable = plan.results.decode_error(record.error)
    else:
        error, unavailable = None, None
    value = None
    if error is None and unavailable is None:
        if record.result is None:
            unavailable = "no result stored"
        else:
            value = plan.results.decode_result(record.result)
    emit(
        "idempotency.waited" if waited else "idempotency.replayed",
        spec.name,
        ctx.run_id,
        ctx.attempt,
        **_ids(key, record.epoch),
    )
    emit(
        "node.replayed", spec.name, ctx.run_id, ctx.attempt, key=key.short, error=error is not None
    )
    if plan.on_replay is not None:
        plan.on_replay(ctx)
    if unavailable is not None:
        raise NodekitError(
            f"node {spec.name!r}: key {key.short} already ran, but its result could not be "
            f"stored ({unavailable}); the effect happened and will not run again",
            node=spec.name,
            key_fingerprint=key.short,
        )
    if error is not None:
        raise error
    return value


def _failure_keeps_lease(exc: BaseException) -> bool:
    """Ambiguous failures (and interruptions) keep the lease; safe and permanent release it.

    A nested keyed node's `OutcomeUnknown` or `IdempotencyLeaseLost` means its effect may have
    happened (or did, unrecorded): releasing the outer key would let a retry run it again.
    """
    if not isinstance(exc, Exception):
        return True
    if isinstance(exc, OutcomeUnknown | IdempotencyLeaseLost):
        return True
    return classify(exc) == AMBIGUOUS


def _outcome_unknown(
    spec: NodeSpec, ctx: NodeContext, key: RecordKey, exc: Exception
) -> OutcomeUnknown:
    emit(
        "idempotency.outcome_unknown",
        spec.name,
        ctx.run_id,
        ctx.attempt,
        exc=exc,
        key=key.short,
        epoch=ctx.epoch,
    )
    return OutcomeUnknown(
        f"node {spec.name!r}: the call failed with an ambiguous error ({type(exc).__name__}); "
        f"the effect may have happened, so key {key.short} stays locked until its lease expires",
        node=spec.name,
        key_fingerprint=key.short,
    )


def _store_error(
    spec: NodeSpec, ctx: NodeContext, key: RecordKey, op: str, exc: BaseException
) -> IdempotencyStoreError:
    emit(
        "idempotency.store_error",
        spec.name,
        ctx.run_id,
        ctx.attempt,
        exc=exc,
        op=op,
        **_ids(key, ctx.epoch),  # no epoch yet when acquire failed
    )
    message = (
        f"node {spec.name!r}: the idempotency store failed at {op} ({type(exc).__name__}: {exc})"
    )
    if op == "acquire":
        message += "; the node did not run"
    return IdempotencyStoreError(message, node=spec.name)


def _emit_lease_lost(spec: NodeSpec, ctx: NodeContext, lease: Lease) -> None:
    """Once per call: the heartbeat may have reported the loss already."""
    if lease.lost:
        return
    lease.lost = True
    emit(
        "idempotency.lease_lost",
        spec.name,
        ctx.run_id,
        ctx.attempt,
        **_ids(lease.key, ctx.epoch),
    )


def _released(spec: NodeSpec, ctx: NodeContext, lease: Lease, released: bool) -> None:
    """After a token-conditional release: `released`, or `lease_lost` if another holder has it."""
    if released:
        emit(
            "idempotency.released",
            spec.name,
            ctx.run_id,
            ctx.attempt,
            **_ids(lease.key, ctx.epoch),
        )
    else:
        _emit_lease_lost(spec, ctx, lease)


def _after_lease_lost(
    spec: NodeSpec, ctx: NodeContext, plan: IdempotencyPlan, lease: Lease, record: Record | None
) -> Any:
    """A completion the store refused: replay the new holder's equal result, or raise."""
    if record is not None and record.state == COMPLETED and record.fingerprint == lease.fingerprint:
        return _replay(spec, ctx, plan, lease.key, record, False)
    raise IdempotencyLeaseLost(
        f"node {spec.name!r}: the lease on key {lease.key.short} was taken over before this call "
        "finished; its result was not stored",
        node=spec.name,
        key_fingerprint=lease.key.short,
    )


# ---------------------------------------------------------------------------- heartbeats


class _Heartbeats:
    """One daemon thread renewing the leases of long sync calls (every lease / 3)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Lease]] = []
        self._active: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, lease: Lease) -> int:
        ident = next(self._ids)
        due = time.monotonic() + lease.plan.lease / 3
        with self._cond:
            heapq.heappush(self._heap, (due, ident, lease))
            self._active.add(ident)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="nodekit:heartbeat", daemon=True
                )
                self._thread.start()
            elif self._heap[0][1] == ident:
                self._cond.notify()
        return ident

    def stop(self, ident: int) -> None:
        with self._cond:
            self._active.discard(ident)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._active:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(timeout=5.0)
                    continue
                due, ident, lease = self._heap[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._cond.wait(timeout=delay)
                    continue
                heapq.heappop(self._heap)
            try:
                ok = lease.store.renew(lease.key, lease.token, lease=lease.plan.held)
            except Exception:
                ok = True  # a passing store fault: try again at the next beat
            with self._cond:
                active = ident in self._active
            if not active:
                continue  # the call settled meanwhile: a refused renewal says nothing
            lease.emit("idempotency.heartbeat", renewed=ok)
            if not ok:
                lease.lost = True
                lease.emit("idempotency.lease_lost")
                self.stop(ident)
                continue
            with self._cond:
                if ident in self._active:
                    heapq.heappush(
                        self._heap, (time.monotonic() + lease.plan.lease / 3, ident, lease)
                    )


HEARTBEATS = _Heartbeats()


class _AsyncHeartbeat:
    """Renews one lease from the running event loop (every lease / 3) until cancelled."""

    __slots__ = ("handle", "interval", "lease", "loop", "task")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.loop = asyncio.get_running_loop()
        self.interval = lease.plan.lease / 3
        self.task: asyncio.Task[None] | None = None
        self.handle = self.loop.call_later(self.interval, self._fire)

    def _fire(self) -> None:
        self.task = self.loop.create_task(self._beat())

    async def _beat(self) -> None:
        lease = self.lease
        try:
            ok = await lease.store.arenew(lease.key, lease.token, lease=lease.plan.held)
        except Exception:
            ok = True  # a passing store fault: try again at the next beat
        lease.emit("idempotency.heartbeat", renewed=ok)
        if not ok:
            lease.lost = True
            lease.emit("idempotency.lease_lost")
            return
        self.handle = self.loop.call_later(self.interval, self._fire)

    def cancel(self) -> None:
        self.handle.cancel()
        task = self.task
        if task is not None and not task.done():
            task.cancel()


# ---------------------------------------------------------------------------- sync driver


def idempotent_sync(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """Acquire the call's key once, then run the whole attempt loop holding it (rule 24).

    A completed key replays without running; a busy one raises or, with
    ``on_conflict="wait"``, polls with a doubling pause until `wait_timeout`.
    """
    plan: IdempotencyPlan = spec.idempotency
    found = plan.key_for(args, kwargs)
    if found is None:
        return run_sync(spec, ctx, args, kwargs)
    key, fp = found
    ctx.idempotency_key = key.digest
    store = plan.store()
    waited = False
    deadline = time.monotonic() + plan.wait_timeout
    pause = 0.005
    while True:
        try:
            got = store.acquire(key, fp, lease=plan.held, ttl=plan.kept, takeover=plan.takeover)
        except NodekitError:
            raise
        except Exception as exc:
            raise _store_error(spec, ctx, key, "acquire", exc) from exc
        if got.acquired:
            break
        reason = _refuse(fp, got)
        if reason == "replay":
            return _replay(spec, ctx, plan, key, got.record, waited)
        if reason != "busy" or plan.policy.on_conflict == "raise" or time.monotonic() >= deadline:
            _raise_refusal(reason, spec, ctx, key, got.record)
        waited = True
        CLOCK.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.5)
    return _run_holding_sync(spec, ctx, args, kwargs, plan, store, key, fp, got)


def _run_holding_sync(
    spec: NodeSpec,
    ctx: NodeContext,
    args: Any,
    kwargs: Any,
    plan: IdempotencyPlan,
    store: Any,
    key: RecordKey,
    fp: str,
    got: Acquisition,
) -> Any:
    record = got.record
    ctx.epoch = record.epoch
    lease = Lease(plan, store, key, record, fp, ctx.run_id)
    ctx.lease = lease  # type: ignore[attr-defined]
    emit(
        "idempotency.takeover" if got.takeover else "idempotency.acquired",
        spec.name,
        ctx.run_id,
        ctx.attempt,
        **_ids(key, record.epoch),
    )
    beat = HEARTBEATS.start(lease)
    try:
        result = call_sync(spec, ctx, args, kwargs)
    except BaseException as exc:
        HEARTBEATS.stop(beat)
        _settle_failure_sync(spec, ctx, plan, lease, exc)
        raise
    HEARTBEATS.stop(beat)
    return _complete_sync(spec, ctx, plan, lease, result)


def _settle_failure_sync(
    spec: NodeSpec, ctx: NodeContext, plan: IdempotencyPlan, lease: Lease, exc: BaseException
) -> None:
    """After the loop gave up: cache a listed error, keep the lease, or release the key."""
    store, key, token = lease.store, lease.key, lease.token
    if plan.cache_errors and isinstance(exc, plan.cache_errors):
        try:
            stored = store.complete(
                key, token, result=None, error=plan.results.encode_error(exc), ttl=plan.kept
            )
        except Exception as error:
            raise _store_error(spec, ctx, key, "complete", error) from exc
        if not stored:
            _emit_lease_lost(spec, ctx, lease)
        return
    if _failure_keeps_lease(exc):
        if isinstance(exc, Exception):
            raise _outcome_unknown(spec, ctx, key, exc) from exc
        return
    try:
        released = store.release(key, token)
    except Exception:
        return  # the lease expires on its own
    _released(spec, ctx, lease, released)


def _complete_sync(
    spec: NodeSpec, ctx: NodeContext, plan: IdempotencyPlan, lease: Lease, result: Any
) -> Any:
    """Record the result; a store fault is tried again, since the effect has happened and a
    lost record would let a later call run it again."""
    text, error = plan.results.encode_result(result)
    store, key = lease.store, lease.key
    last: BaseException | None = None
    for attempt in range(_COMPLETE_TRIES):
        try:
            ok = store.complete(key, lease.token, result=text, error=error, ttl=plan.kept)
        except Exception as exc:
            last = exc
            if attempt + 1 < _COMPLETE_TRIES:
                CLOCK.sleep(0.05 * (attempt + 1))
            continue
        if ok:
            emit(
                "idempotency.completed",
                spec.name,
                ctx.run_id,
                ctx.attempt,
                key=key.short,
                epoch=ctx.epoch,
            )
            return result
        _emit_lease_lost(spec, ctx, lease)
        return _after_lease_lost(spec, ctx, plan, lease, store.get(key))
    assert last is not None
    raise _store_error(spec, ctx, key, "complete", last) from last


def on_abandoned_finish(
    ctx: NodeContext, ok: bool, result: Any, error: BaseException | None
) -> None:
    """An abandoned sync attempt finished: it may complete only if it still holds the lease."""
    lease: Lease | None = getattr(ctx, "lease", None)
    if lease is None or not ok:
        return
    text, err = lease.plan.results.encode_result(result)
    try:
        stored = lease.store.complete(
            lease.key, lease.token, result=text, error=err, ttl=lease.plan.kept
        )
    except Exception:
        return  # the lease expires; a takeover runs the call again (at least once)
    if stored:
        lease.emit("idempotency.completed", late=True)
        return
    with contextlib.suppress(Exception):
        record = lease.store.get(lease.key)
        if record is None or record.owner_token != lease.token:  # not settled by this call
            lease.lost = True
            lease.emit("idempotency.lease_lost", late=True)


# ---------------------------------------------------------------------------- async driver


async def idempotent_async(spec: NodeSpec, ctx: NodeContext, args: Any, kwargs: Any) -> Any:
    """The async twin of `idempotent_sync`."""
    plan: IdempotencyPlan = spec.idempotency
    found = plan.key_for(args, kwargs)
    if found is None:
        return await run_async(spec, ctx, args, kwargs)
    key, fp = found
    ctx.idempotency_key = key.digest
    store = plan.store()
    waited = False
    deadline = time.monotonic() + plan.wait_timeout
    pause = 0.005
    while True:
        try:
            got = await store.aacquire(
                key, fp, lease=plan.held, ttl=plan.kept, takeover=plan.takeover
            )
        except NodekitError:
            raise
        except Exception as exc:
            raise _store_error(spec, ctx, key, "acquire", exc) from exc
        if got.acquired:
            break
        reason = _refuse(fp, got)
        if reason == "replay":
            return _replay(spec, ctx, plan, key, got.record, waited)
        if reason != "busy" or plan.policy.on_conflict == "raise" or time.monotonic() >= deadline:
            _raise_refusal(reason, spec, ctx, key, got.record)
        waited = True
        await CLOCK.asleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.5)
    return await _run_holding_async(spec, ctx, args, kwargs, plan, store, key, fp, got)


async def _run_holding_async(
    spec: NodeSpec,
    ctx: NodeContext,
    args: Any,
    kwargs: Any,
    plan: IdempotencyPlan,
    store: Any,
    key: RecordKey,
    fp: str,
    got: Acquisition,
) -> Any:
    record = got.record
    ctx.epoch = record.epoch
    lease = Lease(plan, store, key, record, fp, ctx.run_id)
    ctx.lease = lease  # type: ignore[attr-defined]
    emit(
        "idempotency.takeover" if got.takeover else "idempotency.acquired",
        spec.name,
        ctx.run_id,
        ctx.attempt,
        **_ids(key, record.epoch),
    )
    beat = _AsyncHeartbeat(lease)
    try:
        result = await call_async(spec, ctx, args, kwargs)
    except BaseException as exc:
        beat.cancel()
        await _settle_failure_async(spec, ctx, plan, lease, exc)
        raise
    beat.cancel()
    return await _complete_async(spec, ctx, plan, lease, result)


async def _settle_failure_async(
    spec: NodeSpec, ctx: NodeContext, plan: IdempotencyPlan, lease: Lease, exc: BaseException
) -> None:
    store, key, token = lease.store, lease.key, lease.token
    if plan.cache_errors and isinstance(exc, plan.cache_errors):
        try:
            stored = await store.acomplete(
                key, token, result=None, error=plan.results.encode_error(exc), ttl=plan.kept
            )
        except Exception as error:
            raise _store_error(spec, ctx, key, "complete", error) from exc
        if not stored:
            _emit_lease_lost(spec, ctx, lease)
        return
    if _failure_keeps_lease(exc):
        if isinstance(exc, Exception):
            raise _outcome_unknown(spec, ctx, key, exc) from exc
        return
    try:
        released = await store.arelease(key, token)
    except Exception:
        return  # the lease expires on its own
    _released(spec, ctx, lease, released)


async def _complete_async(
    spec: NodeSpec, ctx: NodeContext, plan: IdempotencyPlan, lease: Lease, result: Any
) -> Any:
    text, error = plan.results.encode_result(result)
    store, key = lease.store, lease.key
    last: BaseException | None = None
    for attempt in range(_COMPLETE_TRIES):
        try:
            ok = await store.acomplete(key, lease.token, result=text, error=error, ttl=plan.kept)
        except Exception as exc:
            last = exc
            if attempt + 1 < _COMPLETE_TRIES:
                await CLOCK.asleep(0.05 * (attempt + 1))
            continue
        if ok:
            emit(
                "idempotency.completed",
                spec.name,
                ctx.run_id,
                ctx.attempt,
                key=key.short,
                epoch=ctx.epoch,
            )
            return result
        _emit_lease_lost(spec, ctx, lease)
        return _after_lease_lost(spec, ctx, plan, lease, await store.aget(key))
    assert last is not None
    raise _store_error(spec, ctx, key, "complete", last) from last
