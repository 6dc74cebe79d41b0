"""Durable timers in one SQLite table: one row per message with a pending deadline.

No task per timer: a due-time index is polled, so 100,000 pending timers cost one table, not 100,000
coroutines. A timer lapses when the message moves on (its row is replaced or deleted).

Kinds (the contract's "Timers start at the recorded transition"):
- `sending` from the claim (the `sending` record) until the provider accepts; a failed pre-send attempt
  keeps the deadline of the claim.
- `sent` from the recorded `sent` (SMS).
- `retry_window` from the first deferral (`retrying`), and for an email the provider accepted without an
  outcome: acceptance makes no status record, so when an email's `sending` timer fires the row is re-armed
  as `retry_window` (same since_sequence). The handler judges both expiries: it fails a still-unaccepted
  email `timed_out` on the first and ignores the second after that record; it ignores the first for an
  accepted email and fails it `expired` on the second.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AwareDatetime, ConfigDict, Field, StrictInt, TypeAdapter, with_config
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

from schemas.commands import Channel, WireId
from schemas.events import MessageStatus
from services.common.sqlite import open_sqlite

_COLUMNS = "message_id, campaign_id, kind, since_sequence, due, channel"


@dataclass(frozen=True)
class Timer:
    message_id: str
    campaign_id: str
    kind: str  # sending | sent | retry_window
    since_sequence: int
    due: float  # epoch seconds
    channel: str = ""  # sms | email ("" in rows written before the column existed)


@with_config(ConfigDict(extra="ignore"))
class StatusRecord(TypedDict):
    """The part of a `MessageStatusChanged` record (schemas/events.py) the timers read, with its field types;
    the other fields are ignored, so a record the sweeper cannot use is the only poison it skips.

    A TypedDict, not a model: the sweeper parses every status record, and building a model instance
    costs more than validating the fields (1.0 against 1.7 us a record)."""

    message_id: WireId
    campaign_id: WireId
    channel: Channel
    status: MessageStatus
    previous_status: MessageStatus | None
    sequence: Annotated[StrictInt, Field(ge=0)]
    occurred_at: AwareDatetime  # only its instant is read: no conversion to UTC needed (a Python call per record)


STATUS_RECORD = TypeAdapter(StatusRecord)


@dataclass(frozen=True)
class TimeoutSettings:
    sending_s: float
    sent_s: float
    retry_window_s: float


def timer_for(record: StatusRecord, current: Timer | None, timeouts: TimeoutSettings) -> Timer | None:
    """The message's timer after a status record: a Timer, or None (no deadline runs)."""
    status, previous, occurred_at = record["status"], record["previous_status"], record["occurred_at"].timestamp()
    base = dict(message_id=record["message_id"], campaign_id=record["campaign_id"],
                since_sequence=record["sequence"], channel=record["channel"])
    if status == "sending":
        if previous == "sending" and current is not None and current.kind == "sending":
            # A failed pre-send attempt: the Sending limit still runs from the claim.
            return Timer(kind="sending", due=current.due, **base)
        return Timer(kind="sending", due=occurred_at + timeouts.sending_s, **base)
    if status == "sent":
        return Timer(kind="sent", due=occurred_at + timeouts.sent_s, **base)
    if status == "retrying":
        if previous == "retrying" and current is not None and current.kind == "retry_window":
            return Timer(kind="retry_window", due=current.due, **base)  # the window runs from the first deferral
        # The first deferral (this replaces an accepted email's re-armed window: the window starts here).
        return Timer(kind="retry_window", due=occurred_at + timeouts.retry_window_s, **base)
    return None


def after_firing(timer: Timer, timeouts: TimeoutSettings) -> Timer | None:
    """What is left of a timer once its expiry is published: None (forget it), or the same message's next
    deadline if nothing else will come. An email's `sending` timer becomes its accepted-without-outcome
    window, counted from the Sending deadline (by then the provider had accepted it, or the expiry fails it
    `timed_out` and that record lapses the window): so the window never closes before it ran in full."""
    # "" is a row from before timers knew their channel: re-armed too (the handler ignores a window for an
    # SMS, which its Sending expiry has failed already).
    if timer.kind == "sending" and timer.channel in ("email", ""):
        return Timer(timer.message_id, timer.campaign_id, "retry_window", timer.since_sequence,
                     timer.due + timeouts.retry_window_s, timer.channel)
    return None


