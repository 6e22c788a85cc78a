"""`Flow[State]`: a flow's state type reaches `run`, `arun` and the streams. Checked by
``mypy --strict`` (``make typecheck``), never run.

Each `assert_type` fails the type check if the flow lost its state type; each
``# type: ignore[...]`` marks a line that must stay a type error (``warn_unused_ignores``,
part of ``--strict``, fails the check once it is not one).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any, TypedDict, assert_type

from pydantic import BaseModel

import nodekit as nk
from nodekit.flow import Flow


class OrderState(TypedDict, total=False):
    order_id: str
    total: float


class Invoice(BaseModel):
    number: int = 0
    paid: bool = False


def check_the_state_type_is_inferred() -> None:
    orders = nk.Flow("orders", OrderState)
    assert_type(orders, nk.Flow[OrderState])
    assert_type(orders.run({"order_id": "o-1"}), OrderState)
    invoices = Flow("invoices", Invoice)
    assert_type(invoices, Flow[Invoice])
    assert_type(invoices.run(Invoice(number=3)), Invoice)
    assert_type(invoices.run({"number": 3}), Invoice)
    untyped = nk.Flow("plain")
    assert_type(untyped, nk.Flow[dict[str, Any]])
    assert_type(untyped.run({"x": 1}), dict[str, Any])


def check_the_state_type_is_given() -> None:
    orders = nk.Flow[OrderState]("orders", OrderState)
    state: OrderState = orders.run()
    total: float = orders.run({"order_id": "o-1"})["total"]
    assert_type(state, OrderState)
    assert_type(total, float)


async def check_arun() -> None:
    invoices = nk.Flow("invoices", Invoice)
    assert_type(await invoices.arun(), Invoice)
    paid: bool = (await invoices.arun(Invoice())).paid
    assert_type(paid, bool)


def check_streams() -> None:
    invoices = nk.Flow("invoices", Invoice)
    assert_type(invoices.stream(), Generator[nk.Event, None, None])
    assert_type(invoices.stream(mode="events"), Generator[nk.Event, None, None])
    assert_type(
        invoices.stream(Invoice(), mode="updates"), Generator[dict[str, dict[str, Any]], None, None]
    )
    assert_type(invoices.stream(mode="values"), Generator[Invoice, None, None])
    for state in invoices.stream(mode="values"):
        assert_type(state.number, int)
    assert_type(invoices.astream(), AsyncGenerator[nk.Event, None])
    assert_type(invoices.astream(mode="values"), AsyncGenerator[Invoice, None])
    assert_type(invoices.astream(mode="updates"), AsyncGenerator[dict[str, dict[str, Any]], None])


def check_wrong_uses_are_errors() -> None:
    invoices = nk.Flow("invoices", Invoice)
    count: int = invoices.run()  # type: ignore[assignment]
    orders = nk.Flow("orders", OrderState)
    wrong: Invoice = orders.run()  # type: ignore[assignment]
    orders.run(Invoice())  # type: ignore[arg-type]
    invoices.stream(mode="state")  # type: ignore[call-overload]
    nk.Flow[Invoice]("invoices", OrderState)  # type: ignore[arg-type]
    del count, wrong


def check_progress_is_typed() -> None:
    ctx = nk.context()
    assert_type(ctx.emit("rows", done=1, total=3), None)
