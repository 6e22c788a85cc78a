"""Exactly-once database effects: the key is recorded in the same transaction as the write.

`transactional` makes a node's database effect happen exactly once per key: the key's row
and the user's writes commit or roll back together, and a repeat returns the stored result
without running. `Outbox` writes a message in the same transaction as the row and dispatches
it afterwards with a stable key, so a crash between the two delays the call but never loses
or duplicates it. Works with `sqlite3` and psycopg 3 connections (sync), and psycopg's
`AsyncConnection` for ``async def`` nodes.
"""

from ._outbox import Message, Outbox
from ._transactional import transactional

__all__ = ["Message", "Outbox", "transactional"]
