"""The node context (`nk.context()`) and resources injected with `use` / `override`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

import nodekit as nk
from nodekit.testing import Flaky, capture_events, instant

# ---------------------------------------------------------------------------- context


def test_context_outside_a_node_raises() -> None:
    with pytest.raises(nk.NodekitError, match="only available while a node runs"):
        nk.context()


def test_context_describes_the_running_node() -> None:
    @nk.node(name="fetch")
    def fetch() -> nk.NodeContext:
        return nk.context()

    ctx = fetch()
    assert ctx.node == "fetch"
    assert ctx.attempt == 1
    assert isinstance(ctx.run_id, str)
    assert ctx.run_id
    assert ctx.deadline is None
    assert ctx.remaining() is None
    assert ctx.replayed is False
    assert ctx.idempotency_key is None


async def test_context_describes_the_running_node_async() -> None:
    @nk.node(name="fetch")
    async def fetch() -> nk.NodeContext:
        return nk.context()

    ctx = await fetch()
    assert ctx.node == "fetch"
    assert ctx.attempt == 1
    assert ctx.remaining() is None


def test_each_call_has_its_own_run_id_and_the_context_is_reset_after() -> None:
    @nk.node
    def run_id() -> str:
        return nk.context().run_id

    assert run_id() != run_id()
    with pytest.raises(nk.NodekitError):
        nk.context()


def test_attempt_counts_up_across_retries() -> None:
    attempts: list[int] = []

    @nk.node(retry=nk.Retry(attempts=3), effect=nk.Effect.READ)
    def flaky() -> str:
        attempts.append(nk.context().attempt)
        if len(attempts) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    with instant():
        assert flaky() == "ok"
    assert attempts == [1, 2, 3]


async def test_attempt_counts_up_across_retries_async() -> None:
    attempts: list[int] = []

    @nk.node(retry=nk.Retry(attempts=3), effect=nk.Effect.READ)
    async def flaky() -> str:
        attempts.append(nk.context().attempt)
        if len(attempts) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    with instant():
        assert await flaky() == "ok"
    assert attempts == [1, 2, 3]


def test_attempt_counts_up_in_a_timeout_thread_and_when_observed() -> None:
    attempts: list[tuple[int, str]] = []

    @nk.node(retry=nk.Retry(attempts=3), timeout=1, effect=nk.Effect.READ)
    def flaky() -> None:
        attempts.append((nk.context().attempt, threading.current_thread().name))
        raise ConnectionResetError("reset")

    with instant(), capture_events(), pytest.raises(ConnectionResetError):
        flaky()
    assert [attempt for attempt, _ in attempts] == [1, 2, 3]
    assert all(name.startswith("nodekit:") for _, name in attempts)


def test_remaining_counts_down_from_the_total_timeout() -> None:
    @nk.node(timeout=nk.Timeout(total=2))
    def timed() -> tuple[float | None, float | None]:
        ctx = nk.context()
        return ctx.remaining(), ctx.deadline

    before = time.monotonic()
    remaining, deadline = timed()
    assert remaining is not None
    assert deadline is not None
    assert 1.5 < remaining <= 2
    assert before + 2 <= deadline <= time.monotonic() + 2


async def test_remaining_counts_down_from_the_total_timeout_async() -> None:
    @nk.node(timeout=nk.Timeout(total=2))
    async def timed() -> float | None:
        return nk.context().remaining()

    remaining = await timed()
    assert remaining is not None
    assert 1.5 < remaining <= 2


def test_remaining_includes_the_attempt_timeout() -> None:
    """An integration passing remaining() down must see the per-attempt budget too."""

    @nk.node(timeout=0.5)
    def timed() -> float | None:
        return nk.context().remaining()

    remaining = timed()
    assert remaining is not None
    assert 0.3 < remaining <= 0.5


async def test_remaining_includes_the_attempt_timeout_async() -> None:
    @nk.node(timeout=0.5)
    async def timed() -> float | None:
        return nk.context().remaining()

    remaining = await timed()
    assert remaining is not None
    assert 0.3 < remaining <= 0.5


def test_nested_node_inherits_the_parent_deadline_and_run_id() -> None:
    @nk.node
    def child() -> tuple[float | None, str, str]:
        ctx = nk.context()
        return ctx.deadline, ctx.run_id, ctx.node

    @nk.node(timeout=nk.Timeout(total=1), name="parent")
    def parent() -> tuple[float | None, str, tuple[float | None, str, str]]:
        ctx = nk.context()
        return ctx.deadline, ctx.run_id, child()

    deadline, run_id, (child_deadline, child_run_id, child_name) = parent()
    assert deadline is not None
    assert child_deadline == deadline
    assert child_run_id == run_id
    assert child_name.endswith("child")


async def test_nested_node_inherits_the_parent_deadline_and_run_id_async() -> None:
    @nk.node
    async def child() -> tuple[float | None, str]:
        ctx = nk.context()
        return ctx.deadline, ctx.run_id

    @nk.node(timeout=nk.Timeout(total=1))
    async def parent() -> tuple[float | None, str, tuple[float | None, str]]:
        ctx = nk.context()
        return ctx.deadline, ctx.run_id, await child()

    deadline, run_id, (child_deadline, child_run_id) = await parent()
    assert deadline is not None
    assert child_deadline == deadline
    assert child_run_id == run_id


def test_nested_node_keeps_the_earlier_of_its_own_and_the_parent_deadline() -> None:
    @nk.node(timeout=nk.Timeout(total=10))
    def longer() -> float | None:
        return nk.context().deadline

    @nk.node(timeout=nk.Timeout(total=0.5))
    def shorter() -> float | None:
        return nk.context().deadline

    @nk.node(timeout=nk.Timeout(total=1))
    def parent() -> tuple[float | None, float | None, float | None]:
        return nk.context().deadline, longer(), shorter()

    own, from_longer, from_shorter = parent()
    assert own is not None
    assert from_longer == own
    assert from_shorter is not None
    assert from_shorter < own


async def test_nested_node_keeps_the_earlier_deadline_async() -> None:
    @nk.node(timeout=nk.Timeout(total=10))
    async def longer() -> float | None:
        return nk.context().deadline

    @nk.node(timeout=nk.Timeout(total=1))
    async def parent() -> tuple[float | None, float | None]:
        return nk.context().deadline, await longer()

    own, from_longer = await parent()
    assert own is not None
    assert from_longer == own


# ---------------------------------------------------------------------------- resources


class Client:
    """A stand-in for an HTTP client."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@nk.node
