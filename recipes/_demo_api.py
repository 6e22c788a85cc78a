"""The demo shop API the recipes talk to: `DemoAPI`, a `LocalAPI` with the shop's routes.

Routes: ``POST /charges`` (an effect: a charge), ``POST /refunds`` (an effect: a charge
refunded), ``POST /webhooks/<name>`` (an effect: a delivery, its ``X-Signature`` checked when a
secret is set, 410 once the target is gone, 403 for an order whose receipt is refused),
``GET /items?page=&per_page=`` (a seeded, paged dataset with ``Link: rel="next"``) and
``GET /enrich/<id>`` (a deterministic score for a record) — plus `LocalAPI`'s faults,
``Idempotency-Key`` handling, ledger and built-in routes. Run it alone with
``python -m recipes._demo_api --port 8000``.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import threading
from collections.abc import Sequence
from os import PathLike
from typing import Any

from nodekit.testing import APIRequest, APIResponse, FaultPlan, Ledger, LedgerEntry, LocalAPI
from nodekit.testing._faults import Fault
from nodekit.testing._server import cli, plan_from, serve

__all__ = ["DemoAPI", "DemoLedger", "main", "sign"]


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Signature`` value for a webhook body: ``sha256=<hex HMAC-SHA256>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class DemoLedger(Ledger):
    """A `Ledger` with queries in the shop's terms."""

    def charges_for(self, order_id: Any) -> list[LedgerEntry]:
        """The charges actually made for `order_id` (replays and faults excluded)."""
        return [
            entry
            for entry in self.find(route="POST /charges", effect=True)
            if entry.data.get("order_id") == order_id
        ]

    def deliveries(self, target: str) -> list[LedgerEntry]:
        """The webhook deliveries accepted for `target`."""
        return self.find(route=f"POST /webhooks/{target}", effect=True)

    def refunds_for(self, order_id: Any) -> list[LedgerEntry]:
        """The refunds actually made for `order_id` (replays and faults excluded)."""
        return [
            entry
            for entry in self.find(route="POST /refunds", effect=True)
            if entry.data.get("order_id") == order_id
        ]


