"""pytest plugin (entry point ``pytest11``): nodekit's test kit as fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import Events, Instant, capture_events, instant


@pytest.fixture
def nk_instant() -> Iterator[Instant]:
    """nodekit's waits are zero in this test; the requested waits are in `.sleeps`."""
    with instant() as handle:
        yield handle


@pytest.fixture
def nk_events() -> Iterator[Events]:
    """Every nodekit event emitted during this test, in order."""
    with capture_events() as events:
        yield events
