"""Durable timers in one shared table: one row per message with a pending deadline, in the event store's
database (a SQLite file beside it, or its PostgreSQL database), so a sweeper's lost volume or a moved
partition strands nothing: whichever sweeper runs fires every due timer.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AwareDatetime, ConfigDict, Field, StrictInt, TypeAdapter, with_config
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

from schemas.commands import Channel, WireId
from schemas.events import MessageStatus
from services.common import sql_lists
from services.common.connections import ReconnectingConnection
from services.common.settings import Settings
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


@dataclass(frozen=True)
class _Dialect:
    timers: str
    positions: str
    placeholder: str
    real: str
    integer: str
    begin: str
    skip_locked: str  # rows another sweeper is taking are left to it


SQLITE = _Dialect(timers="timers", positions="positions", placeholder="?", real="REAL", integer="INTEGER",
                  begin="BEGIN IMMEDIATE", skip_locked="")
POSTGRES = _Dialect(timers="outreach_timers", positions="outreach_timer_positions", placeholder="%s",
                    real="DOUBLE PRECISION", integer="BIGINT", begin="BEGIN", skip_locked=" FOR UPDATE SKIP LOCKED")


class TimerStore:
    """The timers table and the positions (highest status-record sequence applied per message), shared by
    every sweeper instance: a SQLite file (one machine) or two tables in the event store's PostgreSQL
    database (several). One autocommit DB-API connection, used from the event loop and from worker threads:
    a lock keeps each method's transaction whole.

    Several sweepers may apply and fire at once: writes are conditional on the sequence (a batch applied
    late, by the partition's previous owner, changes nothing a newer one wrote), and `take_due` leases the
    timers it returns, so two sweepers do not fire the same one (if they did, the handler's judgement makes
    the repeat change nothing)."""

    def __init__(self, path: Path | None = None, *, connect: Callable[[], Any] | None = None,
                 dialect: _Dialect = SQLITE):
        self._lock = threading.Lock()
        # SQLite: WAL, synchronous=NORMAL: survives a crash of the process, cheap commits.
        self._connection = ReconnectingConnection(connect or (lambda: open_sqlite(path)))
        self._dialect = d = dialect
        t, pos, p = d.timers, d.positions, d.placeholder
        with self._lock, self._connection.reconnecting():
            db = self._connection.db
            db.execute(f"CREATE TABLE IF NOT EXISTS {t} (message_id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL,"
                       f" kind TEXT NOT NULL, since_sequence {d.integer} NOT NULL, due {d.real} NOT NULL,"
                       f" channel TEXT NOT NULL DEFAULT '', lease_until {d.real} NOT NULL DEFAULT 0)")
            if dialect is SQLITE:  # a data dir from before timers knew their channel, or were leased
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({t})")}
                if "channel" not in columns:
                    db.execute(f"ALTER TABLE {t} ADD COLUMN channel TEXT NOT NULL DEFAULT ''")
                if "lease_until" not in columns:
                    db.execute(f"ALTER TABLE {t} ADD COLUMN lease_until REAL NOT NULL DEFAULT 0")
            db.execute(f"CREATE INDEX IF NOT EXISTS {t}_due ON {t} (due)")
            db.execute(f"CREATE TABLE IF NOT EXISTS {pos} (message_id TEXT PRIMARY KEY, "
                       f"sequence {d.integer} NOT NULL)")
        self._upsert_position = (f"INSERT INTO {pos} (message_id, sequence) VALUES ({p}, {p}) "
                                 f"ON CONFLICT (message_id) DO UPDATE SET sequence = excluded.sequence "
                                 f"WHERE {pos}.sequence < excluded.sequence")
        self._upsert_timer = (f"INSERT INTO {t} ({_COLUMNS}) VALUES ({p}, {p}, {p}, {p}, {p}, {p}) "
                              "ON CONFLICT (message_id) DO UPDATE SET campaign_id = excluded.campaign_id, "
                              "kind = excluded.kind, since_sequence = excluded.since_sequence, due = excluded.due, "
                              f"channel = excluded.channel, lease_until = 0 "
                              f"WHERE {t}.since_sequence <= excluded.since_sequence")
        self._delete_timer = f"DELETE FROM {t} WHERE message_id = {p} AND since_sequence < {p}"

    @classmethod
    def open(cls, settings: Settings) -> "TimerStore":
        """The timers of these settings' event store: beside the SQLite file, or in the PostgreSQL database."""
        if settings.event_store == "postgres":
            import psycopg

            return cls(connect=lambda: psycopg.connect(settings.postgres_dsn, autocommit=True, connect_timeout=5),
                       dialect=POSTGRES)
        return cls(timers_path(settings))

    def apply(self, records: list[StatusRecord], timeouts: TimeoutSettings) -> None:
        """Applies a batch of status records in one transaction: read the batch's messages once, fold their
        records in memory (in sequence order, skipping any already applied), write back once."""
        by_message: dict[str, list[StatusRecord]] = {}
        for record in records:
            by_message.setdefault(record["message_id"], []).append(record)
        ids = list(by_message)
        t, pos, p = self._dialect.timers, self._dialect.positions, self._dialect.placeholder

        postgres = self._dialect is POSTGRES
        among = sql_lists.in_list("message_id", postgres)

        def work(db: Any) -> None:
            ids_param = (sql_lists.list_param(ids, postgres),)
            positions: dict[str, int] = dict(
                db.execute(f"SELECT message_id, sequence FROM {pos} WHERE {among}", ids_param).fetchall())
            timers: dict[str, Timer] = {
                row[0]: Timer(*row) for row in db.execute(f"SELECT {_COLUMNS} FROM {t} WHERE {among}", ids_param)}
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
                    deletes.append((mid, position))
                else:
                    upserts.append((current.message_id, current.campaign_id, current.kind, current.since_sequence,
                                    current.due, current.channel))
            if new_positions:
                db.executemany(self._upsert_position, new_positions)
            if deletes:
                db.executemany(self._delete_timer, deletes)
            if upserts:
                db.executemany(self._upsert_timer, upserts)

        self._transaction(work)

    def get(self, message_id: str) -> Timer | None:
        t, p = self._dialect.timers, self._dialect.placeholder
        rows = self._read(f"SELECT {_COLUMNS} FROM {t} WHERE message_id = {p}", (message_id,))
        return Timer(*rows[0]) if rows else None

    def due(self, now: float, limit: int = 1000) -> list[Timer]:
        """The timers due at `now`, earliest first (a read: see `take_due` to fire them)."""
        t, p = self._dialect.timers, self._dialect.placeholder
        rows = self._read(f"SELECT {_COLUMNS} FROM {t} WHERE due <= {p} ORDER BY due LIMIT {p}", (now, limit))
        return [Timer(*r) for r in rows]

    def take_due(self, now: float, lease_s: float, limit: int = 1000) -> list[Timer]:
        """The due timers no other sweeper is firing, leased to this one for `lease_s` (a sweeper that dies
        before `fired` leaves them to the others once the lease ends)."""
        d, p = self._dialect, self._dialect.placeholder
        t = d.timers
        return [Timer(*row) for row in self._transaction(lambda db: db.execute(
            f"UPDATE {t} SET lease_until = {p} WHERE message_id IN (SELECT message_id FROM {t} "
            f"WHERE due <= {p} AND lease_until <= {p} ORDER BY due LIMIT {p}{d.skip_locked}) "
            f"RETURNING {_COLUMNS}", (now + lease_s, now, now, limit)).fetchall())]

    def fired(self, timers: list[Timer], timeouts: TimeoutSettings) -> None:
        """Fired timers are forgotten or re-armed (`after_firing`), each only if the message has not moved on
        since it was read (same since_sequence and kind)."""
        t, p = self._dialect.timers, self._dialect.placeholder
        forget, rearm = [], []
        for timer in timers:
            following = after_firing(timer, timeouts)
            if following is None:
                forget.append((timer.message_id, timer.since_sequence, timer.kind))
            else:
                rearm.append((following.kind, following.due, timer.message_id, timer.since_sequence, timer.kind))

        def work(db: Any) -> None:
            if forget:
                db.executemany(f"DELETE FROM {t} WHERE message_id = {p} AND since_sequence = {p} AND kind = {p}",
                               forget)
            if rearm:
                db.executemany(f"UPDATE {t} SET kind = {p}, due = {p}, lease_until = 0 "
                               f"WHERE message_id = {p} AND since_sequence = {p} AND kind = {p}", rearm)

        self._transaction(work)

    def pending(self) -> int:
        return self._read(f"SELECT count(*) FROM {self._dialect.timers}")[0][0]

    def pending_by_kind(self) -> dict[str, int]:
        """Pending timers per kind (`sending`, `sent`, `retry_window`), every kind named."""
        kinds = ("sending", "sent", "retry_window")
        # One scan with a count per kind: SQLite's GROUP BY sorts every row in memory first (temp_store=MEMORY),
        # 13 MB more at 300,000 pending timers.
        counts = self._read("SELECT " + ", ".join(f"count(*) FILTER (WHERE kind = '{kind}')" for kind in kinds)
                            + f" FROM {self._dialect.timers}")[0]
        return dict(zip(kinds, counts))

    def import_local(self, path: Path) -> int:
        """Pending timers of a sweeper's own SQLite file from before timers were shared (`data_dir/timers.db`),
        added unless the shared store knows the message already (a timer, or a newer record); returns how
        many were added."""
        old = open_sqlite(path)
        try:
            rows = old.execute(f"SELECT {_COLUMNS} FROM timers").fetchall()
        finally:
            old.close()
        t, pos, p = self._dialect.timers, self._dialect.positions, self._dialect.placeholder
        before = self.pending()
        if rows:
            self._transaction(lambda db: db.executemany(
                f"INSERT INTO {t} ({_COLUMNS}) SELECT {p}, {p}, {p}, {p}, {p}, {p} WHERE NOT EXISTS "
                f"(SELECT 1 FROM {pos} WHERE message_id = {p} AND sequence >= {p}) "
                "ON CONFLICT (message_id) DO NOTHING", [(*row, row[0], row[3]) for row in rows]))
        return self.pending() - before

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    # ------------------------------------------------------------------ internals

    def _read(self, statement: str, params: tuple = ()) -> list[tuple]:
        with self._lock, self._connection.reconnecting():
            return self._connection.db.execute(statement, params).fetchall()

    def _transaction(self, work: Callable[[Any], Any]) -> Any:
        with self._lock:
            return self._connection.transaction(self._dialect.begin, work)


def timers_path(settings: Settings) -> Path:
    """The shared timers of a SQLite event store: a file beside it (every sweeper of the machine sees it)."""
    return settings.event_store_sqlite_path.with_suffix(".timers.db")
