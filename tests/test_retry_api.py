"""The retry API users of tenacity and stamina reach for: retry on a result, tenacity's result
strategies honoured or refused, an inline `nk.attempts` block, the global test switch, and a
fresh default store per test."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import tenacity

import nodekit as nk
from nodekit.testing import FaultPlan, LocalAPI, capture_events, instant, set_testing

# ---------------------------------------------------------------------------- on_result


def test_on_result_calls_again_until_the_result_is_accepted() -> None:
    answers = iter(["pending", "pending", "done"])
    seen: list[int] = []

    @nk.node(
        effect=nk.Effect.READ,
        retry=nk.Retry(attempts=5, jitter=0, on_result=lambda status: status == "pending"),
    )
    def status() -> str:
        seen.append(nk.context().attempt)
        return next(answers)

    with instant() as clock, capture_events(prefix="node.retrying") as events:
        assert status() == "done"
    assert seen == [1, 2, 3]
    assert clock.sleeps == [0.1, 0.2]
    assert [type(e.exc).__name__ for e in events] == ["ResultRejected"] * 2


async def test_on_result_in_an_async_node_raises_result_rejected_when_attempts_run_out() -> None:
    calls: list[int] = []

    @nk.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=3, on_result=lambda r: r is None))
    async def lookup() -> None:
        calls.append(1)
        return None

    with instant(), pytest.raises(nk.ResultRejected) as info:
        await lookup()
    assert len(calls) == 3
    assert info.value.attempts == 3
    assert info.value.result is None
    assert nk.classify(info.value) == "permanent"
    assert "gave up after 3 attempts" in "".join(info.value.__notes__)


def test_a_rejected_result_never_appears_in_the_message() -> None:
    @nk.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=1, on_result=lambda r: True))
    def secret() -> str:
        return "sk_live_4242"

    with pytest.raises(nk.ResultRejected) as info:
        secret()
    assert "sk_live_4242" not in str(info.value)
    assert info.value.result == "sk_live_4242"


def test_tenacity_retry_if_result_given_as_on_is_honoured() -> None:
    answers = iter([None, None, 7])

    @nk.node(
        effect=nk.Effect.READ,
        retry=nk.Retry(attempts=4, on=tenacity.retry_if_result(lambda r: r is None)),
    )
    def value() -> int | None:
        return next(answers)

    with instant() as clock:
        assert value() == 7
    assert len(clock.sleeps) == 2


def test_a_combined_tenacity_strategy_retries_errors_and_results() -> None:
    script: list[Any] = [ConnectionResetError("reset"), None, 3]

    def step() -> int | None:
        item = script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    on = tenacity.retry_if_exception_type(ConnectionResetError) | tenacity.retry_if_result(
        lambda r: r is None
    )
    node = nk.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=5, on=on))(step)
    with instant() as clock:
        assert node() == 3
    assert len(clock.sleeps) == 2


def test_tenacity_strategies_that_retry_every_result_are_refused_at_decoration() -> None:
    for strategy in (tenacity.retry_always, tenacity.retry_unless_exception_type(ValueError)):
        with pytest.raises(nk.ConfigError) as info:

            @nk.node(name="poll", retry=nk.Retry(on=strategy))
            def poll() -> None: ...

        assert info.value.option == "retry.on"
        assert "'poll'" in str(info.value)


def test_on_result_must_be_a_predicate() -> None:
    with pytest.raises(nk.ConfigError) as info:
        nk.node(name="n", retry=nk.Retry(on_result=ValueError))(lambda: None)
    assert info.value.option == "retry.on_result"


def test_a_keyed_node_whose_results_are_rejected_releases_its_key() -> None:
    calls: list[str] = []
    store = nk.MemoryStore()

    @nk.node(
        name="submit",
        retry=nk.Retry(attempts=2, on_result=lambda r: r == "queued"),
        idempotency=nk.Idempotency(key=lambda order: order, store=store),
    )
    def submit(order: str) -> str:
        calls.append(order)
        return "queued" if len(calls) <= 2 else "accepted"

    with instant(), pytest.raises(nk.ResultRejected):
        submit("o-1")
    assert submit("o-1") == "accepted"  # the key was released: the call runs again
    assert submit("o-1") == "accepted"  # and now replays
    assert calls == ["o-1"] * 3


# ---------------------------------------------------------------------------- nk.attempts


def run_block(block: Any, body: Any) -> list[int]:
    """Run `body(attempt)` inside each attempt of `block`; the attempt numbers seen."""
    numbers: list[int] = []
    for attempt in block:
        with attempt:
            numbers.append(attempt.number)
            body(attempt)
    return numbers


def refused(attempt: Any) -> None:
    raise ConnectionRefusedError("down")


@pytest.fixture
def api() -> Any:
    with LocalAPI(faults=FaultPlan(rate=0.0, retry_after=1)) as server:
        yield server


def test_an_attempts_block_retries_with_the_classifier_and_retry_after(api: LocalAPI) -> None:
    numbers: list[int] = []
    api.fail_next("503", "drop_after")
    with instant() as clock, capture_events() as events:
        for attempt in nk.attempts(name="fetch", effect=nk.Effect.READ, attempts=4, jitter=0):
            with attempt:
                numbers.append(attempt.number)
                response = httpx.get(f"{api.url}/status/200", timeout=5)
                response.raise_for_status()
    assert numbers == [1, 2, 3]
    assert response.status_code == 200
    assert clock.sleeps[0] == 1.0  # the 503's Retry-After
    retrying = events.named("node.retrying")
    assert [e.node for e in retrying] == ["fetch", "fetch"]
    assert [e["kind"] for e in retrying] == ["safe", "ambiguous"]


def test_a_write_block_refuses_to_retry_an_ambiguous_error(api: LocalAPI) -> None:
    api.fail_next("drop_after")
    numbers: list[int] = []

    def post(attempt: Any) -> None:
        numbers.append(attempt.number)
        httpx.post(f"{api.url}/status/201", timeout=5)

    with instant(), pytest.raises(nk.UnsafeRetry) as info:
        run_block(nk.attempts(name="charge"), post)
    assert numbers == [1]
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert sum(1 for e in api.ledger.entries if e.outcome == "processed") == 1


def test_a_permanent_error_in_a_block_is_raised_at_once_with_a_note() -> None:
    numbers: list[int] = []

    def missing(attempt: Any) -> None:
        numbers.append(attempt.number)
        raise KeyError("missing")

    with instant(), pytest.raises(KeyError) as info:
        run_block(nk.attempts(effect=nk.Effect.READ), missing)
    assert numbers == [1]
    assert "gave up after 1 attempt" in "".join(info.value.__notes__)


def test_a_block_gives_up_after_its_attempts_and_raises_the_last_error() -> None:
    numbers: list[int] = []

    def down(attempt: Any) -> None:
        numbers.append(attempt.number)
        refused(attempt)

    with instant() as clock, pytest.raises(ConnectionRefusedError):
        run_block(nk.attempts(nk.Retry(attempts=3, jitter=0)), down)
    assert numbers == [1, 2, 3]
    assert clock.sleeps == [0.1, 0.2]


async def test_an_async_attempts_block() -> None:
    numbers: list[int] = []
    async for attempt in nk.attempts(on=TimeoutError, attempts=3):
        with attempt:
            numbers.append(attempt.number)
            if attempt.number < 3:
                raise TimeoutError
    assert numbers == [1, 2, 3]


def test_a_block_stops_retrying_before_its_timeout() -> None:
    block = nk.attempts(effect=nk.Effect.READ, attempts=10, initial=2, max_wait=60, timeout=3)
    with instant() as clock, pytest.raises(ConnectionRefusedError) as info:
        run_block(block, refused)
    # instant() makes the waits zero, so the deadline is judged on the waits asked for
    assert clock.sleeps
    assert all(wait < 3 for wait in clock.sleeps)
    assert "deadline" in "".join(info.value.__notes__)


def test_block_options_are_checked() -> None:
    with pytest.raises(nk.ConfigError) as info:
        nk.attempts(name="b", attempts=0)
    assert info.value.option == "retry.attempts"
    with pytest.raises(nk.ConfigError):
        nk.attempts(nk.Retry(), attempts=2)
    with pytest.raises(nk.ConfigError) as info:
        nk.attempts(bogus=1)
    with pytest.raises(nk.ConfigError) as info:
        nk.attempts(on_result=lambda r: True)
    assert info.value.option == "retry.on_result"
    block = nk.attempts()
    for attempt in block:
        with attempt:
            pass
    with pytest.raises(nk.ConfigError):
        list(block)


# ---------------------------------------------------------------------------- the test switch


def test_set_testing_makes_one_attempt_and_no_waits() -> None:
    calls: list[int] = []

    @nk.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=5, initial=30, max_wait=60))
    def flaky() -> None:
        calls.append(1)
        raise ConnectionRefusedError("down")

    set_testing(True)
    try:
        with pytest.raises(ConnectionRefusedError) as info:
            flaky()
        assert "gave up after 1 attempt" in "".join(info.value.__notes__)
        numbers: list[int] = []

        def down(attempt: Any) -> None:
            numbers.append(attempt.number)
            refused(attempt)

        with pytest.raises(ConnectionRefusedError):
            run_block(nk.attempts(effect=nk.Effect.READ, attempts=5), down)
        assert numbers == [1]
    finally:
        set_testing(False)
    assert calls == [1]
    set_testing(True, attempts=2)
    try:
        calls.clear()
        with pytest.raises(ConnectionRefusedError):
            flaky()  # two attempts, the 30 s wait skipped
        assert calls == [1, 1]
    finally:
        set_testing(False)


PLUGIN_TEST = """
import pytest
import nodekit as nk

CALLS = []

@nk.node(retry=nk.Retry(attempts=5, initial=30, max_wait=60), effect=nk.Effect.READ)
def flaky():
    CALLS.append(1)
    raise ConnectionRefusedError("down")

@nk.node(name="charge", idempotency=nk.Idempotency(key=lambda order: order))
def charge(order, amount):
    CALLS.append(order)
    return amount

def test_one_attempt_no_wait():
    CALLS.clear()
    with pytest.raises(ConnectionRefusedError):
        flaky()
    assert CALLS == [1]

@pytest.mark.parametrize("amount", [10, 20])
def test_each_case_gets_a_fresh_default_store(amount):
    CALLS.clear()
    assert charge("o-1", amount) == amount   # no IdempotencyMismatch from the previous case
    assert CALLS == ["o-1"]
"""


def test_the_pytest_option_and_a_fresh_default_store_per_test(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(PLUGIN_TEST), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nodekit-testing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout
    assert run.stdout.count("slowest") == 0
