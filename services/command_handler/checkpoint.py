"""The relay's durable position in the notification log, and how many campaign-event records it has
published since the broker was last found empty (to notice a new, empty broker)."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import Settings


@dataclass
class Checkpoint:
    position: int = 0  # last notification id published and acknowledged
    published: int = 0  # campaign-event records acknowledged since the last rewind


class SqliteCheckpointStore:
    def __init__(self, path: Path, name: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # saved from a worker thread
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS relay_checkpoint "
                         "(name TEXT PRIMARY KEY, position INTEGER NOT NULL, published INTEGER NOT NULL)")
        self._name = name

    def load(self) -> Checkpoint:
        row = self._db.execute("SELECT position, published FROM relay_checkpoint WHERE name = ?",
                               (self._name,)).fetchone()
        return Checkpoint(*row) if row else Checkpoint()

    def save(self, checkpoint: Checkpoint) -> None:
        self._db.execute("INSERT INTO relay_checkpoint (name, position, published) VALUES (?, ?, ?) "
                         "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
                         "published = excluded.published", (self._name, checkpoint.position, checkpoint.published))

    def close(self) -> None:
        self._db.close()


class PostgresCheckpointStore:
    def __init__(self, dsn: str, name: str):
        import psycopg

        self._db = psycopg.connect(dsn, autocommit=True)
        self._db.execute("CREATE TABLE IF NOT EXISTS outreach_relay_checkpoint "
                         "(name TEXT PRIMARY KEY, position BIGINT NOT NULL, published BIGINT NOT NULL)")
        self._name = name

    def load(self) -> Checkpoint:
        row = self._db.execute("SELECT position, published FROM outreach_relay_checkpoint WHERE name = %s",
                               (self._name,)).fetchone()
        return Checkpoint(*row) if row else Checkpoint()

    def save(self, checkpoint: Checkpoint) -> None:
        self._db.execute("INSERT INTO outreach_relay_checkpoint (name, position, published) VALUES (%s, %s, %s) "
                         "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
                         "published = excluded.published", (self._name, checkpoint.position, checkpoint.published))

    def close(self) -> None:
        self._db.close()


def open_checkpoint_store(settings: Settings, name: str = "relay"):
    if settings.event_store == "postgres":
        return PostgresCheckpointStore(settings.postgres_dsn, name)
    return SqliteCheckpointStore(settings.event_store_sqlite_path.with_suffix(".relay.db"), name)
