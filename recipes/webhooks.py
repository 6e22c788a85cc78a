"""Webhooks: deliver HMAC-signed events to several targets, each (target, event) once.

One node, ``deliver_webhook``, POSTs an event to ``/webhooks/<target>`` with an
``X-Signature: sha256=<hex HMAC-SHA256 of the body>`` header. It is keyed by (target, event
id) with `nk.Idempotency`, so:

- every attempt sends the same ``Idempotency-Key`` (`nodekit.http` derives it from the node's
  key): when an answer is lost after the server accepted the event, the retry is answered
  from the server's record instead of delivering twice;
- the key's record is kept in a durable store (``--db-url``; SQLite in ``--data-dir`` by
  default): running the program again replays what was delivered, and sends nothing.

A target that answers ``410 Gone`` is recorded as gone and gets none of its remaining events.
Each (target, event) ends as one outcome — ``delivered``, ``replayed`` (the server or the key
store already had it: nothing was delivered twice), ``gone``, ``skipped`` (its target is gone)
or ``failed`` — written to a JSON-lines file, atomically (`nodekit.files`), after each target.

    python -m recipes.webhooks --count 20 --faults 0.3
    python -m recipes.webhooks --api-url https://hooks.example.com --targets orders,billing
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import nodekit as nk
from nodekit import files
from nodekit import http as nkhttp

from ._common import api_base, data_dir, parser

__all__ = ["deliver_webhook", "main", "make_events", "sign"]

RETRY = nk.Retry(attempts=6, initial=0.1, multiplier=2.0, max_wait=2.0, jitter=0.05)
OUTCOMES = ("delivered", "replayed", "gone", "skipped", "failed")

Event = dict[str, Any]


def sign(secret: str, body: bytes) -> str:
    """The ``X-Signature`` of `body`: ``sha256=<hex HMAC-SHA256>`` with `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@nk.node(
    name="deliver_webhook",
    retry=RETRY,
    timeout=nk.Timeout(attempt=30, total=120),
    idempotency=nk.Idempotency(key=lambda target, event: f"{target}/{event['id']}"),
)
def deliver_webhook(
    target: str,
    event: Event,
    *,
    http: httpx.Client = nk.resource(),
    webhook_secret: str = nk.resource(),
) -> str:
    """POST one signed event to `target`: ``"delivered"``, ``"replayed"`` or ``"gone"``.

    ``"replayed"`` means the server answered from its idempotency record (it had the event
    already, e.g. from an attempt whose answer was lost); ``"gone"`` is a 410 (never retried,
    and stored like any result, so a later run knows the target is gone without asking).
    Other 4xx fail at once; 429, 503, dropped connections and timeouts are retried with the
    same ``Idempotency-Key``.
    """
    body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "X-Signature": sign(webhook_secret, body)}
    try:
        response = nkhttp.post(
            http, f"/webhooks/{quote(target, safe='')}", content=body, headers=headers
        )
    except nkhttp.HTTPStatusError as exc:
        if exc.status_code == 410:
            return "gone"
        raise
    return "replayed" if nkhttp.replayed(response) else "delivered"


def make_events(count: int) -> list[Event]:
    """`count` deterministic events (the same ids and bodies on every run)."""
    kinds = ("order.created", "order.paid", "order.shipped")
    return [
        {
            "id": f"evt-{i:04d}",
            "type": kinds[i % len(kinds)],
            "order_id": f"o-{(i + 1) // 2:04d}",
            "amount_cents": 500 + 125 * (i % 7),
        }
        for i in range(1, count + 1)
    ]


def _replays(metrics: nk.Metrics) -> int:
    stats = metrics.snapshot().get(deliver_webhook.name)
    return stats.replays if stats is not None else 0


def deliver_all(
    targets: Sequence[str], events: Sequence[Event], metrics: nk.Metrics, outcomes_path: Path
) -> list[dict[str, str]]:
    """Deliver every event to every target, in order; one outcome record per pair.

    Needs the ``http``, ``webhook_secret`` and ``idempotency_store`` resources. Calls run one
    after the other, so a change of `metrics`' replay count across a call tells that the key
    store answered it. The outcomes file is rewritten atomically after each target.
    """
    records: list[dict[str, str]] = []
    for target in targets:
        gone = False
        for event in events:
            record = {"target": target, "event": event["id"], "outcome": "", "detail": ""}
            if gone:
                record["outcome"] = "skipped"
                record["detail"] = "target is gone"
            else:
                before = _replays(metrics)
                try:
                    result = deliver_webhook(target, event)
                except Exception as exc:
                    record["outcome"] = "failed"
                    record["detail"] = _describe(exc)
                else:
                    local = _replays(metrics) > before
                    record["outcome"] = "replayed" if local and result == "delivered" else result
                    if local:
                        record["detail"] = "from the key store (delivered by an earlier run)"
                    elif result == "replayed":
                        record["detail"] = "the server had it already (an answer was lost)"
                    gone = result == "gone"
            records.append(record)
        files.write_atomic(outcomes_path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _describe(exc: BaseException) -> str:
    notes = " ".join(getattr(exc, "__notes__", ()))
    return f"{type(exc).__name__}: {exc}" + (f" ({notes})" if notes else "")


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser("webhooks", "Deliver HMAC-signed webhooks, each (target, event) once.")
    cli.add_argument(
        "--count", type=int, default=5, help="events to deliver (default: %(default)s)"
    )
    cli.add_argument(
        "--targets",
        default="crm,billing,legacy",
        help="comma-separated webhook targets (default: %(default)s)",
    )
    cli.add_argument(
        "--secret",
        default="whsec-demo",
        help="HMAC secret for X-Signature (default: %(default)s)",
    )
    cli.add_argument(
        "--gone",
        default="legacy",
        help="local API only: comma-separated targets that answer 410 Gone (default: %(default)s)",
    )
    cli.add_argument(
        "--outcomes", type=Path, help="JSON-lines outcome file (default: in --data-dir)"
    )
    cli.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for each HTTP answer (default: %(default)s)",
    )
    args = cli.parse_args(argv)
    root = data_dir(args.data_dir)
    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    events = make_events(args.count)
    outcomes_path: Path = args.outcomes or root / "webhook-outcomes.jsonl"
    outcomes_path.parent.mkdir(parents=True, exist_ok=True)
    # --db-url holds the keys' records: any store URL (sqlite:///, postgresql://, redis://).
    store = nk.open_store(args.db_url or f"sqlite:///{root / 'webhooks.sqlite'}")
    metrics = nk.Metrics()
    remove_sink = nk.add_sink(metrics)
    started = time.perf_counter()
    try:
        with api_base(
            args.api_url, faults=args.faults, seed=args.seed, webhook_secret=args.secret
        ) as (base, api):
            if api is not None:
                for name in args.gone.split(","):
                    if name.strip():
                        api.gone(name.strip())
            source = "a local API" if api is not None else base
            faults = (
                f" failing {args.faults:.0%} of requests" if api is not None and args.faults else ""
            )
            print(
                f"webhooks: {len(events)} events x {len(targets)} targets "
                f"({', '.join(targets)}) -> {source}{faults}"
            )
            with (
                httpx.Client(base_url=base, timeout=args.timeout) as client,
                nk.use(http=client, webhook_secret=args.secret, idempotency_store=store),
            ):
                records = deliver_all(targets, events, metrics, outcomes_path)
    finally:
        remove_sink()
        store.close()
    _summary(records, targets, metrics, outcomes_path, time.perf_counter() - started)
    return 1 if any(record["outcome"] == "failed" for record in records) else 0


def _summary(
    records: list[dict[str, str]],
    targets: Sequence[str],
    metrics: nk.Metrics,
    outcomes_path: Path,
    elapsed: float,
) -> None:
    print(f"  {'target':<12}" + "".join(f"{name:>10}" for name in OUTCOMES))
    for target in targets:
        counts = Counter(r["outcome"] for r in records if r["target"] == target)
        print(f"  {target:<12}" + "".join(f"{counts[name]:>10}" for name in OUTCOMES))
    retries = sum(stats.retries for stats in metrics.snapshot().values())
    print(f"  retries {retries} (transient errors ridden out with the same Idempotency-Key)")
    gone = sorted({r["target"] for r in records if r["outcome"] == "gone"})
    if gone:
        print(f"  gone (410): {', '.join(gone)}: their remaining events were skipped")
    for record in [r for r in records if r["outcome"] == "failed"][:5]:
        print(f"  FAILED {record['target']}/{record['event']}: {record['detail']}")
    print(f"  outcomes written to {outcomes_path} ({len(records)} lines) in {elapsed:.2f} s")
    print("Run it again: every delivered event is replayed, nothing is delivered twice.")


if __name__ == "__main__":
    raise SystemExit(main())
