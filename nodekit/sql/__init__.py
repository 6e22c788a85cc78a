"""Exactly-once database effects: the key is recorded in the same transaction as the write.

`transactional` makes a node's database effect happen exactly once per key: the key's row
and the user's writes commit or roll back together, and a repeat returns the stored result
without running. `Outbox` writes a message in the same transaction as the row and dispatches
it afterwards with a stable key, so a crash between the two delays the call but never loses
or duplicates it; any number of `Dispatcher`s (threads, processes: ``nodekit outbox run``,
hosts) share one outbox, each message claimed by one of them at a time. `transactional` works
with `sqlite3`, psycopg 3, SQLAlchemy (sync and async sessions, connections, engines) and
asyncpg, and with pools (`psycopg_pool`, SQLAlchemy engines and session factories,
`asyncpg.Pool`), which lend a connection per attempt; the outbox with `sqlite3` and psycopg 3.
"""

from ._dispatch import Dispatcher
from ._outbox import Message, Outbox
from ._transactional import transactional

__all__ = ["Dispatcher", "Message", "Outbox", "transactional"]