class TimerStore:
    """The timers table. One connection, used from the event loop and from worker threads: a lock keeps
    each method's transaction whole."""

    def __init__(self, path: Path):
        self._lock = threading.Lock()
        self.db = open_sqlite(path)  # WAL, synchronous=NORMAL: survives a crash of the process, cheap commits
        self.db.execute("CREATE TABLE IF NOT EXISTS timers (message_id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL,"
                        " kind TEXT NOT NULL, since_sequence INTEGER NOT NULL, due REAL NOT NULL,"
                        " channel TEXT NOT NULL DEFAULT '')")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(timers)")}
        if "channel" not in columns:  # a data dir from before timers knew their channel
            self.db.execute("ALTER TABLE timers ADD COLUMN channel TEXT NOT NULL DEFAULT ''")
        self.db.execute("CREATE INDEX IF NOT EXISTS timers_due ON timers (due)")
        # Highest status-record sequence seen per message: a redelivered or older record changes nothing.
        self.db.execute("CREATE TABLE IF NOT EXISTS positions (message_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL)")

    def apply(self, records: list[StatusRecord], timeouts: TimeoutSettings) -> None:
        """Applies a batch of status records in one transaction: read the batch's messages once, fold their
        records in memory (in sequence order, skipping any already applied), write back once."""
        by_message: dict[str, list[StatusRecord]] = {}
        for record in records:
            by_message.setdefault(record["message_id"], []).append(record)
        ids = list(by_message)
        with self._lock, self.db:
            self.db.execute("BEGIN")
            positions: dict[str, int] = {}
            timers: dict[str, Timer] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                positions.update(self.db.execute(
                    f"SELECT message_id, sequence FROM positions WHERE message_id IN ({marks})", chunk).fetchall())
                timers.update((row[0], Timer(*row)) for row in self.db.execute(
                    f"SELECT {_COLUMNS} FROM timers WHERE message_id IN ({marks})", chunk))
            new_positions, upserts, deletes = [], [], []
            for mid, items in by_message.items():
                position = positions.get(mid, -1)
                current = timers.get(mid)
                changed = False
                for record in sorted(items, key=lambda item: item["sequence"]):
                    if record["sequence"] <= position:
                        continue  # redelivered or older: applied already
                    position = record["sequence"]
                    changed = True
                    current = timer_for(record, current, timeouts)
                if not changed:
                    continue
                new_positions.append((mid, position))
                if current is None:
                    deletes.append((mid,))
                else:
                    upserts.append((current.message_id, current.campaign_id, current.kind, current.since_sequence,
                                    current.due, current.channel))
            self.db.executemany("INSERT INTO positions VALUES (?, ?) ON CONFLICT (message_id) DO UPDATE "
                                "SET sequence = excluded.sequence", new_positions)
            self.db.executemany("DELETE FROM timers WHERE message_id = ?", deletes)
            self.db.executemany(f"INSERT OR REPLACE INTO timers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", upserts)

    def get(self, message_id: str) -> Timer | None:
        with self._lock:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM timers WHERE message_id = ?", (message_id,)).fetchone()
        return Timer(*row) if row else None

    def due(self, now: float, limit: int = 1000) -> list[Timer]:
        with self._lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM timers WHERE due <= ? ORDER BY due LIMIT ?",
                                   (now, limit)).fetchall()
        return [Timer(*r) for r in rows]

    def fired(self, timers: list[Timer], timeouts: TimeoutSettings) -> None:
        """Fired timers are forgotten or re-armed (`after_firing`), each only if the message has not moved on
        since it was read (same since_sequence and kind)."""
        forget, rearm = [], []
        for t in timers:
            following = after_firing(t, timeouts)
            if following is None:
                forget.append((t.message_id, t.since_sequence, t.kind))
            else:
                rearm.append((following.kind, following.due, t.message_id, t.since_sequence, t.kind))
        with self._lock, self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM timers WHERE message_id = ? AND since_sequence = ? AND kind = ?", forget)
            self.db.executemany("UPDATE timers SET kind = ?, due = ? "
                                "WHERE message_id = ? AND since_sequence = ? AND kind = ?", rearm)

    def pending(self) -> int:
        with self._lock:
            return self.db.execute("SELECT count(*) FROM timers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.db.close()
