"""The `nodekit` command line: inspect and resolve idempotency records.

    nodekit store stats URL                 records per namespace and state
    nodekit store show URL NAMESPACE DIGEST one record (never the result payload); a
                                            corrupt one is shown field by field, exit status 3
    nodekit store resolve URL NAMESPACE DIGEST
                                            delete a record whose outcome you have checked
                                            (the way out of OutcomeUnknown for at-most-once)
    nodekit outbox run --db URL --handler module:fn [--topic T] [--batch N] [--lease S]
                                            one outbox dispatcher, as a worker process: claims
                                            batches, delivers them, sleeps briefly when idle;
                                            SIGTERM / SIGINT finish the current message, give
                                            the rest back and exit 0 (run as many as needed)
    nodekit version

URLs are those of `nk.open_store`: ``sqlite:///path``, ``redis://…``, ``postgresql://…``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["main"]


@contextmanager
def _opened(url: str) -> Iterator[Any]:
    """The store at `url`, closed when the command is done with it."""
    from .idempotency import open_store

    store = open_store(url)
    try:
        yield store
    finally:
        store.close()


def _stats(url: str) -> int:
    with _opened(url) as store:
        stats = getattr(store, "stats", None)
        if stats is None:
            print(f"{type(store).__name__} does not report statistics", file=sys.stderr)
            return 2
        for (namespace, state), count in sorted(stats().items()):
            print(f"{namespace}\t{state}\t{count}")
        return 0


def _show(url: str, namespace: str, digest: str, scope: str) -> int:
    from ._errors import IdempotencyCorruptRecord
    from .idempotency import IN_PROGRESS, RecordKey, holder_of

    with _opened(url) as store:
        try:
            record = store.get(RecordKey(namespace, scope, digest))
        except IdempotencyCorruptRecord as exc:
            print(f"CORRUPT: field {exc.field!r} cannot be read ({exc})")
            for name, value in (exc.fields or {}).items():
                print(f"{name}: {value}")
            return 3
        if record is None:
            print("no such record", file=sys.stderr)
            return 1
        for name in (
            "namespace",
            "scope",
            "key_digest",
            "state",
            "epoch",
            "lease_expires_at",
            "created_at",
            "expires_at",
            "format_version",
        ):
            print(f"{name}: {getattr(record, name)}")
        holder = holder_of(record)
        if record.state == IN_PROGRESS:  # who holds it now, and until when
            print(f"holder: {holder.describe()}")
        elif holder.pid is not None:  # who ran it
            print(f"holder: pid {holder.pid} on host {holder.host}")
        print(
            f"result stored: {record.result is not None}; error stored: {record.error is not None}"
        )
        return 0


def _resolve(url: str, namespace: str, digest: str, scope: str) -> int:
    from .idempotency import RecordKey

    with _opened(url) as store:
        gone = store.delete(RecordKey(namespace, scope, digest))
        print("deleted" if gone else "no such record")
        return 0 if gone else 1


def _handler(spec: str) -> Any:
    """The function named by ``module:attribute`` (the current directory is importable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"nodekit outbox run: --handler must be module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise SystemExit(f"nodekit outbox run: {spec} is not callable")
    return target


def _connect(url: str) -> Any:
    """A connection of its own for the dispatcher: sqlite3 for ``sqlite:///``, else psycopg."""
    from urllib.parse import unquote

    if url.startswith("sqlite:///"):
        import sqlite3

        # autocommit: the dispatcher opens its own BEGIN IMMEDIATE transactions
        return sqlite3.connect(
            unquote(url[len("sqlite:///") :]), timeout=30.0, isolation_level=None
        )
    if url.split(":", 1)[0] in ("postgresql", "postgres"):
        import psycopg

        return psycopg.connect(url, autocommit=True, application_name="nodekit-outbox")
    raise SystemExit("nodekit outbox run: --db takes sqlite:///path or postgresql://...")


def _outbox_run(args: argparse.Namespace) -> int:
    """Dispatch until SIGTERM or SIGINT; a lost database connection is reopened."""
    from ._errors import ConfigError
    from ._redact import error_text
    from .sql import Dispatcher, Outbox

    handler = _handler(args.handler)
    try:
        dispatcher_for = functools.partial(
            Dispatcher,
            handler=handler,
            outbox=Outbox(args.table),
            topic=args.topic,
            batch=args.batch,
            lease=args.lease,
            idle=args.idle,
            retry_delay=args.retry_delay,
        )
        # the options are checked once, here: a mistake is an exit status, not a retry loop
        dispatcher_for(None)
    except ConfigError as exc:
        print(f"nodekit outbox run: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    current: list[Dispatcher] = []

    def graceful(signum: int, frame: Any) -> None:
        stop.set()
        for dispatcher in current:
            dispatcher.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, graceful)
    delivered = 0
    while not stop.is_set():
        try:
            conn = _connect(args.db)
        except Exception as exc:
            print(f"nodekit outbox: cannot connect: {error_text(exc)}", file=sys.stderr)
            stop.wait(args.idle + 1.0)
            continue
        try:
            dispatcher = dispatcher_for(conn)
            current[:] = [dispatcher]
            if stop.is_set():
                break
            print(
                f"nodekit outbox: dispatching {dispatcher.outbox.table} as {dispatcher.owner}",
                file=sys.stderr,
                flush=True,
            )
            dispatcher.run()
        except Exception as exc:  # the database's: the claims end with their lease
            print(f"nodekit outbox: {error_text(exc)}; reconnecting", file=sys.stderr, flush=True)
            stop.wait(args.idle + 1.0)
        finally:
            delivered += sum(d.delivered for d in current)
            current.clear()
            conn.close()
    print(f"nodekit outbox: stopped; delivered {delivered}", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nodekit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print nodekit's version")
    store = sub.add_parser("store", help="inspect or resolve idempotency records")
    verbs = store.add_subparsers(dest="verb", required=True)
    stats = verbs.add_parser("stats", help="records per namespace and state")
    stats.add_argument("url")
    for verb, text in (("show", "show one record"), ("resolve", "delete one record")):
        cmd = verbs.add_parser(verb, help=text)
        cmd.add_argument("url")
        cmd.add_argument("namespace")
        cmd.add_argument(
            "digest", help="the key digest (from events: a 12-hex prefix is not enough)"
        )
        cmd.add_argument("--scope", default="", help="the scope digest, if the node uses scope=")
    outbox = sub.add_parser("outbox", help="run outbox dispatchers")
    outbox_verbs = outbox.add_subparsers(dest="verb", required=True)
    run = outbox_verbs.add_parser(
        "run", help="one competing dispatcher, until SIGTERM / SIGINT (graceful, exit 0)"
    )
    run.add_argument("--db", required=True, help="sqlite:///path or postgresql://...")
    run.add_argument("--handler", required=True, help="module:function taking a Message")
    run.add_argument("--table", default="nodekit_outbox")
    run.add_argument("--topic", help="only messages of this topic")
    run.add_argument("--batch", type=int, default=100, help="messages claimed at a time")
    run.add_argument(
        "--lease", type=float, default=30.0, help="seconds a claim lasts (renewed meanwhile)"
    )
    run.add_argument("--idle", type=float, default=0.5, help="seconds to sleep when idle")
    run.add_argument(
        "--retry-delay", type=float, default=1.0, help="seconds before a failed message again"
    )
    args = parser.parse_args(argv)
    if args.command == "outbox":
        return _outbox_run(args)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    if args.verb == "stats":
        return _stats(args.url)
    if args.verb == "show":
        return _show(args.url, args.namespace, args.digest, args.scope)
    return _resolve(args.url, args.namespace, args.digest, args.scope)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
