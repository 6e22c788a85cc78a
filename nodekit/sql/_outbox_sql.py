"""The outbox table's SQL, for SQLite and PostgreSQL, in one place.

The table gains two columns for competing dispatchers: ``claimed_by`` (the dispatcher that
holds the message) and ``claim_expires`` (when that claim ends, in seconds since the epoch by
the *database's* clock, so that dispatchers on hosts with skewed clocks agree). Tables created
before them are migrated by adding the columns (nullable: an old row is simply unclaimed) and
a partial index on the pending rows; writers and readers of the old shape keep working.
"""

from __future__ import annotations

__all__ = ["CLAIM_COLUMNS", "OutboxSQL"]

# The database's clock, as seconds since the epoch (a float).
_NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgres": "extract(epoch from clock_timestamp())::float8",
}

#: Columns added to tables created before competing dispatchers: name -> type per dialect.
CLAIM_COLUMNS = {
    "claimed_by": {"sqlite": "TEXT", "postgres": "TEXT"},
    "claim_expires": {"sqlite": "REAL", "postgres": "DOUBLE PRECISION"},
}


class OutboxSQL:
    """Every statement on one outbox table, in one dialect's placeholders."""

    def __init__(self, table: str, dialect: str) -> None:
        self.table = table
        self.dialect = dialect
        self.mark = "?" if dialect == "sqlite" else "%s"
        self.now = _NOW[dialect]
        # an identifier of at most 63 characters whatever the table's name
        self.index = f"{table[:54]}_pending"

    # ------------------------------------------------------------------ shape

    @property
    def create(self) -> str:
        claims = ", ".join(f"{name} {kinds[self.dialect]}" for name, kinds in CLAIM_COLUMNS.items())
        if self.dialect == "sqlite":
            return (
                f"CREATE TABLE IF NOT EXISTS {self.table} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "topic TEXT NOT NULL, key TEXT NOT NULL UNIQUE, payload TEXT NOT NULL, "
                "created_at REAL NOT NULL, dispatched_at REAL, attempts INTEGER NOT NULL DEFAULT 0, "
                f"last_error TEXT, {claims})"
            )
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} (id BIGSERIAL PRIMARY KEY, "
            "topic TEXT NOT NULL, key TEXT NOT NULL UNIQUE, payload TEXT NOT NULL, "
            "created_at DOUBLE PRECISION NOT NULL, dispatched_at DOUBLE PRECISION, "
            f"attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, {claims})"
        )

    @property
    def columns(self) -> str:
        """The table's column names (one per row)."""
        if self.dialect == "sqlite":
            return f"SELECT name FROM pragma_table_info('{self.table}')"
        return (
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped"
        )

    def add_column(self, name: str) -> str:
        return f"ALTER TABLE {self.table} ADD COLUMN {name} {CLAIM_COLUMNS[name][self.dialect]}"

    @property
    def create_index(self) -> str:
        return (
            f"CREATE INDEX IF NOT EXISTS {self.index} ON {self.table} (id) "
            "WHERE dispatched_at IS NULL"
        )

    # ------------------------------------------------------------------ writing, reading

    @property
    def insert(self) -> str:
        m = self.mark
        return (
            f"INSERT INTO {self.table} (topic, key, payload, created_at) VALUES "
            f"({m}, {m}, {m}, {m}) ON CONFLICT (key) DO NOTHING"
        )

    @property
    def pending(self) -> str:
        return (
            f"SELECT id, topic, key, payload, attempts FROM {self.table} "
            f"WHERE dispatched_at IS NULL ORDER BY id LIMIT {self.mark}"
        )

    # ------------------------------------------------------------------ claims

    def _claimable(self, topic: bool) -> str:
        where = f"dispatched_at IS NULL AND (claim_expires IS NULL OR claim_expires < {self.now})"
        return where + (f" AND topic = {self.mark}" if topic else "")

    def claim(self, topic: bool) -> str:
        """PostgreSQL: claim up to LIMIT claimable rows in one statement, skipping locked ones.

        Parameters: owner, lease, [topic], limit. Concurrent claimers never wait for each other
        (``SKIP LOCKED``) and never take the same row: a row another claimer committed first is
        re-checked against the WHERE clause and no longer matches. The rows are picked in an
        ``ARRAY(...)`` sub-select, which PostgreSQL runs exactly once (an InitPlan) whatever
        plan it chooses: an ``IN (SELECT …)`` may be re-run per row by a plan made while the
        table was small, locking rows over and over.
        """
        return (
            f"UPDATE {self.table} SET claimed_by = %s, claim_expires = {self.now} + %s "
            f"WHERE id = ANY(ARRAY(SELECT id FROM {self.table} WHERE {self._claimable(topic)} "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)) "
            "RETURNING id, topic, key, payload, attempts"
        )

    def claimable(self, topic: bool) -> str:
        """SQLite (inside BEGIN IMMEDIATE): the rows to claim. Parameters: [topic], limit."""
        return (
            f"SELECT id, topic, key, payload, attempts FROM {self.table} "
            f"WHERE {self._claimable(topic)} ORDER BY id LIMIT ?"
        )

    def take(self, count: int) -> str:
        """SQLite: claim the rows `claimable` returned. Parameters: owner, lease, *ids."""
        return (
            f"UPDATE {self.table} SET claimed_by = ?, claim_expires = {self.now} + ? "
            f"WHERE id IN {self._ids(count)}"
        )

    @property
    def owners(self) -> str:
        """The dispatchers holding live claims (to find those whose process is gone)."""
        return (
            f"SELECT DISTINCT claimed_by FROM {self.table} WHERE dispatched_at IS NULL "
            f"AND claimed_by IS NOT NULL AND claim_expires >= {self.now}"
        )

    @property
    def free_owner(self) -> str:
        """Give back every claim of one (dead) dispatcher. Parameter: owner."""
        return (
            f"UPDATE {self.table} SET claimed_by = NULL, claim_expires = NULL "
            f"WHERE claimed_by = {self.mark} AND dispatched_at IS NULL"
        )

    def _ids(self, count: int) -> str:
        return "(" + ", ".join([self.mark] * count) + ")"

    def _held(self, count: int) -> str:
        # every settling statement is fenced: only the claim's holder may settle it
        return f"claimed_by = {self.mark} AND dispatched_at IS NULL AND id IN {self._ids(count)}"

    def done(self, count: int) -> str:
        """Mark delivered and release. Parameters: dispatched_at, owner, *ids."""
        return (
            f"UPDATE {self.table} SET dispatched_at = {self.mark}, attempts = attempts + 1, "
            f"claimed_by = NULL, claim_expires = NULL WHERE {self._held(count)}"
        )

    @property
    def failed(self) -> str:
        """Record a failed delivery and release, not claimable for `delay` seconds.

        Parameters: last_error, delay, delay, owner, id.
        """
        m = self.mark
        return (
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = {m}, "
            f"claimed_by = NULL, claim_expires = CASE WHEN {m} > 0 THEN {self.now} + {m} END "
            f"WHERE {self._held(1)}"
        )

    def release(self, count: int) -> str:
        """Give back undelivered messages at once. Parameters: owner, *ids."""
        return (
            f"UPDATE {self.table} SET claimed_by = NULL, claim_expires = NULL "
            f"WHERE {self._held(count)}"
        )

    def extend(self, count: int) -> str:
        """Renew the lease of messages still held. Parameters: lease, owner, *ids."""
        return (
            f"UPDATE {self.table} SET claim_expires = {self.now} + {self.mark} "
            f"WHERE {self._held(count)}"
        )

    def held(self, count: int) -> str:
        """Which of these messages the owner still holds. Parameters: owner, *ids."""
        return f"SELECT id FROM {self.table} WHERE {self._held(count)}"
