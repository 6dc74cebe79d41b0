"""Durable timers in one SQLite table: one row per message with a pending deadline.

No task per timer: a due-time index is polled, so 100,000 pending timers cost one table, not 100,000
coroutines. A timer lapses when the message moves on (its row is replaced or deleted).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Timer:
    message_id: str
    campaign_id: str
    kind: str  # sending | sent | retry_window
    since_sequence: int
    due: float  # epoch seconds


@dataclass(frozen=True)
class TimeoutSettings:
    sending_s: float
    sent_s: float
    retry_window_s: float


def timer_for(record: dict, occurred_at: float, current: Timer | None, timeouts: TimeoutSettings) -> Timer | None | bool:
    """What a status record does to the message's timer: a new Timer, None (cancel), or False (keep as is)."""
    status, previous = record["status"], record.get("previous_status")
    base = dict(message_id=record["message_id"], campaign_id=record["campaign_id"], since_sequence=record["sequence"])
    if status == "sending":
        if previous == "sending" and current is not None and current.kind == "sending":
            # A failed pre-send attempt: the Sending limit still runs from the claim.
            return Timer(kind="sending", due=current.due, **base)
        return Timer(kind="sending", due=occurred_at + timeouts.sending_s, **base)
    if status == "sent":
        return Timer(kind="sent", due=occurred_at + timeouts.sent_s, **base)
    if status == "retrying":
        if current is not None and current.kind == "retry_window":
            return Timer(kind="retry_window", due=current.due, **base)  # the window runs from the first deferral
        return Timer(kind="retry_window", due=occurred_at + timeouts.retry_window_s, **base)
    return None


class TimerStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS timers (message_id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL,"
                        " kind TEXT NOT NULL, since_sequence INTEGER NOT NULL, due REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS timers_due ON timers (due)")
        # Highest status-record sequence seen per message: a redelivered or older record changes nothing.
        self.db.execute("CREATE TABLE IF NOT EXISTS positions (message_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL)")

    def apply(self, records: list[tuple[dict, float]], timeouts: TimeoutSettings) -> None:
        """Applies a batch of status records in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            for record, occurred_at in records:
                mid = record["message_id"]
                row = self.db.execute("SELECT sequence FROM positions WHERE message_id = ?", (mid,)).fetchone()
                if row and row[0] >= record["sequence"]:
                    continue
                self.db.execute("INSERT INTO positions VALUES (?, ?) ON CONFLICT (message_id) DO UPDATE "
                                "SET sequence = excluded.sequence", (mid, record["sequence"]))
                current = self.get(mid)
                decided = timer_for(record, occurred_at, current, timeouts)
                if decided is None:
                    self.db.execute("DELETE FROM timers WHERE message_id = ?", (mid,))
                elif decided is not False:
                    self.db.execute("INSERT OR REPLACE INTO timers VALUES (?, ?, ?, ?, ?)",
                                    (decided.message_id, decided.campaign_id, decided.kind,
                                     decided.since_sequence, decided.due))

    def get(self, message_id: str) -> Timer | None:
        row = self.db.execute("SELECT message_id, campaign_id, kind, since_sequence, due FROM timers "
                              "WHERE message_id = ?", (message_id,)).fetchone()
        return Timer(*row) if row else None

    def due(self, now: float, limit: int = 1000) -> list[Timer]:
        rows = self.db.execute("SELECT message_id, campaign_id, kind, since_sequence, due FROM timers "
                               "WHERE due <= ? ORDER BY due LIMIT ?", (now, limit)).fetchall()
        return [Timer(*r) for r in rows]

    def fired(self, timers: list[Timer]) -> None:
        """Forget fired timers (only if unchanged since they were read)."""
        with self.db:
            self.db.executemany("DELETE FROM timers WHERE message_id = ? AND since_sequence = ?",
                                [(t.message_id, t.since_sequence) for t in timers])

    def pending(self) -> int:
        return self.db.execute("SELECT count(*) FROM timers").fetchone()[0]

    def close(self) -> None:
        self.db.close()
