"""Real servers for the integration tests: the demo shop's fault-injecting `DemoAPI`, httpbin.

Effects are counted from the servers' ledgers, never from counters in the test process, and
nodekit's waits are instant (`nodekit.testing.instant`), so no test sleeps through backoff.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import nodekit as nk
from nodekit.testing import FaultPlan, Instant, instant
from recipes._demo_api import DemoAPI


@pytest.fixture
def waits() -> Iterator[Instant]:
    """nodekit's waits are zero; the waits it asked for are in `.sleeps`."""
    with instant() as handle:
        yield handle


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    """A DemoAPI without random faults (tests queue their own with `fail_next`)."""
    with DemoAPI(faults=FaultPlan(rate=0.0, retry_after=1, slow=1.0)) as server:
        yield server


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused (nothing was sent)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def httpbin_url() -> Iterator[str]:
    """httpbin (the Flask app) served on a loopback port for the whole session."""
    import httpbin
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, httpbin.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Caller:
    """Calls a node the way its flavour needs, with an injected `http` client.

    Sync nodes get an `httpx.Client`, async nodes an `httpx.AsyncClient` inside
    `asyncio.run`; either way the client is provided as the ``http`` resource, and the
    headers of every request actually sent are recorded in `sent` (a client event hook).
    """

    def __init__(self, flavor: str, base_url: str, timeout: float = 5.0) -> None:
        self.flavor = flavor
        self.base_url = base_url
        self.timeout = timeout
        self.sent: list[httpx.Request] = []

    @property
    def is_async(self) -> bool:
        return self.flavor == "async"

    def _hook(self, request: httpx.Request) -> None:
        self.sent.append(request)

    async def _ahook(self, request: httpx.Request) -> None:
        self.sent.append(request)

    def keys(self) -> list[str | None]:
        return [request.headers.get("Idempotency-Key") for request in self.sent]

    def __call__(self, node: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.is_async:
            with (
                httpx.Client(
                    base_url=self.base_url,
                    timeout=self.timeout,
                    event_hooks={"request": [self._hook]},
                ) as client,
                nk.use(http=client),
            ):
                return node(*args, **kwargs)

        async def main() -> Any:
            async with (
                httpx.AsyncClient(
                    base_url=self.base_url,
                    timeout=self.timeout,
                    event_hooks={"request": [self._ahook]},
                ) as client,
                nk.use(http=client),
            ):
                return await node(*args, **kwargs)

        return asyncio.run(main())


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> str:
    """Run the test with a sync node and an async node."""
    return str(request.param)


@pytest.fixture
def call(flavor: str, api: DemoAPI) -> Caller:
    """Call nodes against the DemoAPI (client timeout 0.3 s, so `slow` faults time out)."""
    return Caller(flavor, api.url, timeout=0.3)
