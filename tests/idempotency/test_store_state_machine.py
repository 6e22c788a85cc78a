"""A hypothesis state machine drives a store against a reference model of the record rules.

Callers acquire two keys with two payloads, complete, release and renew with tokens old and
new, and the clock moves. After every step the store must agree with the model, and:

- at most one caller per key holds a lease it was told is still valid;
- a completed result is never replaced (nor its record reacquired) within its TTL;
- a live record is never acquired, nor served, under another payload's fingerprint;
- a token other than the record's current owner's never completes, releases or renews.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
)

from nodekit.idempotency import COMPLETED, IN_PROGRESS, MemoryStore, Record, RecordKey

from .conftest import FakeClock

KEYS = [RecordKey("machine@v1", "", "a" * 64), RecordKey("machine@v1", "", "b" * 64)]
FINGERPRINTS = ["fp-a", "fp-b"]
NEVER_ISSUED = "0" * 32

keys = st.sampled_from(KEYS)
leases = st.sampled_from([1.0, 3.0])
ttls = st.sampled_from([2.0, 6.0])


@dataclass
class Expected:
    """The model's record: what the store must hold for a key."""

    fingerprint: str
    state: str
    token: str
    epoch: int
    lease_expires_at: float
    created_at: float
    expires_at: float
    result: str | None = None
    error: str | None = None

    def matches(self, record: Record | None) -> bool:
        return record is not None and (
            record.fingerprint,
            record.state,
            record.owner_token,
            record.epoch,
            record.lease_expires_at,
            record.created_at,
            record.expires_at,
            record.result,
            record.error,
        ) == (
            self.fingerprint,
            self.state,
            self.token,
            self.epoch,
            self.lease_expires_at,
            self.created_at,
            self.expires_at,
            self.result,
            self.error,
        )


@dataclass(frozen=True)
class Grant:
    """A token some caller was given, for one key (it may since have gone stale)."""

    key: RecordKey
    token: str


