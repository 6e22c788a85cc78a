"""The run log of a RedisStore: a hash per run, its events in a string key, an index."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ...idempotency._store import Record
from ._model import CANCELLED, RUNNING, RunInfo, _Backend, _events, _float, _nodes, _routes

_BEGIN_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == ARGV[8] then return s end
if not s then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[3], KEYS[1])
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], 'flow', ARGV[1], 'run_id', ARGV[2], 'status', ARGV[7],
  'updated_at', ARGV[3], 'lease_expires_at', ARGV[4], 'holder', ARGV[5], 'nodes', ARGV[6])
redis.call('HDEL', KEYS[1], 'ended_at')
return s or ''
"""

_APPEND_LUA = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return '' end
if ARGV[1] ~= '' then redis.call('APPEND', KEYS[2], ARGV[1]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2], 'lease_expires_at', ARGV[3])
if ARGV[4] ~= '' and s ~= ARGV[5] then
  redis.call('HSET', KEYS[1], 'status', ARGV[4], 'ended_at', ARGV[2])
  s = ARGV[4]
end
return s
"""


def _glob(text: str) -> str:
    """`text` escaped for a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


class _Redis(_Backend):
    def __init__(self, store: Any) -> None:
        self._keep(store)
        prefix = store.prefix
        self.index = f"{prefix}~runs~"
        self.begin_script: Any = None
        self.append_script: Any = None

    @contextmanager
    def _client(self) -> Iterator[Any]:
        scripts = self.store._enter(False)
        try:
            yield scripts.client
        finally:
            scripts.slots.release()

    def _keys(self, flow: str, run_id: str) -> list[str]:
        tail = f"{len(flow)}:{flow}:{run_id}"
        prefix = self.store.prefix
        return [f"{prefix}~run~:{tail}", f"{prefix}~run-events~:{tail}", self.index]

    def _script(self, client: Any, which: str) -> Any:
        if which == "begin":
            if self.begin_script is None:
                self.begin_script = client.register_script(_BEGIN_LUA)
            return self.begin_script
        if self.append_script is None:
            self.append_script = client.register_script(_APPEND_LUA)
        return self.append_script

    def begin(
        self, flow: str, run_id: str, now: float, lease: float, holder: str, nodes: str
    ) -> str | None:
        from ...idempotency._redis_clients import text

        with self._client() as client:
            reply = self._script(client, "begin")(
                keys=self._keys(flow, run_id),
                args=[flow, run_id, repr(now), repr(lease), holder, nodes, RUNNING, CANCELLED],
                client=client,
            )
        previous = text(reply)
        return previous or None

    def append(
        self,
        flow: str,
        run_id: str,
        lines: str,
        now: float,
        lease: float,
        status: str | None = None,
    ) -> str | None:
        from ...idempotency._redis_clients import text

        with self._client() as client:
            reply = self._script(client, "append")(
                keys=self._keys(flow, run_id)[:2],
                args=[lines, repr(now), repr(lease), status or "", CANCELLED],
                client=client,
            )
        return text(reply) or None

    def _read(self, client: Any, row_keys: list[str], events: bool) -> list[RunInfo]:
        from ...idempotency._redis_clients import text

        with client.pipeline(transaction=False) as pipe:
            for key in row_keys:
                pipe.hgetall(key)
            rows = pipe.execute()
        out = []
        gone = []
        for key, raw in zip(row_keys, rows, strict=True):
            if not raw:
                gone.append(key)
                continue
            row = {text(k): text(v) for k, v in raw.items()}
            info = RunInfo(
                row.get("flow", ""),
                row.get("run_id", ""),
                row.get("status", ""),
                float(row.get("started_at", 0.0)),
                _float(row.get("ended_at")),
                float(row.get("updated_at", 0.0)),
                float(row.get("lease_expires_at", 0.0)),
                row.get("holder"),
                _nodes(row.get("nodes")),
                None,
                _routes(row.get("nodes")),
            )
            if events:
                raw_events = client.get(self._keys(info.flow, info.run_id)[1])
                info.events = _events(None if raw_events is None else text(raw_events))
            out.append(info)
        if gone:
            client.zrem(self.index, *gone)
        return out

    def runs(
        self,
        *,
        flow: str | None = None,
        run_id: str | None = None,
        since: float | None = None,
        events: bool = False,
    ) -> list[RunInfo]:
        from ...idempotency._redis_clients import text

        with self._client() as client:
            if flow is not None and run_id is not None:
                keys = [self._keys(flow, run_id)[0]]
            else:
                low = "-inf" if since is None else repr(since)
                keys = [text(k) for k in client.zrangebyscore(self.index, low, "+inf")]
            infos = self._read(client, keys, events)
        return [
            info
            for info in infos
            if (flow is None or info.flow == flow) and (run_id is None or info.run_id == run_id)
        ]

    def set_status(self, flow: str, run_id: str, status: str) -> bool:
        key = self._keys(flow, run_id)[0]
        with self._client() as client:
            if not client.exists(key):
                return False
            client.hset(key, "status", status)
            return True

    def delete(self, flow: str, run_id: str) -> bool:
        row, events, index = self._keys(flow, run_id)
        with self._client() as client:
            gone = int(client.delete(row, events))
            client.zrem(index, row)
        return gone > 0

    def _records(self, client: Any) -> Iterator[tuple[str, dict[str, str]]]:
        """Every record hash under the store's prefix (not the run log's keys, nor meta)."""
        from ...idempotency._redis_clients import text

        prefix = self.store.prefix
        skip = (f"{prefix}~run", f"{prefix}meta")
        keys = [
            k
            for k in (text(raw) for raw in client.scan_iter(match=_glob(prefix) + "*", count=1000))
            if not k.startswith(skip)
        ]
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            with client.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.hgetall(key)
                replies = pipe.execute(raise_on_error=False)
            for key, raw in zip(chunk, replies, strict=True):
                if isinstance(raw, dict) and raw:
                    fields = {text(k): text(v) for k, v in raw.items()}
                    if "key_digest" in fields:
                        yield key, fields

    def stats(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        with self._client() as client:
            for _, fields in self._records(client):
                slot = (fields.get("namespace", "?"), fields.get("state", "?"))
                counts[slot] = counts.get(slot, 0) + 1
        return counts

    def find(self, prefix: str) -> list[Record]:
        from ...idempotency._base import record_from_fields

        out = []
        with self._client() as client:
            for _, fields in self._records(client):
                if fields["key_digest"].startswith(prefix):
                    out.append(record_from_fields(fields, self.store._name))
        return sorted(out, key=lambda r: (r.namespace, r.scope, r.key_digest))
