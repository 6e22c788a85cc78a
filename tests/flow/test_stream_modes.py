"""Stream modes (`events`, `updates`, `values`), progress events (`nk.context().emit`), and a
sync stream that yields each event as it happens (the flow runs in a worker thread).

Liveness is proven without sleeps: a node reports progress (or starts), then waits on an event
that only the consumer of the stream sets, once it has received that progress (or start); a
stream that delivered late would leave the node waiting until its bounded wait ran out, and the
node reports whether the gate opened.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from pydantic import BaseModel

import nodekit as nk
from nodekit.idempotency.sqlite import SQLiteStore
from nodekit.testing import capture_events

GATE_WAIT = 10.0  # the longest a node waits for the consumer (only reached on a regression)


def chain() -> nk.Flow[dict[str, Any]]:
    flow = nk.Flow("chain")

    @flow.node
    def a(x: int) -> dict[str, int]:
        return {"a": x + 1}

    @flow.node(after=a)
    async def b(a: int) -> dict[str, int]:
        return {"b": a * 10}

    @flow.node(after=b)
    def c() -> None:
        return None

    return flow


def stream_threads(run_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"nodekit-stream-{run_id}"]


# ---------------------------------------------------------------------------- updates, values


def test_updates_stream_yields_each_nodes_update_values() -> None:
    updates = list(chain().stream({"x": 1}, mode="updates"))
    assert updates == [{"a": {"a": 2}}, {"b": {"b": 20}}, {"c": {}}]


async def test_updates_astream_yields_each_nodes_update_values() -> None:
    updates = [u async for u in chain().astream({"x": 1}, mode="updates")]
    assert updates == [{"a": {"a": 2}}, {"b": {"b": 20}}, {"c": {}}]


def test_values_stream_yields_the_state_after_each_node() -> None:
    flow = chain()
    states = list(flow.stream({"x": 1}, mode="values"))
    assert states == [{"x": 1, "a": 2}, {"x": 1, "a": 2, "b": 20}, {"x": 1, "a": 2, "b": 20}]
    assert states[-1] == flow.run({"x": 1})


async def test_values_astream_yields_the_state_after_each_node() -> None:
    states = [s async for s in chain().astream({"x": 1}, mode="values")]
    assert states == [{"x": 1, "a": 2}, {"x": 1, "a": 2, "b": 20}, {"x": 1, "a": 2, "b": 20}]


def test_values_are_copies_the_consumer_may_change() -> None:
    flow = chain()
    seen = []
    for state in flow.stream({"x": 1}, mode="values"):
        seen.append(dict(state))
        state["a"] = -1  # the run keeps its own state
    assert seen[1] == {"x": 1, "a": 2, "b": 20}


class Order(BaseModel):
    qty: int = 1
    price: float = 0.0
    total: float | None = None


def test_values_of_a_model_state_are_models() -> None:
    flow = nk.Flow("priced", Order)

    @flow.node
    def price() -> dict[str, float]:
        return {"price": 2.5}

    @flow.node(after=price)
    def total(qty: int, price: float) -> dict[str, float]:
        return {"total": qty * price}

    states = list(flow.stream(Order(qty=4), mode="values"))
    assert states == [Order(qty=4, price=2.5), Order(qty=4, price=2.5, total=10.0)]
    assert all(type(state) is Order for state in states)
    updates = list(flow.stream(Order(qty=4), mode="updates"))
    assert updates == [{"price": {"price": 2.5}}, {"total": {"total": 10.0}}]


class Tally(TypedDict, total=False):
    seen: Annotated[list[str], lambda old, new: old + new]


async def test_values_end_with_the_final_state_when_reducers_fold_again() -> None:
    # parallel nodes finishing out of canonical order: the final state is folded again, and
    # the values stream's last item is that final state
    flow = nk.Flow("tally", Tally)
    first_gate = asyncio.Event()

    @flow.node
    async def first() -> dict[str, list[str]]:
        await asyncio.wait_for(first_gate.wait(), GATE_WAIT)
        return {"seen": ["first"]}

    @flow.node
    async def second() -> dict[str, list[str]]:
        first_gate.set()  # `first` (earlier in canonical order) finishes after this one
        return {"seen": ["second"]}

    states = [s async for s in flow.astream({"seen": []}, mode="values")]
    assert states[-2:] == [{"seen": ["second", "first"]}, {"seen": ["first", "second"]}]
    assert states[-1] == await flow.arun({"seen": []})


def test_a_failed_run_raises_after_the_updates_it_made() -> None:
    flow = nk.Flow("fails")
    flow.add(lambda: {"a": 1}, name="a")
    flow.add(lambda a: 1 / 0, name="b", after="a")
    got: list[Any] = []

    def consume() -> None:
        for update in flow.stream({}, mode="updates"):
            got.append(update)

    with pytest.raises(nk.FlowError) as info:
        consume()
    assert info.value.failed == "b"
    assert got == [{"a": {"a": 1}}]


def test_a_resumed_runs_updates_include_the_replayed_nodes(tmp_path: Path) -> None:
    calls: list[str] = []
    flow = nk.Flow("resumable")

    @flow.node
    def load(x: int) -> dict[str, int]:
        calls.append("load")
        return {"rows": x * 3}

    @flow.node(after=load)
    def save(rows: int) -> dict[str, bool]:
        calls.append("save")
        if len(calls) == 2:
            raise ConnectionError("down")
        return {"saved": True}

    store = SQLiteStore(tmp_path / "journal.db")
    try:
        with pytest.raises(nk.FlowError):
            flow.run({"x": 2}, run_id="r1", store=store)
        updates = list(flow.stream({"x": 2}, mode="updates", run_id="r1", store=store))
    finally:
        store.close()
    assert updates == [{"load": {"rows": 6}}, {"save": {"saved": True}}]
    assert calls == ["load", "save", "save"]  # load replayed from the journal


def test_a_bad_mode_is_a_config_error_at_the_call() -> None:
    flow = chain()
    with pytest.raises(nk.ConfigError, match="mode") as info:
        flow.stream({"x": 1}, mode="state")  # type: ignore[call-overload]
    assert info.value.option == "mode"
    with pytest.raises(nk.ConfigError, match=r"'chain'.*'events', 'updates' or 'values'") as info:
        flow.astream({"x": 1}, mode="value")  # type: ignore[call-overload]
    assert info.value.option == "mode"


def test_events_carry_the_values_in_process_never_in_logs() -> None:
    flow = chain()
    events = [e for e in flow.stream({"x": 1}) if e.name == "flow.node_finished"]
    assert [(e.node, e["update"], e["updated"]) for e in events] == [
        ("a", {"a": 2}, ("a",)),
        ("b", {"b": 20}, ("b",)),
        ("c", None, ()),
    ]
    assert events[1]["state"] == {"x": 1, "a": 2, "b": 20}
    logged = events[1].as_dict()
    assert "update" not in logged
    assert "state" not in logged
    assert logged["updated"] == ("b",)


def test_a_nested_runs_events_are_streamed_but_not_its_state() -> None:
    inner = nk.Flow("inner")
    inner.add(lambda: {"deep": 1}, name="x")
    outer = nk.Flow("outer")

    @outer.node
    def call_inner() -> dict[str, int]:
        inner.run({}, run_id=f"{nk.context().run_id}/call_inner")  # a subflow's child run id
        unrelated = nk.Flow("unrelated")
        unrelated.add(lambda: None, name="y")
        unrelated.run({}, run_id="elsewhere")
        return {"top": 1}

    events = [(e.name, e.node, e.run_id) for e in outer.stream({}, run_id="o1")]
    assert ("flow.node_finished", "x", "o1/call_inner") in events
    assert {run_id for _, _, run_id in events} == {"o1", "o1/call_inner"}
    assert list(outer.stream({}, run_id="o2", mode="updates")) == [{"call_inner": {"top": 1}}]
    assert list(outer.stream({}, run_id="o3", mode="values")) == [{"top": 1}]


# ---------------------------------------------------------------------------- liveness


def test_sync_stream_yields_node_started_while_the_node_runs() -> None:
    gate = threading.Event()
    flow = nk.Flow("live-start")

    @flow.node
    def slow() -> dict[str, bool]:
        return {"opened": gate.wait(GATE_WAIT)}

    final = None
    for event in flow.stream({}):
        if event.name == "flow.node_started" and event.node == "slow":
            gate.set()  # only the consumer lets the node end
        if event.name == "flow.finished":
            final = event["state"]
    assert final == {"opened": True}


def test_progress_arrives_on_a_sync_stream_while_the_node_runs() -> None:
    gate = threading.Event()
    flow = nk.Flow("live-progress")

    @flow.node
    def download() -> dict[str, bool]:
        nk.context().emit("download.chunk", done=1, total=3)
        return {"opened": gate.wait(GATE_WAIT)}

    progress = []
    final = None
    for event in flow.stream({}, run_id="lp-1"):
        if event.name == "node.progress":
            progress.append(event)
            gate.set()
        if event.name == "flow.finished":
            final = event["state"]
    assert final == {"opened": True}
    [event] = progress
    assert (event.node, event.run_id, event.attempt) == ("download", "lp-1", 1)
    assert dict(event.fields) == {"progress": "download.chunk", "done": 1, "total": 3}


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_progress_arrives_on_an_async_stream_while_the_node_runs(kind: str) -> None:
    flow = nk.Flow("alive")
    async_gate = asyncio.Event()
    thread_gate = threading.Event()

    if kind == "async":

        @flow.node(name="work")
        async def work_async() -> dict[str, bool]:
            nk.context().emit("step", n=1)
            try:
                await asyncio.wait_for(async_gate.wait(), GATE_WAIT)
            except TimeoutError:
                return {"opened": False}
            return {"opened": True}

    else:

        @flow.node(name="work")
        def work_sync() -> dict[str, bool]:  # runs in a worker thread under arun
            nk.context().emit("step", n=1)
            return {"opened": thread_gate.wait(GATE_WAIT)}

    final = None
    async for event in flow.astream({}):
        if event.name == "node.progress":
            assert (event.node, event["progress"], event["n"]) == ("work", "step", 1)
            async_gate.set()
            thread_gate.set()
        if event.name == "flow.finished":
            final = event["state"]
    assert final == {"opened": True}


def test_closing_a_sync_stream_early_starts_no_other_node_and_ends_its_thread() -> None:
    gate = threading.Event()
    ran: list[str] = []
    closed: list[str] = []
    flow = nk.Flow("early-close", resources={"conn": lambda: _Conn(closed)})

    @flow.node
    def first(conn: Any) -> None:
        ran.append("first")
        gate.wait(GATE_WAIT)

    @flow.node(after=first)
    def second(conn: Any) -> None:
        ran.append("second")

    events = flow.stream({}, run_id="early-1")
    for event in events:
        if event.name == "flow.node_started" and event.node == "first":
            assert stream_threads("early-1")  # the run is in its worker thread
            break
    gate.set()
    events.close()
    for thread in stream_threads("early-1"):
        thread.join(5.0)
    assert not stream_threads("early-1")
    assert ran == ["first"]
    assert closed == ["closed"]  # the run's resources were closed


def test_a_sync_stream_dropped_unclosed_does_not_leave_its_thread_blocked() -> None:
    flow = chain()
    events = flow.stream({"x": 1}, run_id="dropped-1")
    assert next(events).name == "flow.started"
    del events  # the generator is closed when collected
    for thread in stream_threads("dropped-1"):
        thread.join(5.0)
    assert not stream_threads("dropped-1")


def test_a_sync_stream_runs_in_a_copy_of_the_callers_context() -> None:
    flow = nk.Flow("uses")

    @flow.node
    def read(*, conn: Any = nk.resource()) -> dict[str, Any]:
        return {"got": conn, "thread": threading.current_thread().name}

    with nk.use(conn="the-connection"):
        [state] = flow.stream({}, mode="values", run_id="ctx-1")
    assert state == {"got": "the-connection", "thread": "nodekit-stream-ctx-1"}


def test_a_sqlite_connection_from_the_callers_thread_fails_with_a_note_on_why() -> None:
    flow = nk.Flow("thread-bound")

    @flow.node
    def count(*, db: Any = nk.resource()) -> dict[str, int]:
        return {"n": db.execute("select 1").fetchone()[0]}

    db = sqlite3.connect(":memory:")
    try:
        with nk.use(db=db):
            assert flow.run({}) == {"n": 1}  # flow.run runs its nodes in this thread
            with pytest.raises(nk.FlowError) as info:
                list(flow.stream({}))
    finally:
        db.close()
    assert isinstance(info.value.__cause__, sqlite3.ProgrammingError)
    assert any("flow.stream runs the flow in a worker thread" in n for n in info.value.__notes__)


# ---------------------------------------------------------------------------- emit


def test_emit_outside_a_node_is_an_error() -> None:
    with pytest.raises(nk.NodekitError, match="only available while a node runs"):
        nk.context().emit("nothing")
    kept: list[nk.NodeContext] = []

    @nk.node
    def keep() -> None:
        kept.append(nk.context())

    keep()
    with pytest.raises(nk.NodekitError, match=r"emit\('late'\) was called outside a running node"):
        kept[0].emit("late", n=1)


def test_emit_rejects_a_bad_name_or_a_field_the_event_uses() -> None:
    @nk.node
    def bad_field() -> None:
        nk.context().emit("step", node="x")

    @nk.node
    def bad_name() -> None:
        nk.context().emit("")

    with pytest.raises(nk.ConfigError, match=r"field\(s\) \['node'\]") as info:
        bad_field()
    assert info.value.option == "node"
    with pytest.raises(nk.ConfigError, match="non-empty event name"):
        bad_name()


def test_progress_reaches_every_sink_and_the_log_redacted(caplog: pytest.LogCaptureFixture) -> None:
    flow = nk.Flow("secretive")

    @flow.node
    def connect() -> None:
        nk.context().emit(
            "connect",
            password="hunter2",
            db_password="hunter2",
            note="retrying with password=hunter2",
            url="https://api.example/v1?api_key=hunter2&page=2",
            hosts=["db1", {"token": "hunter2"}],
            tokens_used=3,
            account="acct_12345",
        )

    nk.add_redactor(lambda text: text.replace("acct_12345", "acct_***"))

    with capture_events(prefix="node.progress") as events, caplog.at_level(logging.INFO, "nodekit"):
        flow.run({})  # no stream: the sinks and the log still see it
    [event] = events
    assert dict(event.fields) == {
        "progress": "connect",
        "password": "***",
        "db_password": "***",
        "note": "retrying with password=***",
        "url": "https://api.example/v1?api_key=***&page=2",
        "hosts": ["db1", {"token": "***"}],
        "tokens_used": 3,
        "account": "acct_***",
    }
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("node.progress")]
    assert len(lines) == 1
    assert "progress=connect" in lines[0]
    assert "hunter2" not in lines[0]


def test_emit_builds_nothing_when_nobody_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    import nodekit._context as context_module

    redacted: list[Any] = []

    def spy(fields: Any) -> Any:
        redacted.append(fields)
        return dict(fields)

    monkeypatch.setattr(context_module, "redact_fields", spy)
    logger = logging.getLogger("nodekit")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:

        @nk.node
        def quiet() -> None:
            nk.context().emit("step", n=1)

        quiet()
        assert redacted == []
        with capture_events():
            quiet()
        assert redacted == [{"n": 1}]
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------- helpers


class _Conn:
    def __init__(self, closed: list[str]) -> None:
        self.closed = closed

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.append("closed")


# ---------------------------------------------------------------------------- typed


def test_a_flow_subscripted_with_its_state_type_runs() -> None:
    flow = nk.Flow[Order]("typed", Order)
    flow.add(lambda qty: {"total": qty * 2.0}, name="total")
    assert isinstance(flow, nk.Flow)
    out = flow.run(Order(qty=3))
    assert type(out) is Order
    assert out.total == 6.0