class StoreMachine(RuleBasedStateMachine):
    """The rules; subclasses say which store they drive."""

    grants = Bundle("grants")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.dir = Path(tempfile.mkdtemp(prefix="nk-machine-"))
        self.store = self.make_store(self.clock, self.dir)
        self.model: dict[RecordKey, Expected] = {}
        # what holders believe: token -> lease end they were told (until they finish or lose it)
        self.leases: dict[Grant, float] = {}
        # completed results that must stay as they are until their TTL: key -> (epoch, result, end)
        self.kept: dict[RecordKey, tuple[int, str | None, float]] = {}
        self.issued: set[str] = set()
        self.results = 0

    def make_store(self, clock: FakeClock, directory: Path) -> Any:
        raise NotImplementedError

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ model helpers

    def live(self, key: RecordKey) -> Expected | None:
        expected = self.model.get(key)
        if expected is None or expected.expires_at <= self.clock.now:
            return None
        return expected

    def holds(self, grant: Grant) -> bool:
        expected = self.model.get(grant.key)
        return (
            expected is not None and expected.state == IN_PROGRESS and expected.token == grant.token
        )

    # ------------------------------------------------------------------ rules

    @rule(
        target=grants,
        key=keys,
        fingerprint=st.sampled_from(FINGERPRINTS),
        lease=leases,
        ttl=ttls,
        takeover=st.booleans(),
    )
    def acquire(
        self, key: RecordKey, fingerprint: str, lease: float, ttl: float, takeover: bool
    ) -> Any:
        now = self.clock.now
        current = self.model.get(key)
        live = self.live(key)
        taking_over = (
            live is not None
            and takeover
            and live.state == IN_PROGRESS
            and live.lease_expires_at <= now
            and live.fingerprint == fingerprint
        )
        got = self.store.acquire(key, fingerprint, lease=lease, ttl=ttl, takeover=takeover)
        assert got.now == now
        if live is not None and live.fingerprint != fingerprint:
            # another payload's live record: never acquired, and what comes back is not ours
            assert not got.acquired
            assert got.record.fingerprint != fingerprint
        if live is not None and not taking_over:
            assert not got.acquired, "a live record was acquired"
            assert live.matches(got.record), "a refusal changed the record"
            return multiple()
        assert got.acquired, "an acquirable key was refused"
        assert got.takeover == taking_over
        record = got.record
        assert record.epoch == (current.epoch if current is not None else 0) + 1
        assert record.owner_token not in self.issued, "a token was issued twice"
        assert record.owner_token != NEVER_ISSUED
        self.issued.add(record.owner_token)
        self.model[key] = Expected(
            fingerprint=fingerprint,
            state=IN_PROGRESS,
            token=record.owner_token,
            epoch=record.epoch,
            lease_expires_at=now + lease,
            created_at=now,
            expires_at=now + max(ttl, lease),
        )
        assert self.model[key].matches(record)
        self.kept.pop(key, None)
        grant = Grant(key, record.owner_token)
        self.leases[grant] = now + lease
        return grant

    @rule(grant=grants, ttl=ttls, error=st.booleans())
    def complete(self, grant: Grant, ttl: float, error: bool) -> None:
        self.results += 1
        text = f'"result {self.results}"'
        holds = self.holds(grant)
        ok = self.store.complete(
            grant.key,
            grant.token,
            result=None if error else text,
            error=text if error else None,
            ttl=ttl,
        )
        assert ok == holds, "complete by a non-holder succeeded" if ok else "holder refused"
        self.leases.pop(grant, None)
        if ok:
            expected = self.model[grant.key]
            expected.state = COMPLETED
            expected.result = None if error else text
            expected.error = text if error else None
            expected.expires_at = self.clock.now + ttl
            self.kept[grant.key] = (expected.epoch, expected.result, expected.expires_at)

    @rule(grant=grants)
    def release(self, grant: Grant) -> None:
        holds = self.holds(grant)
        ok = self.store.release(grant.key, grant.token)
        assert ok == holds, "release by a non-holder succeeded" if ok else "holder refused"
        self.leases.pop(grant, None)
        if ok:
            del self.model[grant.key]

    @rule(grant=grants, lease=leases)
    def renew(self, grant: Grant, lease: float) -> None:
        holds = self.holds(grant)
        ok = self.store.renew(grant.key, grant.token, lease=lease)
        assert ok == holds, "renew by a non-holder succeeded" if ok else "holder refused"
        now = self.clock.now
        if ok:
            expected = self.model[grant.key]
            expected.lease_expires_at = now + lease
            expected.expires_at = max(expected.expires_at, now + lease)
            self.leases[grant] = now + lease
        else:
            self.leases.pop(grant, None)

    @rule(key=keys, lease=leases)
    def strangers_are_always_refused(self, key: RecordKey, lease: float) -> None:
        before = self.model.get(key)
        assert not self.store.renew(key, NEVER_ISSUED, lease=lease)
        assert not self.store.complete(key, NEVER_ISSUED, result='"x"', error=None, ttl=1.0)
        assert not self.store.release(key, NEVER_ISSUED)
        record = self.store.get(key)
        assert (record is None) if before is None else before.matches(record)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 7.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: bool(self.model))
    @rule(key=keys)
    def delete(self, key: RecordKey) -> None:
        assert self.store.delete(key) == (key in self.model)
        self.model.pop(key, None)
        self.kept.pop(key, None)
        self.leases = {g: end for g, end in self.leases.items() if g.key != key}

    # ------------------------------------------------------------------ invariants

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        for key in KEYS:
            record = self.store.get(key)
            expected = self.model.get(key)
            if expected is None:
                assert record is None, f"{key.digest[:1]}: the store kept a record it should not"
            else:
                assert expected.matches(record), f"{key.digest[:1]}: {record} != {expected}"

    @invariant()
    def at_most_one_valid_lease_per_key(self) -> None:
        now = self.clock.now
        for key in KEYS:
            valid = [g for g, end in self.leases.items() if g.key == key and end > now]
            assert len(valid) <= 1, f"two callers hold a valid lease on {key.digest[:1]}: {valid}"

    @invariant()
    def completed_results_are_kept_for_their_ttl(self) -> None:
        for key, (epoch, result, end) in self.kept.items():
            if self.clock.now < end:
                record = self.store.get(key)
                assert record is not None
                assert (record.state, record.epoch, record.result) == (COMPLETED, epoch, result)


MACHINE_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class MemoryStoreMachine(StoreMachine):
    def make_store(self, clock: FakeClock, directory: Path) -> Any:
        return MemoryStore(clock=clock)


class SQLiteStoreMachine(StoreMachine):
    def make_store(self, clock: FakeClock, directory: Path) -> Any:
        from nodekit.idempotency.sqlite import SQLiteStore

        return SQLiteStore(directory / "records.db", clock=clock)


TestMemoryStoreAgainstTheModel = MemoryStoreMachine.TestCase
TestMemoryStoreAgainstTheModel.settings = MACHINE_SETTINGS
TestSQLiteStoreAgainstTheModel = SQLiteStoreMachine.TestCase
TestSQLiteStoreAgainstTheModel.settings = MACHINE_SETTINGS
