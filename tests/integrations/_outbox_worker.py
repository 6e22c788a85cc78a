"""Outbox handlers for `test_outbox_dispatchers.py`, run inside ``nodekit outbox run`` workers.

`deliver` POSTs each message to the LocalAPI at ``$NK_OUTBOX_SINK`` with its key as
``Idempotency-Key`` (the server, not this process, counts the effects), and appends the
delivery's start and end to a log of its own (``$NK_OUTBOX_LOG_DIR/<pid>-<thread>.log``,
written with ``os.write`` so that a SIGKILL loses nothing written) — the test checks that no
two dispatchers were ever delivering one message at the same time.

``$NK_OUTBOX_PAUSE_AFTER=n``: after the n-th delivery has been *made* (the server answered)
and before the handler returns — delivered, not yet marked — write ``pause`` and wait to be
killed. ``$NK_OUTBOX_SLOW=s``: each delivery takes `s` seconds more. `sink` does nothing (the
throughput measurement's local sink).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from nodekit.sql import Message

_local = threading.local()
_count = [0]


def _log(line: str) -> None:
    fd = getattr(_local, "fd", None)
    if fd is None:
        folder = os.environ["NK_OUTBOX_LOG_DIR"]
        name = f"{os.getpid()}-{threading.get_ident()}.log"
        fd = _local.fd = os.open(
            os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
    os.write(fd, (line + "\n").encode())


def _post(body: bytes, key: str) -> int:
    sink = urlsplit(os.environ["NK_OUTBOX_SINK"])
    for attempt in (1, 2):
        conn: Any = getattr(_local, "http", None)
        if conn is None:
            conn = _local.http = http.client.HTTPConnection(
                sink.hostname or "127.0.0.1", sink.port, timeout=10
            )
        try:
            conn.request(
                "POST",
                "/events",
                body,
                {"Idempotency-Key": key, "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            response.read()
            return int(response.status)
        except (OSError, http.client.HTTPException):
            conn.close()
            _local.http = None
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def deliver(message: Message) -> None:
    """POST the message to the sink with its key; an answer other than 2xx is a failure."""
    _log(f"start {message.key} {time.time():.6f}")
    slow = float(os.environ.get("NK_OUTBOX_SLOW") or 0)
    if slow:
        time.sleep(slow)
    body = json.dumps({"key": message.key, "payload": message.payload}).encode()
    status = _post(body, message.key)
    _count[0] += 1
    if _count[0] == int(os.environ.get("NK_OUTBOX_PAUSE_AFTER") or 0):
        _log(f"pause {message.key} {time.time():.6f}")
        time.sleep(60)  # the test kills this process here
        os._exit(3)
    _log(f"end {message.key} {time.time():.6f}")
    if not 200 <= status < 300:
        raise RuntimeError(f"the sink answered {status}")


def sink(message: Message) -> None:
    """A local sink that does nothing: what the dispatchers alone cost."""


def close_thread_connection() -> None:
    """Close this thread's connection to the sink (in-process dispatcher threads)."""
    conn = getattr(_local, "http", None)
    if conn is not None:
        conn.close()
        _local.http = None
    fd = getattr(_local, "fd", None)
    if fd is not None:
        os.close(fd)
        _local.fd = None