def fetch(url: str, *, http: Any = nk.resource()) -> str:
    return f"{http.name}:{url}"


@nk.node
async def afetch(url: str, *, http: Any = nk.resource()) -> str:
    await asyncio.sleep(0)
    return f"{http.name}:{url}"


def test_resource_is_injected_from_use() -> None:
    with nk.use(http=Client("real")):
        assert fetch("/a") == "real:/a"


async def test_resource_is_injected_from_use_async() -> None:
    with nk.use(http=Client("real")):
        assert await afetch("/a") == "real:/a"
    async with nk.use(http=Client("real")):
        assert await afetch("/b") == "real:/b"


def test_override_wins_over_use_whatever_the_order() -> None:
    with nk.override(http=Client("fake")), nk.use(http=Client("real")):
        assert fetch("/a") == "fake:/a"
    with nk.use(http=Client("real")), nk.override(http=Client("fake")):
        assert fetch("/a") == "fake:/a"


async def test_override_wins_over_use_async() -> None:
    with nk.use(http=Client("real")), nk.override(http=Client("fake")):
        assert await afetch("/a") == "fake:/a"


def test_explicit_argument_wins_over_use_and_override() -> None:
    with nk.use(http=Client("real")), nk.override(http=Client("fake")):
        assert fetch("/a", http=Client("mine")) == "mine:/a"


async def test_explicit_argument_wins_over_use_and_override_async() -> None:
    with nk.use(http=Client("real")), nk.override(http=Client("fake")):
        assert await afetch("/a", http=Client("mine")) == "mine:/a"


def test_inner_use_shadows_outer_use_until_it_exits() -> None:
    with nk.use(http=Client("outer")):
        with nk.use(http=Client("inner")):
            assert fetch("/a") == "inner:/a"
        assert fetch("/a") == "outer:/a"


def test_resource_may_be_named_differently_from_its_parameter() -> None:
    @nk.node
    def query(*, conn: Any = nk.resource("db")) -> str:
        return str(conn.name)

    with nk.use(db=Client("pg")):
        assert query() == "pg"


def test_missing_resource_is_a_config_error_and_nothing_runs() -> None:
    calls: list[int] = []

    @nk.node(retry=nk.Retry(attempts=5), name="fetch_missing")
    def fetch_missing(*, http: Any = nk.resource()) -> None:
        calls.append(1)

    with instant() as clock, pytest.raises(nk.ConfigError) as info:
        fetch_missing()
    assert calls == []
    assert clock.sleeps == []
    assert info.value.option == "http"
    assert info.value.node == "fetch_missing"
    assert "'http' is not provided" in str(info.value)


async def test_missing_resource_is_a_config_error_and_nothing_runs_async() -> None:
    calls: list[int] = []

    @nk.node(retry=nk.Retry(attempts=5), name="fetch_missing")
    async def fetch_missing(*, http: Any = nk.resource()) -> None:
        calls.append(1)

    with instant() as clock, pytest.raises(nk.ConfigError) as info:
        await fetch_missing()
    assert calls == []
    assert clock.sleeps == []
    assert info.value.option == "http"


def test_resources_reach_a_sync_node_in_its_timeout_thread() -> None:
    @nk.node(timeout=1)
    def threaded(*, http: Any = nk.resource()) -> tuple[str, str]:
        return http.name, threading.current_thread().name

    with nk.use(http=Client("real")):
        name, thread = threaded()
    assert name == "real"
    assert thread.startswith("nodekit:")


