"""mypy --strict checks of the retry API: `Retry(on_result=)`, `nk.attempts`, `ResultRejected`.

Not run by pytest: `make test` type-checks this file (see `[tool.mypy] files`).
"""

from __future__ import annotations

import nodekit as nk
from nodekit.testing import fresh_state, set_testing


@nk.node(effect=nk.Effect.READ, retry=nk.Retry(attempts=5, on_result=lambda s: s == "pending"))
def job_status(job: str) -> str:
    return job


def poll() -> str:
    status: str = job_status("j-1")
    return status


def block() -> int:
    total = 0
    for attempt in nk.attempts(effect=nk.Effect.READ, attempts=3, on=ConnectionError):
        with attempt:
            total += attempt.number
    return total


async def ablock() -> int:
    async for attempt in nk.attempts(nk.Retry(attempts=2), name="fetch", timeout=5):
        with attempt:
            return attempt.number
    return 0


def rejected(error: nk.ResultRejected) -> object:
    attempts: int = error.attempts
    return error.result if attempts else None


def switch() -> None:
    set_testing(True, attempts=1)
    with fresh_state():
        set_testing(False)
