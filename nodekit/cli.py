"""The `nodekit` command line: inspect and resolve idempotency records.

    nodekit store stats URL                 records per namespace and state
    nodekit store show URL NAMESPACE DIGEST one record (never the result payload); a
                                            corrupt one is shown field by field, exit status 3
    nodekit store resolve URL NAMESPACE DIGEST
                                            delete a record whose outcome you have checked
                                            (the way out of OutcomeUnknown for at-most-once)
    nodekit version

URLs are those of `nk.open_store`: ``sqlite:///path``, ``redis://…``, ``postgresql://…``.
"""

from __future__ import annotations

import argparse
import sys
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
    from .idempotency import RecordKey

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
    args = parser.parse_args(argv)
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
