"""pytest plugin (entry point ``pytest11``): nodekit's test kit as fixtures.

Every test runs inside `fresh_state()`: a keyed node without a store gets a new default
`MemoryStore` per test, and the process-wide state a test changes is put back after it.
``--nodekit-testing`` (or ``nodekit_testing = true`` in the ini options) turns on the global
test switch for the session: one attempt per call, no waits (`set_testing`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import Events, Instant, capture_events, fresh_state, instant, set_testing


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nodekit")
    group.addoption(
        "--nodekit-testing",
        action="store_true",
        default=False,
        help="nodekit: one attempt per node call and no waits (nodekit.testing.set_testing)",
    )
    parser.addini(
        "nodekit_testing",
        "nodekit: one attempt per node call and no waits (nodekit.testing.set_testing)",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--nodekit-testing", default=False) or config.getini("nodekit_testing"):
        set_testing(True)


@pytest.fixture(autouse=True)
def _nodekit_fresh_state() -> Iterator[None]:
    """A fresh default store and runtime state for each test (see `fresh_state`)."""
    with fresh_state():
        yield


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
