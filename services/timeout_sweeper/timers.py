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
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a crash of the process, cheap commits
        self.db.execute("CREATE TABLE IF NOT EXISTS timers (message_id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL,"
                        " kind TEXT NOT NULL, since_sequence INTEGER NOT NULL, due REAL NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS timers_due ON timers (due)")
        # Highest status-record sequence seen per message: a redelivered or older record changes nothing.
        self.db.execute("CREATE TABLE IF NOT EXISTS positions (message_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL)")

    def apply(self, records: list[tuple[dict, float]], timeouts: TimeoutSettings) -> None:
        """Applies a batch of status records in one transaction: read the batch's messages once, fold their
        records in memory (in sequence order, skipping any already applied), write back once."""
        by_message: dict[str, list[tuple[dict, float]]] = {}
        for record, occurred_at in records:
            by_message.setdefault(record["message_id"], []).append((record, occurred_at))
        ids = list(by_message)
        with self.db:
            self.db.execute("BEGIN")
            positions: dict[str, int] = {}
            timers: dict[str, Timer] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                positions.update(self.db.execute(
                    f"SELECT message_id, sequence FROM positions WHERE message_id IN ({marks})", chunk).fetchall())
                timers.update((row[0], Timer(*row)) for row in self.db.execute(
                    "SELECT message_id, campaign_id, kind, since_sequence, due FROM timers "
                    f"WHERE message_id IN ({marks})", chunk))
            new_positions, upserts, deletes = [], [], []
            for mid, items in by_message.items():
                position = positions.get(mid, -1)
                current = timers.get(mid)
                changed = False
                for record, occurred_at in sorted(items, key=lambda item: item[0]["sequence"]):
                    if record["sequence"] <= position:
                        continue  # redelivered or older: applied already
                    position = record["sequence"]
                    changed = True
                    decided = timer_for(record, occurred_at, current, timeouts)
                    if decided is not False:
                        current = decided
                if not changed:
                    continue
                new_positions.append((mid, position))
                if current is None:
                    deletes.append((mid,))
                else:
                    upserts.append((current.message_id, current.campaign_id, current.kind, current.since_sequence,
                                    current.due))
            self.db.executemany("INSERT INTO positions VALUES (?, ?) ON CONFLICT (message_id) DO UPDATE "
                                "SET sequence = excluded.sequence", new_positions)
            self.db.executemany("DELETE FROM timers WHERE message_id = ?", deletes)
            self.db.executemany("INSERT OR REPLACE INTO timers VALUES (?, ?, ?, ?, ?)", upserts)

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
