"""The relay's durable position in the notification log, and how many campaign-event records it has
published since the broker was last found empty (to notice a new, empty broker).

Kept next to the event store: a SQLite file beside it, or a table in its PostgreSQL database. Losing the
last save only makes the relay publish a page again (consumers dedupe on event_id).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.connections import ReconnectingConnection
from services.common.settings import Settings
from services.common.sqlite import open_sqlite


@dataclass
class Checkpoint:
    position: int = 0  # last notification id published and acknowledged
    published: int = 0  # campaign-event records acknowledged since the last rewind


@dataclass(frozen=True)
class _Dialect:
    table: str
    integer: str
    placeholder: str


SQLITE = _Dialect(table="relay_checkpoint", integer="INTEGER", placeholder="?")
POSTGRES = _Dialect(table="outreach_relay_checkpoint", integer="BIGINT", placeholder="%s")


class CheckpointStore:
    """One row per relay `name`, on an autocommit DB-API connection (sqlite3 or psycopg) that `connect`
    makes, and makes again after it failed for a transient reason (a PostgreSQL restart kills it for good;
    the failing call raises and the relay tries its page again)."""

    def __init__(self, connect: Callable[[], Any], dialect: _Dialect, name: str):
        table, p = dialect.table, dialect.placeholder
        self._connection = ReconnectingConnection(connect)
        self._name = name
        self._execute(f"CREATE TABLE IF NOT EXISTS {table} "
                      f"(name TEXT PRIMARY KEY, position {dialect.integer} NOT NULL, "
                      f"published {dialect.integer} NOT NULL)")
        self._select = f"SELECT position, published FROM {table} WHERE name = {p}"
        self._upsert = (f"INSERT INTO {table} (name, position, published) VALUES ({p}, {p}, {p}) "
                        "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
                        "published = excluded.published")

    def _execute(self, statement: str, params: tuple = ()) -> Any:
        with self._connection.reconnecting():
            return self._connection.db.execute(statement, params)

    def load(self) -> Checkpoint:
        row = self._execute(self._select, (self._name,)).fetchone()
        return Checkpoint(*row) if row else Checkpoint()

    def save(self, checkpoint: Checkpoint) -> None:  # called from a worker thread
        self._execute(self._upsert, (self._name, checkpoint.position, checkpoint.published))

    def close(self) -> None:
        self._connection.close()

    def load_and_close(self) -> Checkpoint:
        """One look (a standby relay's lag metric), on this store's own connection."""
        try:
            return self.load()
        finally:
            self.close()


def open_checkpoint_store(settings: Settings, name: str = "relay") -> CheckpointStore:
    if settings.event_store == "postgres":
        import psycopg

        return CheckpointStore(lambda: psycopg.connect(settings.postgres_dsn, autocommit=True, connect_timeout=5),
                               POSTGRES, name)
    return CheckpointStore(lambda: open_sqlite(settings.event_store_sqlite_path.with_suffix(".relay.db")),
                           SQLITE, name)
