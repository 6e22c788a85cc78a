"""The `nodekit` command line: inspect durable runs and idempotency records, run dispatchers.

    nodekit runs list URL [--flow F] [--status S] [--since 1h|ISO]
                                            durable runs, oldest first: status (``crashed``
                                            when its process is gone), local start/end times
    nodekit runs show URL RUN [--html FILE] a run's timeline (nodes, attempts, waits, faults,
                                            replays); --html writes it as one page
    nodekit runs resume URL RUN --flow module:attr --state JSON|@file.json
                                            run it again with its run id (journaled nodes are
                                            replayed); the state must be the run's input
    nodekit runs cancel URL RUN             a resume is refused from now on; a run still going
                                            stops before its next node
    nodekit runs forget URL RUN             delete the run's log and journal
    nodekit keys find URL PREFIX            records whose key digest starts with PREFIX (the
                                            12-hex fingerprint events and errors print)
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

URLs are those of `nk.open_store`: ``sqlite:///path`` (an existing file: never created
here), ``redis://…`` (``--prefix`` for a store's key prefix), ``postgresql://…``
(``--schema``). Every error is one line on stderr and exit status 2; times are local.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

__all__ = ["main"]


class CliError(Exception):
    """A mistake or a failure the command reports as one line, with exit status 2."""


def _when(seconds: float | None) -> str:
    """A local ISO time (seconds precision), or "-"."""
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _took(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = max(0.0, end - start)
    if seconds < 60:
        return f"{seconds:.3f}s"
    return str(timedelta(seconds=round(seconds)))


def _safe(text: Any) -> str:
    """Stored text made safe for the terminal: control characters as ``\\x1b``-style
    escapes (an error text or a run id may hold ``\\x1b[2J``)."""
    from ._story._text import printable

    return printable(str(text))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print aligned columns (the last one unpadded), control characters escaped."""
    header = [_safe(cell) for cell in header]
    rows = [[_safe(cell) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


# ---------------------------------------------------------------------------- stores


def _store_options(args: argparse.Namespace, scheme: str) -> dict[str, Any]:
    """Constructor options from the command line, for the store the URL names; a command
    fails fast when the server is down rather than waiting out a pool timeout."""
    options: dict[str, Any] = {}
    table = getattr(args, "table", None)
    if scheme in ("redis", "rediss", "unix"):
        options.update(socket_connect_timeout=3.0, pool_timeout=10.0)
        if getattr(args, "key_prefix", None) is not None:
            options["prefix"] = args.key_prefix
    elif scheme in ("postgresql", "postgres"):
        options["pool_timeout"] = 10.0
        if getattr(args, "schema", None):
            options["schema"] = args.schema
        if table:
            options["table"] = table
    elif scheme == "sqlite" and table:
        options["table"] = table
    return options


@contextmanager
def _opened(url: str, args: argparse.Namespace | None = None) -> Iterator[Any]:
    """The store at `url`, closed when the command is done with it.

    A SQLite file must exist (a typo must not leave an empty database behind); a
    ``memory://`` store lives in one process, so there is nothing to inspect here.
    """
    from urllib.parse import unquote, urlparse

    from .idempotency import open_store

    scheme = urlparse(url).scheme.lower() if isinstance(url, str) else ""
    if scheme == "memory":
        raise CliError(
            "MemoryStore does not report statistics or runs: a memory:// store lives in one "
            "process (n/a here)"
        )
    if scheme == "sqlite" and url.startswith("sqlite:///"):
        path = unquote(url[len("sqlite:///") :])
        if path and not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "does not exist"
            raise CliError(f"{path} {what}: no SQLite store there (it is not created)")
    store = open_store(url, **_store_options(args or argparse.Namespace(), scheme))
    try:
        yield store
    finally:
        store.close()


def _backend(store: Any) -> Any:
    from .flow._runlog import backend_for

    backend = backend_for(store)
    if backend is None:
        raise CliError(f"{type(store).__name__} keeps no run log")
    return backend


def _stats(args: argparse.Namespace) -> int:
    with _opened(args.url, args) as store:
        stats = getattr(store, "stats", None)
        counts = stats() if stats is not None else _backend(store).stats()
        for (namespace, state), count in sorted(counts.items()):
            print(f"{namespace}\t{state}\t{count}")
        if not counts:
            print("no records", file=sys.stderr)
        return 0


_HEX = re.compile(r"[0-9a-f]{4,64}")


def _hex_prefix(prefix: str) -> str:
    prefix = prefix.strip().lower()
    if not _HEX.fullmatch(prefix):
        raise CliError(
            f"{prefix!r} is not a key fingerprint: give 4 to 64 hex digits (events print 12)"
        )
    return prefix


def _find(args: argparse.Namespace) -> int:
    from .idempotency import IN_PROGRESS

    prefix = _hex_prefix(args.fingerprint)
    with _opened(args.url, args) as store:
        records = _backend(store).find(prefix)
    if not records:
        print(f"no record's key digest starts with {prefix}", file=sys.stderr)
        return 1
    rows = [
        [
            r.namespace,
            r.scope or "-",
            r.key_digest,
            r.state,
            _when(r.created_at),
            _when(r.lease_expires_at) if r.state == IN_PROGRESS else "-",
            _when(r.expires_at),
        ]
        for r in records
    ]
    _table(["NAMESPACE", "SCOPE", "DIGEST", "STATE", "CREATED", "LEASE ENDS", "EXPIRES"], rows)
    return 0


def _full_digest(store: Any, namespace: str, digest: str, scope: str) -> str:
    """A record's digest from a prefix of it (the 12 hex digits events print), if unique."""
    if len(digest) == 64:
        return digest
    prefix = _hex_prefix(digest)
    found = [
        r.key_digest
        for r in _backend(store).find(prefix)
        if r.namespace == namespace and r.scope == scope
    ]
    if len(found) != 1:
        raise CliError(
            f"{len(found)} records of {namespace!r} have a digest starting with {prefix}: "
            + ("none" if not found else "give more digits")
        )
    return str(found[0])


def _show(args: argparse.Namespace) -> int:
    from ._errors import IdempotencyCorruptRecord
    from .idempotency import IN_PROGRESS, RecordKey, holder_of

    with _opened(args.url, args) as store:
        digest = _full_digest(store, args.namespace, args.digest, args.scope)
        try:
            record = store.get(RecordKey(args.namespace, args.scope, digest))
        except IdempotencyCorruptRecord as exc:
            print(f"CORRUPT: field {exc.field!r} cannot be read ({exc})")
            for name, value in (exc.fields or {}).items():
                print(f"{name}: {_safe(value)}")
            return 3
        if record is None:
            print("no such record", file=sys.stderr)
            return 1
        for name in ("namespace", "scope", "key_digest", "state", "epoch"):
            print(f"{name}: {getattr(record, name)}")
        for name in ("lease_expires_at", "created_at", "expires_at"):
            print(f"{name}: {_when(getattr(record, name))}")
        print(f"format_version: {record.format_version}")
        holder = holder_of(record)
        if record.state == IN_PROGRESS:  # who holds it now, and until when
            print(f"holder: {holder.describe()}")
        elif holder.pid is not None:  # who ran it
            print(f"holder: pid {holder.pid} on host {holder.host}")
        print(
            f"result stored: {record.result is not None}; error stored: {record.error is not None}"
        )
        return 0


def _resolve(args: argparse.Namespace) -> int:
    from .idempotency import RecordKey

    with _opened(args.url, args) as store:
        digest = _full_digest(store, args.namespace, args.digest, args.scope)
        gone = store.delete(RecordKey(args.namespace, args.scope, digest))
        print("deleted" if gone else "no such record")
        return 0 if gone else 1


# ---------------------------------------------------------------------------- runs


def _since(text: str | None) -> float | None:
    """``1h``, ``30m``, ``2d``, ``45s`` ago, or an ISO time (local unless it has an offset)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match[2]]
        return time.time() - float(match[1]) * unit
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"--since {text!r}: give a span like 30m, 1h, 2d or an ISO time like 2026-05-01T09:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a local time
    return moment.timestamp()


def _the_run(backend: Any, run_id: str, flow: str | None, events: bool = False) -> Any:
    """The one run with this id (in `flow`, if given), else a `CliError`."""
    found = backend.runs(run_id=run_id, flow=flow, events=events)
    if not found:
        where = f" of flow {flow!r}" if flow else ""
        raise CliError(f"no run {run_id!r}{where} in this store's run log")
    if len(found) > 1:
        flows = ", ".join(sorted(info.flow for info in found))
        raise CliError(f"run id {run_id!r} names runs of several flows ({flows}): add --flow")
    return found[0]


def _runs_list(args: argparse.Namespace) -> int:
    from .flow._runlog import derived_status

    since = _since(args.since)
    with _opened(args.url, args) as store:
        backend = _backend(store)
        now = time.time()
        rows = []
        for info in backend.runs(flow=args.flow, since=since):
            status = derived_status(info, store, now)
            if args.status is not None and status != args.status:
                continue
            rows.append(
                [
                    info.run_id,
                    info.flow,
                    status,
                    _when(info.started_at),
                    _when(info.ended_at),
                    _took(info.started_at, info.ended_at),
                ]
            )
    if not rows:
        print("no runs", file=sys.stderr)
        return 0
    _table(["RUN", "FLOW", "STATUS", "STARTED", "ENDED", "TOOK"], rows)
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    from .flow._runlog import derived_status

    with _opened(args.url, args) as store:
        info = _the_run(_backend(store), args.run, args.flow, events=True)
        status = derived_status(info, store)
        journal = _journal_rows(info, store)
    try:
        from . import _story
    except ImportError:
        raise CliError("runs show needs nodekit._story, which this nodekit lacks") from None
    story = _story.build_story(info.as_run(status), info.events or [])
    if args.html:
        page = _story.render_html(story)
        with open(args.html, "w", encoding="utf-8") as file:
            file.write(page)
        print(f"wrote {args.html}")
        return 0
    print(_story.render_text(story).rstrip("\n"))
    if journal:
        print("\njournal (the run did not end: what its store holds now)")
        _table(["NODE", "ENTRY", "SINCE", "HOLDER"], journal)
    return 0


def _journal_rows(info: Any, store: Any) -> list[list[str]]:
    """Each node's journal entry of a run that did not end: a run log is written at most
    once a second, the journal at every node."""
    from .flow._runlog import RUNNING, journal_keys
    from .idempotency import IN_PROGRESS, holder_of

    if info.status != RUNNING:
        return []
    rows = []
    for (name, _), key in zip(info.nodes, journal_keys(info)[1:], strict=True):
        record = store.get(key)
        if record is None:
            rows.append([name, "not started", "-", "-"])
        elif record.state == IN_PROGRESS:
            holder = holder_of(record)
            who = f"pid {holder.pid} on {holder.host} ({holder.state})" if holder.pid else "-"
            rows.append([name, "in progress", _when(record.created_at), who])
        else:
            rows.append([name, "journaled", _when(record.created_at), "-"])
    return rows


def _flow_object(spec: str) -> Any:
    """The flow named by ``module:attribute`` (the current directory is importable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CliError(f"--flow must be module:attribute naming a flow, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as exc:
        raise CliError(f"--flow {spec}: cannot import {module_name!r} ({exc})") from None
    except AttributeError:
        raise CliError(f"--flow {spec}: {module_name!r} has no attribute {attribute!r}") from None
    from .flow import Flow

    if not isinstance(target, Flow):
        raise CliError(f"--flow {spec} is a {type(target).__name__}, not an nk.Flow")
    return target


def _state(text: str) -> Any:
    """``--state``: JSON, or ``@path`` of a JSON file."""
    where = "--state"
    if text.startswith("@"):
        where = text[1:]
        try:
            with open(where, encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise CliError(f"--state {text}: cannot read it ({exc.strerror})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{where} is not JSON: {exc}") from None


def _runs_resume(args: argparse.Namespace) -> int:
    from ._errors import FlowError

    state = _state(args.state)
    flow = _flow_object(args.flow)
    with _opened(args.url, args) as store:
        _the_run(_backend(store), args.run, flow.name)  # a run the log knows
        try:
            flow.run(state, run_id=args.run, store=store)
        except FlowError as exc:
            raise CliError(str(exc).replace("\n", "; ")) from None
    print(f"run {args.run} of flow {flow.name}: succeeded")
    return 0


def _runs_cancel(args: argparse.Namespace) -> int:
    from .flow._runlog import CANCELLED, COMPENSATED, RUNNING, SUCCEEDED, derived_status

    with _opened(args.url, args) as store:
        backend = _backend(store)
        info = _the_run(backend, args.run, args.flow)
        status = derived_status(info, store)
        if info.status == CANCELLED:
            print(f"run {_safe(info.run_id)} of flow {_safe(info.flow)} is already cancelled")
            return 0
        if info.status in (SUCCEEDED, COMPENSATED):
            raise CliError(f"run {info.run_id!r} has {info.status}: there is nothing to cancel")
        backend.set_status(info.flow, info.run_id, CANCELLED)
    then = " it stops before its next node;" if status == RUNNING else ""
    print(
        f"cancelled run {_safe(info.run_id)} of flow {_safe(info.flow)}:{then} a resume is refused"
    )
    return 0


def _runs_forget(args: argparse.Namespace) -> int:
    from .flow._runlog import RUNNING, derived_status, forget_keys

    with _opened(args.url, args) as store:
        backend = _backend(store)
        info = _the_run(backend, args.run, args.flow)
        # its subflows' runs too: run ids ``{run}/{label}`` and ``{run}/{label}#k``, nested
        children = [child for child in backend.runs() if child.run_id.startswith(info.run_id + "/")]
        for run in (info, *children):
            if derived_status(run, store) == RUNNING and not args.force:
                raise CliError(
                    f"run {run.run_id!r} is running (its process is alive, or its lease is "
                    "valid): cancel it first, or add --force"
                )
        deleted = 0
        for run in (*children, info):  # the parent last: a failure leaves it to retry
            deleted += sum(1 for key in forget_keys(run, store) if store.delete(key))
            backend.delete(run.flow, run.run_id)
    subflows = f" and {len(children)} subflow run{'s' if len(children) != 1 else ''}"
    print(
        f"forgot run {_safe(info.run_id)} of flow {_safe(info.flow)}"
        f"{subflows if children else ''}: its log and {deleted} journal "
        f"record{'s' if deleted != 1 else ''} deleted"
    )
    return 0


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodekit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print nodekit's version")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("url", help="the store: sqlite:///path, redis://..., postgresql://...")
    where.add_argument(
        "--prefix", dest="key_prefix", help="Redis: the store's key prefix (default nodekit:)"
    )
    where.add_argument("--schema", help="PostgreSQL: the store's schema")
    where.add_argument("--table", help="SQLite, PostgreSQL: the records table")

    runs = sub.add_parser("runs", help="durable runs: list, show, resume, cancel, forget")
    run_verbs = runs.add_subparsers(dest="verb", required=True)
    listing = run_verbs.add_parser("list", parents=[where], help="the runs, oldest first")
    listing.add_argument("--flow", help="only runs of this flow")
    listing.add_argument(
        "--status",
        choices=["running", "succeeded", "failed", "compensated", "cancelled", "crashed"],
        help="only runs with this status",
    )
    listing.add_argument("--since", help="only runs started since: 30m, 1h, 2d or an ISO time")
    show = run_verbs.add_parser("show", parents=[where], help="a run's timeline")
    show.add_argument("run", help="the run id")
    show.add_argument("--flow", help="the flow's name, if several flows used this run id")
    show.add_argument("--html", metavar="FILE", help="write the timeline as one HTML page")
    resume = run_verbs.add_parser("resume", parents=[where], help="run it again, resuming")
    resume.add_argument("run", help="the run id")
    resume.add_argument("--flow", required=True, help="module:attribute of the nk.Flow")
    resume.add_argument(
        "--state",
        required=True,
        help="the run's input state as JSON, or @file.json (checked against the journal's "
        "fingerprint of the original input: the store holds no payloads)",
    )
    for verb, text in (
        ("cancel", "refuse its resumes; a run still going stops before its next node"),
        ("forget", "delete its log and its journal"),
    ):
        cmd = run_verbs.add_parser(verb, parents=[where], help=text)
        cmd.add_argument("run", help="the run id")
        cmd.add_argument("--flow", help="the flow's name, if several flows used this run id")
        if verb == "forget":
            cmd.add_argument("--force", action="store_true", help="even if it looks alive")

    keys = sub.add_parser("keys", help="find idempotency records")
    key_verbs = keys.add_subparsers(dest="verb", required=True)
    find = key_verbs.add_parser(
        "find", parents=[where], help="records whose key digest starts with PREFIX"
    )
    find.add_argument(
        "fingerprint", help="hex digits: the 12-digit fingerprint events print, or more"
    )

    store = sub.add_parser("store", help="inspect or resolve idempotency records")
    verbs = store.add_subparsers(dest="verb", required=True)
    verbs.add_parser("stats", parents=[where], help="records per namespace and state")
    for verb, text in (("show", "show one record"), ("resolve", "delete one record")):
        cmd = verbs.add_parser(verb, parents=[where], help=text)
        cmd.add_argument("namespace")
        cmd.add_argument(
            "digest", help="the key digest, or a unique prefix of it (events print 12 hex)"
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
    return parser


_COMMANDS = {
    ("runs", "list"): _runs_list,
    ("runs", "show"): _runs_show,
    ("runs", "resume"): _runs_resume,
    ("runs", "cancel"): _runs_cancel,
    ("runs", "forget"): _runs_forget,
    ("keys", "find"): _find,
    ("store", "stats"): _stats,
    ("store", "show"): _show,
    ("store", "resolve"): _resolve,
}


def _one_line(exc: BaseException, url: str | None) -> str:
    """What went wrong, on one line: redacted, and saying which store could not be reached."""
    from ._errors import ConfigError
    from ._redact import error_text, redact

    if isinstance(exc, CliError | ConfigError):
        text = " ".join(str(exc).split())
        return redact(text) if isinstance(exc, ConfigError) else text
    names = {cls.__name__ for cls in type(exc).__mro__}
    unreachable = isinstance(exc, ConnectionError | TimeoutError) or bool(
        names & {"OperationalError", "InterfaceError", "ConnectionError", "TimeoutError"}
    )
    text = error_text(exc, 300)
    if unreachable and url and not url.startswith("sqlite"):
        return f"cannot reach the store at {redact(url)}: {text}"
    return text


def _warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    """A warning (the store's about its durability, say) as one line on stderr."""
    print(f"nodekit: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "outbox":
        return _outbox_run(args)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    # the pool's own warnings about refused connections would print beside the one line
    pg_logger = logging.getLogger("psycopg")
    if not any(isinstance(h, logging.NullHandler) for h in pg_logger.handlers):
        pg_logger.addHandler(logging.NullHandler())
    show, warnings.showwarning = warnings.showwarning, _warning
    try:
        return _COMMANDS[args.command, args.verb](args)
    except KeyboardInterrupt:
        print("nodekit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure: one line, no traceback
        print(
            f"nodekit {args.command} {args.verb}: {_safe(_one_line(exc, args.url))}",
            file=sys.stderr,
        )
        return 2
    finally:
        warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
