"""The claim protocol, written once: acquire → run → complete or release, the lease renewed.

Every user of a key goes through here: a keyed node call (`_keyed.py`), a durable flow's
journal entries, and the decisions `nodekit.sql` applies to the row it finds. The protocol
is a generator that makes the decisions and *yields* each store operation it needs as a
command; `drive_sync` and `drive_async` carry the commands out (call or await, sleep, run the
holder's body) and send the replies back. So each step exists once, and the two drivers
differ only by `await`.

What a holder does at each step (replay a completed record, raise on a mismatch, what a
failure means for the key) is a `Holder` subclass: the protocol asks it, it never talks to
the store.

Guarantees kept here:

- the caller chooses its owner token before acquiring, so an acquire whose reply is lost, or
  whose task is cancelled mid-call, is reconciled: the caller releases its own claim (or the
  renewer does, once the store answers) and nothing stays locked when nothing ran;
- while the body runs, the process's one renewer (`_renewer.py`) keeps the lease alive;
- a completion write that fails is retried with backoff until the lease runs out, the lease
  renewed meanwhile; if it never lands, the record stays in progress — never released, since
  the effect happened — and the caller gets `OutcomeUnknown` chained to the store error;
- every write after the acquire is conditional on the token (fencing): a holder whose lease
  was taken over never overwrites or deletes the record;
- a key held by a process that is gone (same host, `_holder.py`) is taken over at once rather
  than after its lease: the acquire is sent again naming the dead holder's token, and the
  store takes the record over only if that token still holds it (one of many racing callers
  wins). What the takeover means for the effect is what an expired lease means: a holder
  that may not take over (at most once) is refused with `OutcomeUnknown` at once instead;
- every `IdempotencyInProgress` and `OutcomeUnknown` the protocol hands out names the key's
  holder (host, pid, since when, the lease's end in local time; `.holder`), never the key.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Generator
from typing import Any

from .._errors import IdempotencyInProgress, NodekitError, OutcomeUnknown
from .._runtime import RUNTIME
from ._holder import DEAD, KeyHolder, key_holder, state_of
from ._lease import Claim
from ._renewer import RENEWER
from ._store import COMPLETED, IN_PROGRESS, Acquisition, NotSent, Record

__all__ = [
    "BUSY",
    "KEEP",
    "MISMATCH",
    "RELEASE",
    "REPLAY",
    "STORE",
    "UNKNOWN",
    "Claim",
    "Holder",
    "drive_async",
    "drive_sync",
]

# why an acquire was refused
MISMATCH, REPLAY, UNKNOWN, BUSY = "mismatch", "replay", "unknown", "busy"
# what a failed body does to the key
KEEP, RELEASE, STORE = "keep", "release", "store"

# the commands the protocol yields: (command, argument)
_ACQUIRE, _COMPLETE, _RELEASE, _GET, _SLEEP, _BODY = range(6)
Command = tuple[int, Any]
Protocol = Generator[Command, Any, Any]


class Holder:
    """What one kind of holder does at each step; the protocol calls, it decides."""

    claim: Claim
    # a monotonic instant until which a busy key is waited for (None: never wait)
    wait_until: float | None = None
    waited = False
    # who holds the key, when the last acquire found it held (for the refusal's message)
    found: KeyHolder | None = None

    def refused(self, reason: str, got: Acquisition) -> Any:
        """The key could not be acquired: return the call's value (a replay) or raise."""
        raise NotImplementedError

    def acquired(self, got: Acquisition) -> None:
        """The key is held (a fresh claim or a takeover)."""

    def body_sync(self) -> Any:
        raise NotImplementedError

    def body_async(self) -> Awaitable[Any]:
        """The body as an awaitable (a coroutine), awaited by the async driver."""
        raise NotImplementedError

    def encode(self, result: Any) -> tuple[str | None, str | None]:
        """The record's (result, error) JSON for a successful body."""
        raise NotImplementedError

    def completed(self, result: Any) -> Any:
        """The result was recorded: what the call returns."""
        return result

    def lost(self, record: Record | None, result: Any) -> Any:
        """The completion was refused (taken over): return the recorded outcome or raise."""
        raise NotImplementedError

    def failure(self, exc: BaseException) -> tuple[str, str | None]:
        """What a failed body does to the key: `KEEP`, `RELEASE`, or `STORE` with error JSON."""
        return RELEASE, None

    def failed(self, exc: BaseException, action: str) -> BaseException:
        """The error the call raises once the key is settled (`exc` itself by default)."""
        return exc

    def store_error(self, op: str, exc: Exception) -> Exception:
        """The error for a store that failed at `op` before anything ran."""
        raise NotImplementedError

    def unrecorded(self, exc: Exception) -> Exception:
        """The effect happened but its outcome could not be recorded within the lease."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- the protocol


def _protocol(holder: Holder) -> Protocol:
    claim = holder.claim
    pause = 0.005
    while True:  # acquire, waiting on a busy key while the holder wants to
        claim.lease_end = time.monotonic() + claim.lease
        try:
            got: Acquisition = yield _ACQUIRE, None
        except BaseException as exc:
            yield from _reconcile(claim, exc)
            if isinstance(exc, Exception) and not isinstance(exc, NodekitError):
                raise holder.store_error("acquire", exc) from exc
            raise
        if got.acquired:
            break
        if got.record.owner_token == claim.token and got.record.state == IN_PROGRESS:
            break  # our own acquire, answered twice (a client that sent it again)
        record = got.record
        if record.fingerprint != claim.fingerprint:
            return holder.refused(MISMATCH, got)  # it raises
        if record.state == COMPLETED:
            return holder.refused(REPLAY, got)  # the stored outcome
        # in progress: a live lease, or an expired one this caller may not take over
        state = state_of(record.holder)  # a local check, made only when a lease is found
        expired = record.lease_expires_at <= got.now
        if not expired and state == DEAD and claim.dead != record.owner_token:
            if claim.takeover:
                claim.dead = record.owner_token  # acquire again: taken over if it still holds
                continue
            expired = True  # at most once: refused as after its lease, without the wait
        found = key_holder(record.holder, record.created_at, record.lease_expires_at, state)
        holder.found = found
        left = 0.0 if holder.wait_until is None else holder.wait_until - time.monotonic()
        if expired or left <= 0.0:
            try:
                return holder.refused(UNKNOWN if expired else BUSY, got)
            except (IdempotencyInProgress, OutcomeUnknown) as exc:
                _name_holder(exc, found, got.now)
                raise
        holder.waited = True
        yield _SLEEP, min(pause, left)
        pause = min(pause * 2, 0.5)
    claim.epoch = got.record.epoch
    claim.since = got.record.created_at
    holder.acquired(got)
    # hold the key while the body runs (renewed meanwhile), then settle: complete or release
    # (written out here rather than in a sub-generator: every command passes through each
    # level of `yield from`, and this is the path of every first execution)
    RENEWER.hold(claim)
    try:
        result = yield _BODY, None
    except BaseException as exc:
        RENEWER.drop(claim)
        action = yield from _settle(holder, exc)
        replacement = holder.failed(exc, action)
        if replacement is exc:
            raise
        if isinstance(replacement, OutcomeUnknown):
            _name_holder(replacement, claim.held_here(), None)
        raise replacement from exc
    try:
        text, error = holder.encode(result)
        recorded = yield from _complete(holder, text, error)
    finally:
        RENEWER.drop(claim)
    if recorded:
        return holder.completed(result)
    try:
        record = yield _GET, None
    except Exception as exc:
        raise _unrecorded(holder, exc) from exc
    if record is not None and record.owner_token == claim.token and record.state == COMPLETED:
        return holder.completed(result)  # our completion landed; only its reply was lost
    claim.lose()
    return holder.lost(record, result)


def _reconcile(claim: Claim, exc: BaseException) -> Generator[Command, Any, None]:
    """An acquire failed mid-way: release our own claim if the store recorded it."""
    if isinstance(exc, NodekitError | NotSent):
        # the store answered (a corrupt record) or was never asked (no connection): no claim
        return
    released = False
    if isinstance(exc, Exception):  # a lost reply: try at once; a cancelled task must not wait
        try:
            released = yield _RELEASE, None
        except Exception:
            released = False
    if released:
        claim.event("idempotency.released", reconciled=True)
    else:
        RENEWER.reconcile(claim)


def _complete(holder: Holder, text: str | None, error: str | None) -> Generator[Command, Any, bool]:
    """Record the outcome; a store fault is retried until the lease runs out."""
    claim = holder.claim
    claim.settling = True
    pause = 0.01
    waited = 0.0  # the waits asked for: under the test kit's instant clock no time passes
    first = 0.0  # when the first write failed
    while True:
        try:
            recorded: bool = yield _COMPLETE, (text, error)
            return recorded
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled mid-write: the outcome is known
                RENEWER.complete_later(claim, text, error)
                raise
            now = time.monotonic()
            first = first or now
            # give up a quarter lease before it ends: the key is still held when the caller
            # hears OutcomeUnknown, so an immediate retry is refused, not run again
            left = claim.lease_end - claim.lease / 4 - max(now, first + waited)
            if claim.lost or left <= 0.0:
                raise _unrecorded(holder, exc) from exc
            claim.event("idempotency.store_error", exc=exc, op="complete", retrying=True)
            wait = min(pause, left)
            waited += wait
            yield _SLEEP, wait
            pause = min(pause * 2, 1.0)


def _settle(holder: Holder, exc: BaseException) -> Generator[Command, Any, str]:
    """After the body failed: store a listed error, keep the lease, or release the key."""
    claim = holder.claim
    action, error = holder.failure(exc)
    if action == STORE:
        if not (yield from _complete(holder, None, error)):
            claim.lose()
    elif action == RELEASE:
        try:
            released = yield _RELEASE, None
        except Exception:
            return action  # the lease expires on its own
        if released:
            claim.event("idempotency.released")
        else:
            claim.lose()
    return action


# ---------------------------------------------------------------------------- holders named


def _unrecorded(holder: Holder, exc: Exception) -> Exception:
    error = holder.unrecorded(exc)
    if isinstance(error, OutcomeUnknown):
        _name_holder(error, holder.claim.held_here(), None)
    return error


def _name_holder(exc: NodekitError, who: KeyHolder, now: float | None) -> None:
    """Say in `exc` who holds the key (and keep it as `.holder`), unless it says so already.

    For an `OutcomeUnknown` whose message gives no way out, say how to resolve the key.
    """
    if getattr(exc, "holder", None) is not None or not exc.args:
        return
    exc.holder = who  # type: ignore[attr-defined]
    text = f"{str(exc.args[0]).rstrip('. ')}. The key is {who.describe(now)}"
    if isinstance(exc, OutcomeUnknown) and "resolve" not in text:
        text += (
            ". Once you know whether the effect happened, you may settle the key sooner: "
            "resolve it (nk.resolve(node, *args), or `nodekit store resolve`) and call again"
        )
    exc.args = (text, *exc.args[1:])


# ---------------------------------------------------------------------------- drivers
#
# Two drivers that read line for line alike: `drive_sync` does every command in this thread,
# `drive_async` awaits it on the running loop (the store's async twin of each operation).
# The store calls are spelled out, keywords and all: a call with literal keywords costs less
# than building an argument dict per command.


def drive_sync(holder: Holder) -> Any:
    """Carry out the protocol for `holder` in this thread."""
    protocol = _protocol(holder)
    send, throw = protocol.send, protocol.throw
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            command, argument = send(reply) if error is None else throw(error)
        except StopIteration as stop:
            return stop.value
        reply, error = None, None
        try:
            reply = _blocking(holder, command, argument)
        except BaseException as exc:
            error = exc


async def drive_async(holder: Holder) -> Any:
    """Carry out the protocol for `holder` on the running event loop (store I/O awaited)."""
    protocol = _protocol(holder)
    send, throw = protocol.send, protocol.throw
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            command, argument = send(reply) if error is None else throw(error)
        except StopIteration as stop:
            return stop.value
        reply, error = None, None
        try:
            reply = await _awaitable(holder, command, argument)
        except BaseException as exc:
            error = exc


def _acquire_options(claim: Claim) -> dict[str, Any]:
    """`acquire`'s keyword arguments; `dead` only for a dead holder's record (a store that
    does not know it is never asked)."""
    options = {
        "lease": claim.lease,
        "ttl": claim.ttl,
        "takeover": claim.takeover,
        "token": claim.token,
    }
    if claim.dead is not None:
        options["dead"] = claim.dead
    return options


def _blocking(holder: Holder, command: int, argument: Any) -> Any:
    """One command, done in this thread."""
    if command == _BODY:
        return holder.body_sync()
    claim = holder.claim
    store = claim.store
    if command == _ACQUIRE:
        return store.acquire(claim.key, claim.fingerprint, **_acquire_options(claim))
    if command == _COMPLETE:
        result, error = argument
        return store.complete(claim.key, claim.token, result=result, error=error, ttl=claim.ttl)
    if command == _RELEASE:
        return store.release(claim.key, claim.token)
    if command == _GET:
        return store.get(claim.key)
    return RUNTIME.sleep(argument)


def _awaitable(holder: Holder, command: int, argument: Any) -> Awaitable[Any]:
    """One command as an awaitable for the running loop (the store's async twin)."""
    if command == _BODY:
        return holder.body_async()
    claim = holder.claim
    store = claim.store
    if command == _ACQUIRE:
        return store.aacquire(  # type: ignore[no-any-return]
            claim.key, claim.fingerprint, **_acquire_options(claim)
        )
    if command == _COMPLETE:
        result, error = argument
        return store.acomplete(  # type: ignore[no-any-return]
            claim.key, claim.token, result=result, error=error, ttl=claim.ttl
        )
    if command == _RELEASE:
        return store.arelease(claim.key, claim.token)  # type: ignore[no-any-return]
    if command == _GET:
        return store.aget(claim.key)  # type: ignore[no-any-return]
    return RUNTIME.asleep(argument)
