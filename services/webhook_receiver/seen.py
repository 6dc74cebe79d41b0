"""The provider event ids already published, shared by every webhook receiver instance: SendGrid retries a
batch it got no 2xx for (for up to three days), and the retry may reach another instance; an inbound STOP /
START (by MessageSid) must act once, whoever replays it, before a restart of the receiver or after
(routes.event_key names the ids).

A table in the event store's database (`outreach_webhook_events` on PostgreSQL; a SQLite file beside the
event store on one machine): `seen(ids)` before publishing, `record(ids)` once the broker acknowledged,
so a receiver killed in between lets the retry through (at least once: two instances given the same retry
at the same moment may both publish it, which the handler's rules absorb). Rows older than
`KEEP_S` are pruned now and then.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.common.connections import ReconnectingConnection
from services.common.settings import Settings
from services.common.sqlite import open_sqlite

KEEP_S = 4 * 24 * 3600.0  # SendGrid retries for up to 72 hours
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class _Dialect:
    table: str
    placeholder: str
    real: str
    begin: str


SQLITE = _Dialect(table="webhook_events", placeholder="?", real="REAL", begin="BEGIN IMMEDIATE")
POSTGRES = _Dialect(table="outreach_webhook_events", placeholder="%s", real="DOUBLE PRECISION", begin="BEGIN")


class SeenEventStore:
    def __init__(self, connect: Callable[[], Any], dialect: _Dialect, clock: Callable[[], float] = time.time):
        self._connection = ReconnectingConnection(connect)
        self._dialect = dialect
        self._lock = threading.Lock()
        self._clock = clock
        self._pruned_at = 0.0
        with self._lock, self._connection.reconnecting():
            self._connection.db.execute(f"CREATE TABLE IF NOT EXISTS {dialect.table} "
                                        f"(event_id TEXT PRIMARY KEY, seen_at {dialect.real} NOT NULL)")

    def seen(self, event_ids: Iterable[str]) -> set[str]:
        """Those of `event_ids` published before (by any instance)."""
        ids = list(event_ids)
        t, p = self._dialect.table, self._dialect.placeholder
        found: set[str] = set()
        with self._lock, self._connection.reconnecting():
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                found.update(row[0] for row in self._connection.db.execute(
                    f"SELECT event_id FROM {t} WHERE event_id IN ({', '.join([p] * len(chunk))})", chunk))
        return found

    def record(self, event_ids: Iterable[str]) -> None:
        """`event_ids` are published: a retry of them anywhere is skipped."""
        t, p = self._dialect.table, self._dialect.placeholder
        now = self._clock()
        rows = [(event_id, now) for event_id in event_ids]
        prune = now - self._pruned_at > PRUNE_EVERY_S
        if not rows and not prune:
            return

        def work(cursor: Any) -> None:
            if rows:
                cursor.executemany(f"INSERT INTO {t} (event_id, seen_at) VALUES ({p}, {p}) "
                                   "ON CONFLICT (event_id) DO NOTHING", rows)
            if prune:
                cursor.execute(f"DELETE FROM {t} WHERE seen_at < {p}", (now - KEEP_S,))

        with self._lock:
            self._connection.transaction(self._dialect.begin, work)
        if prune:
            self._pruned_at = now

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def open_seen_store(settings: Settings) -> SeenEventStore:
    if settings.event_store == "postgres":
        import psycopg

        return SeenEventStore(lambda: psycopg.connect(settings.postgres_dsn, autocommit=True, connect_timeout=5),
                              POSTGRES)
    return SeenEventStore(lambda: open_sqlite(settings.event_store_sqlite_path.with_suffix(".webhooks.db")), SQLITE)
