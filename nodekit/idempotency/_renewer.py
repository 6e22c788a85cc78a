"""The process's one lease renewer: a daemon thread that keeps every held claim alive.

Every holder of a claim — a keyed node call, sync or async, a durable flow's journal entry —
registers it here while it runs (`hold`) and unregisters it when it settles (`drop`). The
thread renews each lease every third of its length with the store's sync `renew`, so a slow
holder never loses its key and a crashed one blocks it for at most one lease. One thread
serves every thread and event loop of the process: a thread (or a task) per holder would cost
more than the call.

Most calls settle long before their first renewal is due, so `hold` and `drop` take no lock:
a held claim waits in a plain dict (`_fresh`; one insertion and one removal, atomic under the
GIL) and the thread adopts the claims still there only when the earliest of them comes due —
a short call never touches the heap or the lock. The thread promises to look at `_fresh` by
`_fresh_due`; a `hold` due earlier than that promise (rare: a shorter lease than any held)
takes the lock once to bring it forward.

The same thread settles claims whose acquire went wrong (`reconcile`): when an acquire's
reply was lost or its task was cancelled, the holder cannot know whether the store recorded
the claim. It knows its own owner token, so the renewer releases the record if that token
holds it — conditional like every release, so it can never free someone else's claim.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time

from .._classify import PERMANENT, classify
from ._lease import Claim

__all__ = ["RENEWER", "Renewer"]

_RENEW, _RECONCILE, _COMPLETE = 0, 1, 2
# after a store fault, a renewal is tried again sooner than a third of the lease
_FAULT_RETRY = 0.1
# a release that found no claim is tried again at these delays: an acquire whose caller gave
# up may still land (a store thread finishing it, a command already on the wire)
_RECONCILE_POLLS = (0.02, 0.1, 0.5)


class Renewer:
    """Renews held leases and reconciles uncertain acquires, in one daemon thread."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        """A renewer with nothing to do (and, in a forked child, none of its parent's claims:
        they are the parent's to renew, and its lock may have been held at the fork)."""
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int, Claim, int]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._waking_at = float("inf")
        self._stale = 0  # dropped claims still in the heap (removed lazily)
        self._working = 0  # a settlement being carried out right now
        # held claims not yet adopted into the heap (claim -> when its first renewal is due),
        # and the instant by which the thread has promised to adopt them
        self._fresh: dict[Claim, float] = {}
        self._fresh_due = float("inf")

    def hold(self, claim: Claim) -> None:
        """Renew `claim` every third of its lease until `drop`.

        Lock-free unless the claim is due before every claim held so far: the first renewal
        is a third of a lease after `claim.lease_end` was last measured (before the acquire).
        """
        claim.renewing = True
        due = claim.lease_end - claim.lease * (2 / 3)
        self._fresh[claim] = due
        # read after the insertion: if the thread already took its snapshot of `_fresh`, it
        # set `_fresh_due` to infinity first, so this claim takes the lock below
        if due < self._fresh_due:
            self._bring_forward(due)

    def drop(self, claim: Claim) -> None:
        """Stop renewing `claim` (an adopted entry leaves the heap when it comes due)."""
        if claim.renewing:
            claim.renewing = False
            if self._fresh.pop(claim, None) is None:
                self._stale += 1

    def _bring_forward(self, due: float) -> None:
        """Make the thread adopt fresh claims by `due` (started if need be)."""
        with self._cond:
            if due < self._fresh_due:
                self._fresh_due = due
                self._start_or_wake(due)

    def reconcile(self, claim: Claim) -> None:
        """Release `claim` in the background if its acquire landed (token-conditional)."""
        self._push(time.monotonic(), claim, _RECONCILE, 0)

    def complete_later(self, claim: Claim, result: str | None, error: str | None) -> None:
        """Record a known outcome whose holder was interrupted while writing it (a cancelled
        task): retried here until it lands or the lease is about to end."""
        claim.outcome = (result, error)
        self._push(time.monotonic(), claim, _COMPLETE, 0)

    def reconciling(self) -> int:
        """Background settlements (reconciliations, completions) queued or in flight."""
        with self._cond:
            return self._working + sum(1 for entry in self._heap if entry[2] != _RENEW)

    def _push(self, due: float, claim: Claim, job: int, tries: int) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), job, claim, tries))
            self._start_or_wake(due)

    def _start_or_wake(self, due: float) -> None:
        """Under the lock: start the thread (none yet, or forked), or wake it for `due`."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="nodekit-lease-renewer", daemon=True
            )
            self._thread.start()
        elif due < self._waking_at:
            self._cond.notify()

    def _adopt(self) -> None:
        """Under the lock: move the fresh claims still held into the heap."""
        self._fresh_due = float("inf")  # first: a `hold` from now on takes the lock
        fresh = self._fresh
        for claim in list(fresh):
            due = fresh.pop(claim, None)
            if due is not None and claim.renewing:
                heapq.heappush(self._heap, (due, next(self._seq), _RENEW, claim, 0))

    def _next(self) -> tuple[Claim, int, int]:
        """Wait for the next due job (dropped renewals are discarded on the way)."""
        with self._cond:
            while True:
                if self._fresh_due <= time.monotonic():
                    self._adopt()
                heap = self._heap
                if self._stale > 64 and self._stale * 2 > len(heap):
                    self._heap = heap = [e for e in heap if e[2] != _RENEW or e[3].renewing]
                    heapq.heapify(heap)
                    self._stale = 0
                while heap and heap[0][2] == _RENEW and not heap[0][3].renewing:
                    heapq.heappop(heap)
                    self._stale = max(0, self._stale - 1)
                due = heap[0][0] if heap else float("inf")
                wake = min(due, self._fresh_due)
                delay = wake - time.monotonic()
                if delay > 0:
                    self._waking_at = wake
                    self._cond.wait(None if wake == float("inf") else delay)
                    continue
                if due > wake:
                    continue  # fresh claims are due: adopt them first
                _, _, job, claim, tries = heap[0]
                heapq.heappop(heap)
                self._waking_at = float("inf")
                self._working = int(job != _RENEW)
                return claim, job, tries

    def _loop(self) -> None:
        while True:
            claim, job, tries = self._next()
            try:
                if job == _RENEW:
                    self._renew(claim)
                elif job == _RECONCILE:
                    self._reconcile(claim, tries)
                else:
                    self._complete(claim, tries)
            except Exception:  # pragma: no cover - a sink or store bug must not stop renewals
                pass
            finally:
                with self._cond:
                    self._working = 0

    def _renew(self, claim: Claim) -> None:
        started = time.monotonic()
        try:
            ok: bool | None = claim.store.renew(claim.key, claim.token, lease=claim.lease)
        except Exception:
            ok = None  # a passing store fault: try again soon
        if not claim.renewing:
            return  # the holder settled meanwhile: a refused renewal says nothing
        if ok:
            claim.lease_end = started + claim.lease
            claim.event("idempotency.heartbeat", renewed=True)
            self._push(started + claim.lease / 3, claim, _RENEW, 0)
        elif ok is None:
            self._push(time.monotonic() + min(_FAULT_RETRY, claim.lease / 3), claim, _RENEW, 0)
        elif not claim.settling:  # refused while the holder is not completing: taken over
            claim.renewing = False
            claim.lose()

    def _complete(self, claim: Claim, tries: int) -> None:
        result, error = claim.outcome
        try:
            done = claim.store.complete(
                claim.key, claim.token, result=result, error=error, ttl=claim.ttl
            )
        except Exception as exc:
            wait = min(1.0, 0.05 * 2**tries)
            if _transient(exc) and time.monotonic() + wait < claim.lease_end - claim.lease / 4:
                self._push(time.monotonic() + wait, claim, _COMPLETE, tries + 1)
            return
        if done:
            claim.event("idempotency.completed", late=True)
        else:
            claim.lose()

    def _reconcile(self, claim: Claim, tries: int) -> None:
        try:
            released: bool | None = claim.store.release(claim.key, claim.token)
        except Exception as exc:
            if not _transient(exc):
                return  # a closed store, a bug: nothing to wait for
            released = None
        if released:
            claim.event("idempotency.released", reconciled=True)
            return
        if released is None:  # the store is still unreachable: until the lease would end
            wait = min(1.0, 0.05 * 2**tries)
            if time.monotonic() + wait < claim.lease_end:
                self._push(time.monotonic() + wait, claim, _RECONCILE, tries + 1)
            return
        if tries < len(_RECONCILE_POLLS):
            self._push(time.monotonic() + _RECONCILE_POLLS[tries], claim, _RECONCILE, tries + 1)


def _transient(exc: Exception) -> bool:
    """A store fault worth waiting out (not a closed store or a bug)."""
    return classify(exc) != PERMANENT


RENEWER = Renewer()
os.register_at_fork(after_in_child=RENEWER._start)
