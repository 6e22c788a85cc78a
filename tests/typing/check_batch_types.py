"""Types of a batch node (`@nk.node(batch=nk.Batch(...))`): checked by ``mypy --strict``,
never run.

The function takes ``list[T]`` and returns ``list[R]``; the node is called with one `T` and
awaited for one `R`. Each `assert_type` fails the type check if that mapping is lost.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

import nodekit as nk


@nk.node(name="send", batch=nk.Batch(max_size=100, max_wait=0.01))
async def send(items: list[int]) -> list[str]:
    keys = nk.context().batch_keys
    assert_type(keys, tuple[str | None, ...] | None)
    return [str(i) for i in items]


async def use() -> None:
    call: Coroutine[Any, Any, str] = send(1)
    assert_type(await call, str)
    await send("one")  # type: ignore[arg-type]