def test_nodes_called_inside_a_timeout_thread_see_the_resources() -> None:
    @nk.node(timeout=1)
    def outer() -> str:
        return fetch("/nested")

    with nk.use(http=Client("real")):
        assert outer() == "real:/nested"


async def test_resources_reach_async_nodes_in_tasks() -> None:
    async with nk.use(http=Client("real")):
        results = await asyncio.gather(*(afetch(f"/{n}") for n in range(3)))
        task = asyncio.create_task(afetch("/task"))
        assert await task == "real:/task"
    assert results == ["real:/0", "real:/1", "real:/2"]


async def test_resources_reach_sync_nodes_in_to_thread() -> None:
    with nk.use(http=Client("real")):
        assert await asyncio.to_thread(fetch, "/t") == "real:/t"


def test_managed_resource_is_entered_on_first_use_and_closed_at_exit() -> None:
    made: list[Client] = []

    def factory() -> Client:
        made.append(Client("managed"))
        return made[-1]

    with nk.use(http=nk.managed(factory)):
        assert made == []
        assert fetch("/a") == "managed:/a"
        assert fetch("/b") == "managed:/b"
        assert len(made) == 1
        assert not made[0].closed
    assert made[0].closed


def test_unused_managed_resource_is_never_created() -> None:
    made: list[int] = []

    @contextmanager
    def factory() -> Iterator[Client]:
        made.append(1)
        yield Client("x")

    with nk.use(http=nk.managed(factory)):
        pass
    assert made == []


def test_managed_resource_is_closed_when_the_block_raises() -> None:
    seen: list[str] = []

    @contextmanager
    def factory() -> Iterator[Client]:
        seen.append("enter")
        try:
            yield Client("managed")
        finally:
            seen.append("exit")

    def fail_inside() -> None:
        with nk.use(http=nk.managed(factory)):
            fetch("/a")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert seen == ["enter", "exit"]


async def test_async_managed_resource_is_entered_once_and_closed_at_exit() -> None:
    seen: list[str] = []

    @asynccontextmanager
    async def factory() -> AsyncIterator[Client]:
        seen.append("enter")
        try:
            yield Client("amanaged")
        finally:
            seen.append("exit")

    async with nk.use(http=nk.managed(factory)):
        assert seen == []
        assert await afetch("/a") == "amanaged:/a"
        assert await afetch("/b") == "amanaged:/b"
        assert seen == ["enter"]
    assert seen == ["enter", "exit"]


async def test_async_managed_resource_is_closed_when_the_block_raises() -> None:
    seen: list[str] = []

    @asynccontextmanager
    async def factory() -> AsyncIterator[Client]:
        seen.append("enter")
        try:
            yield Client("amanaged")
        finally:
            seen.append("exit")

    async def fail_inside() -> None:
        async with nk.use(http=nk.managed(factory)):
            await afetch("/a")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert seen == ["enter", "exit"]


async def test_sync_managed_resource_works_for_async_nodes() -> None:
    made: list[Client] = []

    def factory() -> Client:
        made.append(Client("sync-managed"))
        return made[-1]

    async with nk.use(http=nk.managed(factory)):
        assert await afetch("/a") == "sync-managed:/a"
        assert await afetch("/b") == "sync-managed:/b"
    assert len(made) == 1
    assert made[0].closed


async def test_async_managed_resource_needs_async_with() -> None:
    @asynccontextmanager
    async def factory() -> AsyncIterator[Client]:
        yield Client("x")

    with nk.use(http=nk.managed(factory)), pytest.raises(nk.ConfigError, match="async with"):
        await afetch("/a")


def test_plain_values_are_never_closed() -> None:
    client = Client("plain")
    with nk.use(http=client):
        fetch("/a")
    assert not client.closed
    with pytest.raises(RuntimeError, match="boom"), nk.use(http=client):
        raise RuntimeError("boom")
    assert not client.closed


def test_use_gives_access_to_the_provided_values() -> None:
    made: list[int] = []

    def factory() -> Client:
        made.append(1)
        return Client("managed")

    with nk.use(http=nk.managed(factory), other=Client("plain")) as provided:
        assert provided["other"].name == "plain"
        assert provided["http"].name == "managed"
        assert fetch("/a") == "managed:/a"
    assert made == [1]


def test_managed_requires_a_factory() -> None:
    with pytest.raises(nk.ConfigError, match="factory"):
        nk.managed(Client("not a factory"))  # type: ignore[arg-type]


def test_resources_are_checked_before_each_retry_free_call() -> None:
    flaky = Flaky([ConnectionRefusedError], result="ok")

    @nk.node(retry=nk.Retry(attempts=2))
    def call(*, http: Any = nk.resource()) -> str:
        return f"{flaky()}:{http.name}"

    with instant(), nk.use(http=Client("real")):
        assert call() == "ok:real"
    assert flaky.calls == 2
