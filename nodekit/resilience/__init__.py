"""Resilience middleware around a node's attempts: circuit breaker, rate limit, bulkhead,
and a fallback around the whole call.

Layers, outermost first: fallback, idempotency, total timeout, retry, then per attempt:
circuit breaker, rate limit, bulkhead, attempt timeout. The primitives keep their state
behind one small backend protocol each (`_state.py`, with the in-memory backends). Shared
across processes, the same protocols run on a store: `_shared.py` (the local cache of a
healthy breaker, leased bulkhead slots, the failure policy), the rules over one JSON document
(`_rules.py`, `_docs.py`) and one module per store (`_sqlite.py`, `_redis.py`,
`_postgres.py`).
"""

from ._breaker import CircuitBreaker
from ._bulkhead import Bulkhead
from ._compile import compile_resilience
from ._fallback import falls_back
from ._limiter import RateLimit

__all__ = ["Bulkhead", "CircuitBreaker", "RateLimit", "compile_resilience", "falls_back"]
