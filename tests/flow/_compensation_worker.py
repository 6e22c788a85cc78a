"""A durable saga run in a subprocess that the compensation crash tests SIGKILL at random points.

``python _compensation_worker.py STORE RUN_ID API_URL`` (or forked by
``python _compensation_worker.py --zygote``, see `zygote`): STORE is a store URL, or
``DSN|SCHEMA`` for PostgreSQL. ``reserve`` and ``charge`` POST to the API (keyed by their
journal entries), ``receipt`` fails for good, so the run compensates: ``refund`` then
``release`` POST to the API with the compensation's own key (``nodekit.http`` sends it), a
short pause before and after each, where the test's SIGKILL may land. The API deduplicates by
``Idempotency-Key``, so its ledger shows each effect once however often it was sent. When the
run ends with its `FlowError`, the worker prints what was compensated as JSON and exits 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import httpx

import nodekit as nk
from nodekit import http as nkhttp

PAUSE = 0.02
LEASE = 0.5


class ReceiptRefused(Exception):
    """The receipt service refused the order for good."""


def build(api_url: str) -> nk.Flow[dict[str, Any]]:
    flow = nk.Flow(
        "shop",
        lease=LEASE,
        resources={"http": lambda: httpx.Client(base_url=api_url, timeout=5.0)},
    )

    def post(http: httpx.Client, route: str) -> None:
        time.sleep(PAUSE)
        nkhttp.post(http, route, json={"run": nk.context().run_id})
        time.sleep(PAUSE)

    def release(result: Any, http: httpx.Client) -> None:
        post(http, "/releases")

    def refund(result: Any, http: httpx.Client) -> None:
        assert result == "ch"
        post(http, "/refunds")

    @flow.node(compensate=release)
    def reserve(http: httpx.Client) -> dict[str, Any]:
        post(http, "/reserve")
        return {"reserved": True}

    @flow.node(after=reserve, output="charge_id", compensate=refund)
    def charge(http: httpx.Client) -> str:
        post(http, "/charges")
        return "ch"

    @flow.node(after=charge)
    def receipt(charge_id: str) -> None:
        raise ReceiptRefused("the receipt service refused the order")

    return flow


def open_store(spec: str) -> Any:
    if "|" in spec:
        from nodekit.idempotency.postgres import PostgresStore

        dsn, schema = spec.split("|", 1)
        return PostgresStore(dsn, schema=schema)
    return nk.open_store(spec)


def zygote() -> None:
    """Fork a worker per request: a fresh process started in milliseconds (this one imported
    everything once), so that the crash tests' many kills and resumes stay quick.

    Reads JSON lines from stdin: ``["run", STORE, RUN_ID, API_URL, OUT]`` forks a child that
    runs `main` with those arguments, its stdout going to the file OUT, and answers ``pid N``;
    ``["wait", N]`` waits for child N and answers ``exit N CODE`` (-9 for a SIGKILL).
    """
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request[0] == "wait":
            _, status = os.waitpid(int(request[1]), 0)
            print(f"exit {request[1]} {os.waitstatus_to_exitcode(status)}", flush=True)
            continue
        spec, run_id, api_url, out = request[1:5]
        pid = os.fork()
        if pid == 0:  # the child: run the saga, never return into the loop
            code = 1
            try:
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.argv = [sys.argv[0], spec, run_id, api_url]
                code = main()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)


def main() -> int:
    spec, run_id, api_url = sys.argv[1:4]
    store = open_store(spec)
    flow = build(api_url)
    try:
        while True:
            try:
                flow.run({}, run_id=run_id, store=store)
            except nk.FlowError as exc:
                if isinstance(exc.__cause__, nk.IdempotencyInProgress):
                    time.sleep(0.05)  # a killed run's lease has not expired yet
                    continue
                outcome = {
                    "compensated": list(exc.compensated),
                    "not_compensated": dict(exc.not_compensated),
                }
                print(json.dumps(outcome, sort_keys=True), flush=True)
                return 0
            print("completed?", flush=True)
            return 1
    finally:
        store.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        raise SystemExit(main())