class DemoAPI(LocalAPI):
    """The shop API on 127.0.0.1: ``with DemoAPI(faults=FaultPlan(seed=1)) as api:``.

    `webhook_secret` makes ``POST /webhooks/<name>`` verify ``X-Signature`` (see `sign`);
    `items` and `seed` shape the ``/items`` dataset. The other options are `LocalAPI`'s.
    """

    ledger_type = DemoLedger
    ledger: DemoLedger

    def __init__(
        self,
        *,
        faults: FaultPlan | None = None,
        ledger_path: str | PathLike[str] | None = None,
        webhook_secret: str | bytes | None = None,
        items: int = 50,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(faults=faults, ledger_path=ledger_path, host=host, port=port)
        self.webhook_secret = (
            webhook_secret.encode() if isinstance(webhook_secret, str) else webhook_secret
        )
        self._shop_lock = threading.Lock()
        self._gone: set[str] = set()
        self._refused: set[Any] = set()
        self._charges: dict[str, dict[str, Any]] = {}
        self._outage: tuple[int, int] | None = None  # (after this many charges, requests)
        rng = random.Random(seed)
        categories = ("books", "games", "music", "tools", "garden")
        self.items = [
            {
                "id": i,
                "name": f"item-{i:03d}",
                "price": round(rng.uniform(1, 100), 2),
                "category": rng.choice(categories),
            }
            for i in range(1, items + 1)
        ]
        self.route("POST /charges", self._charge)
        self.route("POST /refunds", self._refund)
        self.route("POST /webhooks/{target}", self._webhook)
        self.route("GET /items", self._items)
        self.route("GET /enrich/{id}", _enrich)

    @classmethod
    def read_ledger(cls, path: str | PathLike[str]) -> DemoLedger:
        """The ledger a `DemoAPI` (maybe in another process) appended to `path`."""
        return DemoLedger.load(path)

    #: ``DemoAPI.sign(secret, body)``: the ``X-Signature`` a webhook sender must send.
    sign = staticmethod(sign)

    def gone(self, target: str) -> None:
        """Make ``POST /webhooks/<target>`` answer 410 Gone from now on."""
        with self._shop_lock:
            self._gone.add(target)

    def refuse_receipts(self, order_id: Any) -> None:
        """Refuse every receipt webhook for `order_id` with 403 from now on: it fails for good."""
        with self._shop_lock:
            self._refused.add(order_id)

    def outage(self, requests: int, *, after_charges: int = 0) -> None:
        """Go down: answer 503 (with the plan's Retry-After) to the next `requests` requests,
        on every route, starting once `after_charges` charges have been made."""
        if after_charges <= 0:
            self.fail_next(*_down(requests))
            return
        with self._shop_lock:
            self._outage = (after_charges, requests)

    def charges_for(self, order_id: Any) -> list[LedgerEntry]:
        """The charges actually made for `order_id` (see `DemoLedger.charges_for`)."""
        return self.ledger.charges_for(order_id)

    def deliveries(self, target: str) -> list[LedgerEntry]:
        """The webhook deliveries accepted for `target`."""
        return self.ledger.deliveries(target)

    # ------------------------------------------------------------------------ routes

    def _charge(self, request: APIRequest) -> APIResponse:
        try:
            payload = request.json()
            order_id, amount = payload["order_id"], payload["amount"]
        except (ValueError, TypeError, KeyError):
            return APIResponse(400, {"error": 'body must be {"order_id": ..., "amount": ...}'})
        with self._shop_lock:
            charge = {
                "id": f"ch_{len(self._charges) + 1:06d}",
                "order_id": order_id,
                "amount": amount,
            }
            self._charges[charge["id"]] = charge
            outage, made = self._outage, len(self._charges)
            if outage is not None and made >= outage[0]:
                self._outage = None
        if outage is not None and made >= outage[0]:
            self.fail_next(*_down(outage[1]))  # from the next request on
        return APIResponse(201, charge, effect=True, data=dict(charge))

    def _refund(self, request: APIRequest) -> APIResponse:
        try:
            payload = request.json()
            order_id, charge_id = payload["order_id"], payload["charge_id"]
        except (ValueError, TypeError, KeyError):
            return APIResponse(400, {"error": 'body must be {"order_id": ..., "charge_id": ...}'})
        with self._shop_lock:
            charge = self._charges.get(charge_id)
            if charge is None or charge["order_id"] != order_id:
                return APIResponse(404, {"error": "no such charge for this order"})
            refund = {"id": f"re_{charge_id}", "charge_id": charge_id, "order_id": order_id}
        return APIResponse(201, refund, effect=True, data=dict(refund))

    def _webhook(self, request: APIRequest) -> APIResponse:
        target = request.params["target"]
        with self._shop_lock:
            gone = target in self._gone
        if gone:
            return APIResponse(410, {"error": f"webhook target {target!r} is gone"})
        if self.webhook_secret is not None and not hmac.compare_digest(
            request.headers.get("x-signature", ""), sign(self.webhook_secret, request.body)
        ):
            return APIResponse(401, {"error": "bad or missing X-Signature"})
        try:
            event = request.json()
        except ValueError:
            return APIResponse(400, {"error": "body must be JSON"})
        with self._shop_lock:
            refused = isinstance(event, dict) and event.get("order_id") in self._refused
        if refused:
            return APIResponse(403, {"error": "receipt refused for this order"})
        count = len(self.ledger.deliveries(target)) + 1
        return APIResponse(
            200,
            {"target": target, "delivery": count},
            effect=True,
            data={"target": target, "event": event},
        )

    def _items(self, request: APIRequest) -> APIResponse:
        try:
            page = int(request.arg("page", "1"))
            per_page = int(request.arg("per_page", "10"))
        except ValueError:
            return APIResponse(400, {"error": "page and per_page are integers"})
        if page < 1 or not 1 <= per_page <= 100:
            return APIResponse(400, {"error": "page >= 1 and 1 <= per_page <= 100"})
        start = (page - 1) * per_page
        chunk = self.items[start : start + per_page]
        more = start + per_page < len(self.items)
        next_url = f"{self.url}/items?page={page + 1}&per_page={per_page}" if more else None
        headers = {"Link": f'<{next_url}>; rel="next"'} if next_url else {}
        return APIResponse(
            200,
            {
                "items": chunk,
                "page": page,
                "per_page": per_page,
                "total": len(self.items),
                "next": next_url,
            },
            headers,
        )


def _down(requests: int) -> list[Fault]:
    """The faults of an outage of `requests` requests: 503 with the plan's Retry-After."""
    return ["503"] * requests


def _enrich(request: APIRequest) -> APIResponse:
    item_id = request.params["id"]
    digest = hashlib.sha256(item_id.encode()).digest()
    tiers = ("bronze", "silver", "gold")
    return APIResponse(
        200,
        {
            "id": item_id,
            "score": digest[0] % 100,
            "tier": tiers[digest[1] % len(tiers)],
            "tags": sorted({f"tag-{b % 7}" for b in digest[2:5]}),
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the demo shop API until interrupted; prints its URL on the first line."""
    parser = cli("python -m recipes._demo_api", main.__doc__)
    parser.add_argument("--webhook-secret")
    parser.add_argument("--items", type=int, default=50)
    args = parser.parse_args(argv)
    api = DemoAPI(
        faults=plan_from(args),
        ledger_path=args.ledger,
        webhook_secret=args.webhook_secret,
        items=args.items,
        seed=args.seed,
        host=args.host,
        port=args.port,
    )
    return serve(api)


if __name__ == "__main__":
    raise SystemExit(main())
