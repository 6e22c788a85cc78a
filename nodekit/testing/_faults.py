"""`FaultPlan`: which requests a `LocalAPI` fails, and how — seeded, scripted, reproducible."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ._routes import matches as _matches

__all__ = ["FAULT_KINDS", "Fault", "FaultPlan"]

Fault: TypeAlias = Literal["503", "429", "slow", "drop_before", "drop_after"]
FAULT_KINDS: tuple[Fault, ...] = ("503", "429", "slow", "drop_before", "drop_after")
Script: TypeAlias = Sequence[Fault | None] | Mapping[str, Sequence[Fault | None]]


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Which requests fail, and how: a seeded random draw, after an optional script.

    Each request (control paths excepted) first takes the next entry of a matching `script`
    (a list for every request in order, or ``{"POST /charges": [...]}`` per route; ``None``
    means no fault); once the script is used up, it fails with probability `rate`, with a
    kind drawn from `kinds`, restricted to `routes` when given. The same seed and the same
    request order give the same faults. `retry_after` is the ``Retry-After`` (seconds) sent
    with 503 and 429; `slow` how long a slow answer is held back.
    """

    seed: int = 0
    rate: float = 0.2
    kinds: tuple[Fault, ...] = FAULT_KINDS
    script: Script = ()
    routes: tuple[str, ...] | None = None
    retry_after: float = 0.0
    slow: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"FaultPlan.rate must be within [0, 1], got {self.rate!r}")
        scripted = self.script.values() if isinstance(self.script, Mapping) else [self.script]
        for kind in [*self.kinds, *itertools.chain.from_iterable(scripted)]:
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r}; faults are {FAULT_KINDS}")

    @classmethod
    def scripted(cls, *faults: Fault | None, route: str | None = None, **options: Any) -> FaultPlan:
        """Exactly these faults, in order, and no random ones (``rate=0``)."""
        script: Script = {route: faults} if route is not None else faults
        return cls(rate=0.0, script=script, **options)


class _Faults:
    """A `FaultPlan`'s running state: the random generator and the script cursors."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.random = random.Random(plan.seed)
        self.lock = threading.Lock()
        script = plan.script
        self.queues: dict[str | None, list[Fault | None]] = (
            {route: list(items) for route, items in script.items()}
            if isinstance(script, Mapping)
            else {None: list(script)}
        )

    def next(self, method: str, path: str) -> Fault | None:
        plan = self.plan
        with self.lock:
            for route, queue in self.queues.items():
                if queue and (route is None or _matches(route, method, path)):
                    return queue.pop(0)
            if plan.routes is not None and not any(
                _matches(route, method, path) for route in plan.routes
            ):
                return None
            if plan.rate and plan.kinds and self.random.random() < plan.rate:
                return self.random.choice(plan.kinds)
            return None
