"""The read model: campaigns, their event history, their messages and every message's status records, in SQL.

SQLite (a file, by default `data_dir/read-model.db`) or PostgreSQL (`OUTREACH_READ_MODEL_URL=postgresql://...`),
behind one class with hand-written SQL and a tiny dialect layer (placeholders, column types, a few functions),
so the CLI, the HTTP API, audit and replay share it.

Idempotence comes from what the records carry, never from Kafka offsets, and is stored in the same
transaction as the effect:
- a campaign event is kept once in `campaign_events` (by `event_id`); the `campaigns` row is the fold of the
  campaign's events in `sequence` order (an event older than the row's `last_sequence` refolds the row from
  the stored history, so even out-of-order delivery gives the same row);
- a message-status record is kept once in `message_events` (by `event_id`); the `messages` row holds the
  record with the highest `sequence` (the per-message position), plus the destination and variables of its
  `waiting` record.
So the tables are a function of the *set* of records applied: a batch may be applied again, whole or in part,
in any order, with the same result, and a replay of the same events gives the same rows (`canonical_dump`).
Every value comes from the records: the projection stamps nothing with its own clock.

A `CommandRejected` for an unknown campaign (sequence 0) has no campaign row: it is kept in `campaign_events`
only, so `events(campaign_id)` shows it.

Counts are computed from `messages` (GROUP BY over the (campaign_id, status) index), so they always add up.
As of a time, the database picks each message's latest record then (an index probe per message) and filters,
counts and pages those: no request holds a campaign's messages in memory.
A SQLite file is opened in WAL mode: the projections process writes while CLI and API processes read.
"""
from __future__ import annotations

import heapq
import queue
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from schemas import topics
from schemas.events import MESSAGE_STATUSES
from services.common import jsoncodec
from services.common.settings import Settings, get_settings

FILE_NAME = "read-model.db"
FINAL_CAMPAIGN_STATUSES = frozenset({"complete", "complete_with_errors", "failed", "deleted"})
SCHEMA_VERSION = "4"  # 3: message_events.occurred_at and row NOT NULL, history index ends in event_id; 4: stopped_at
TABLES = ("campaigns", "campaign_events", "messages", "message_events")
PAGE_ROWS = 5000  # keyset page of the big scans (canonical dump, history)
_WRITE_LOCK_KEY = 7_402_113_911  # PostgreSQL advisory lock id: one writer at a time


class InvalidRecord(ValueError):
    """A record that is JSON but lacks what the read model needs (logged and skipped by the consumer)."""


class ReadModelUnavailable(RuntimeError):
    """The database cannot be written now (locked, disk full, connection lost): retry the whole batch."""


# ------------------------------------------------------------------ checking consumed records

def _require(value: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    item = value.get(key)
    if not isinstance(item, kind) or isinstance(item, bool):
        raise InvalidRecord(f"{key!r} missing or not {getattr(kind, '__name__', kind)}")
    return item


def _optional(value: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> None:
    item = value.get(key)
    if item is not None and (not isinstance(item, kind) or isinstance(item, bool)):
        raise InvalidRecord(f"{key!r} is not {getattr(kind, '__name__', kind)}")


def check_campaign_event(value: Any) -> dict[str, Any]:
    """The record if it has what a campaign event needs; InvalidRecord otherwise."""
    if not isinstance(value, dict):
        raise InvalidRecord("not a JSON object")
    for key in ("type", "event_id", "campaign_id"):
        _require(value, key, str)
    if _require(value, "sequence", int) < 0:
        raise InvalidRecord("negative sequence")
    for key in ("occurred_at", "causation_id"):
        _optional(value, key, str)
    return value


def check_message_status(value: Any) -> dict[str, Any]:
    """The record if it has what a message-status record needs; InvalidRecord otherwise."""
    if not isinstance(value, dict):
        raise InvalidRecord("not a JSON object")
    if value.get("type") != "MessageStatusChanged":
        raise InvalidRecord(f"type {value.get('type')!r} is not MessageStatusChanged")
    for key in ("event_id", "message_id", "campaign_id", "status"):
        _require(value, key, str)
    _require(value, "sequence", int)
    for key in ("row", "run_no", "attempt"):
        _optional(value, key, int)
    for key in ("channel", "previous_status", "reason", "provider_code", "occurred_at", "causation_id",
                "destination"):
        _optional(value, key, str)
    _optional(value, "variables", dict)
    return value


UNSETTLED_MESSAGE_STATUSES = ("waiting", "queued", "sending", "sent", "retrying")


def settled(campaign: dict[str, Any]) -> bool:
    """The campaign (a `ReadModel.campaign()` dict) is final and its counts have caught up with that.

    Campaign events and message statuses come from two topics, so a final status can be read before its
    last messages change: a complete (or failed) campaign has every message final, and at least as many
    as its last status change counted. A deleted campaign's messages may stay waiting for ever."""
    if campaign["status"] not in FINAL_CAMPAIGN_STATUSES:
        return False
    if campaign["status"] == "deleted":
        return True
    counts = campaign["counts"]
    reported = campaign.get("reported_counts") or {}
    return (not any(counts.get(s) for s in UNSETTLED_MESSAGE_STATUSES)
            and counts.get("total", 0) >= reported.get("total", 0))


def empty_counts() -> dict[str, int]:
    return {"total": 0, **{status: 0 for status in MESSAGE_STATUSES}}


def rfc3339(moment: datetime) -> str:
    """The wire's time format (fixed width, so text order is time order); a naive moment is taken as UTC.
    The year is zero-padded by hand: strftime's %Y gives "999" for the year 999, which sorts after "2026".
    OverflowError if the moment in UTC is out of datetime's range (before 0001-01-01 or after 9999)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    m = moment.astimezone(timezone.utc)
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
            f".{m.microsecond:06d}Z")


# ------------------------------------------------------------------ dialects and connections

@dataclass(frozen=True)
class _Dialect:
    name: str
    key_text: str  # ids and times: byte order in both databases, so keyset pages and dumps agree
    integer: str
    lower: str  # a Unicode-aware lower()
    variable_values: str  # the text values of a message's variables (a subquery over JSON)
    offset_without_limit: str
    # Joins `messages m` to `e`, the message's record with the highest sequence among those that occurred at or
    # before a time (the one parameter): an index probe per message, no sort of the campaign's records.
    latest_record_as_of: str

    def sql(self, statement: str) -> str:
        return statement if self.name == "sqlite" else statement.replace("?", "%s")


SQLITE = _Dialect("sqlite", "TEXT", "INTEGER", "py_lower", "SELECT value FROM json_each(messages.variables)",
                  " LIMIT -1 OFFSET ?",
                  "JOIN message_events e ON e.rowid = (SELECT x.rowid FROM message_events x"
                  " WHERE x.message_id = m.message_id AND x.occurred_at <= ? ORDER BY x.sequence DESC LIMIT 1)")
POSTGRES = _Dialect("postgres", 'TEXT COLLATE "C"', "BIGINT", "lower",
                    "SELECT value FROM json_each_text(messages.variables::json)", " OFFSET ?",
                    # A correlated subquery in the join condition made PostgreSQL hash the whole table: LATERAL
                    # keeps it a nested loop of index probes.
                    "CROSS JOIN LATERAL (SELECT * FROM message_events x"
                    " WHERE x.message_id = m.message_id AND x.occurred_at <= ? ORDER BY x.sequence DESC LIMIT 1) e")


class _Session:
    """One connection, whatever the database: rows come back as dicts."""

    def __init__(self, conn: Any, dialect: _Dialect):
        self.conn = conn
        self.dialect = dialect

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return self.conn.execute(self.dialect.sql(sql), tuple(params)).fetchall()

    def one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Iterable[Any] = ()) -> None:
        self.conn.execute(self.dialect.sql(sql), tuple(params))

    def many(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        if self.dialect.name == "sqlite":
            self.conn.executemany(sql, rows)
        else:
            with self.conn.cursor() as cursor:
                cursor.executemany(self.dialect.sql(sql), rows)


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row)}


class _SqliteBackend:
    dialect = SQLITE

    def __init__(self, path: str, pool_size: int = 4):
        self.path = path
        self.memory = path == ":memory:"
        if not self.memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # An in-memory database is one connection (each connection would be a database of its own).
        self._slots = threading.BoundedSemaphore(1 if self.memory else pool_size)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = _dict_row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses no committed transaction's order
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: a 300k-message campaign stays in memory
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.create_function("py_lower", 1, lambda s: s.lower() if isinstance(s, str) else s, deterministic=True)
        with self._all_lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def session(self) -> Iterator[_Session]:
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield _Session(conn, SQLITE)
            finally:
                self._idle.put(conn)

    @contextmanager
    def transaction(self) -> Iterator[_Session]:
        with self.session() as s:
            try:
                s.conn.execute("BEGIN IMMEDIATE")  # the write lock now: no other writer can interleave
            except sqlite3.OperationalError as exc:
                raise ReadModelUnavailable(str(exc)) from exc
            try:
                yield s
            except BaseException:
                s.conn.execute("ROLLBACK")
                raise
            try:
                s.conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                s.conn.execute("ROLLBACK")
                raise ReadModelUnavailable(str(exc)) from exc

    def table_exists(self, s: _Session, table: str) -> bool:
        return s.one("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)) is not None

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class _PostgresBackend:
    dialect = POSTGRES

    def __init__(self, dsn: str, pool_size: int = 4):
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self.dsn = dsn
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, open=True, timeout=30,
                                   kwargs={"autocommit": True, "row_factory": dict_row},
                                   name="outreach-read-model")

    @contextmanager
    def session(self) -> Iterator[_Session]:
        with self.pool.connection() as conn:
            yield _Session(conn, POSTGRES)

    @contextmanager
    def transaction(self) -> Iterator[_Session]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                s = _Session(conn, POSTGRES)
                s.run("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_KEY,))  # one writer at a time, as SQLite
                yield s
        except self._psycopg.OperationalError as exc:
            raise ReadModelUnavailable(str(exc)) from exc

    def table_exists(self, s: _Session, table: str) -> bool:
        return s.one("SELECT to_regclass(?) AS t", (table,))["t"] is not None

    def transient(self, exc: BaseException) -> bool:
        from psycopg_pool import PoolTimeout

        return isinstance(exc, (self._psycopg.OperationalError, PoolTimeout))

    def close(self) -> None:
        self.pool.close()


def _schema(d: _Dialect) -> list[str]:
    k, i = d.key_text, d.integer
    return [
        f"CREATE TABLE read_model_meta (key {k} PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE campaigns (
            campaign_id     {k} PRIMARY KEY,
            name            TEXT,
            description     TEXT,
            channel         TEXT,
            status          TEXT NOT NULL DEFAULT 'created',
            previous_status TEXT,
            stopped         {i} NOT NULL DEFAULT 0,
            stopped_by      TEXT,
            stopped_at      {k},
            created_by      TEXT,
            created_at      {k},
            updated_at      {k},
            template        TEXT,
            summary         TEXT,
            reported_counts TEXT,
            message_count   {i},
            run_no          {i},
            last_sequence   {i} NOT NULL DEFAULT -1
        )""",  # template, summary (the latest RunSummary), reported_counts (of the latest status change): JSON
        f"""CREATE TABLE campaign_events (
            event_id     {k} PRIMARY KEY,
            campaign_id  {k} NOT NULL,
            sequence     {i} NOT NULL,
            type         TEXT NOT NULL,
            occurred_at  {k},
            causation_id {k},
            body         TEXT NOT NULL
        )""",  # body: the whole record as published (JSON)
        "CREATE INDEX campaign_events_by_campaign ON campaign_events (campaign_id, sequence)",
        "CREATE INDEX campaign_events_by_causation ON campaign_events (causation_id)",
        f"""CREATE TABLE messages (
            message_id      {k} PRIMARY KEY,
            campaign_id     {k} NOT NULL,
            row             {i},
            channel         TEXT,
            destination     TEXT,
            variables       TEXT,
            status          TEXT NOT NULL,
            previous_status TEXT,
            reason          TEXT,
            provider_code   TEXT,
            attempt         {i},
            run_no          {i},
            created_at      {k},
            updated_at      {k},
            last_sequence   {i} NOT NULL
        )""",  # variables: JSON; created_at: its `waiting` record's occurred_at, updated_at: its latest record's
        "CREATE INDEX messages_by_campaign_row ON messages (campaign_id, row)",
        "CREATE INDEX messages_by_campaign_status ON messages (campaign_id, status, row)",
        f"""CREATE TABLE message_events (
            event_id        {k} PRIMARY KEY,
            message_id      {k} NOT NULL,
            campaign_id     {k} NOT NULL,
            row             {i} NOT NULL,
            channel         TEXT,
            run_no          {i},
            status          TEXT NOT NULL,
            previous_status TEXT,
            reason          TEXT,
            provider_code   TEXT,
            attempt         {i},
            occurred_at     {k} NOT NULL,
            causation_id    {k},
            sequence        {i} NOT NULL,
            extra           TEXT
        )""",  # extra: the record's other fields (JSON), e.g. destination and variables of a `waiting` record;
        # a record without occurred_at or row is stored with '' or 0 (and a null for it in extra, so it reads
        # back as published): the history's keyset pages then order and compare raw indexed columns.
        "CREATE INDEX message_events_by_message ON message_events (message_id, sequence)",
        "CREATE INDEX message_events_by_time ON message_events (campaign_id, occurred_at, row, sequence, event_id)",
    ]


# ------------------------------------------------------------------ columns

_CAMPAIGN_COLUMNS = (
    "campaign_id", "name", "description", "channel", "status", "previous_status", "stopped", "stopped_by",
    "stopped_at", "created_by", "created_at", "updated_at", "template", "summary", "reported_counts", "message_count", "run_no",
    "last_sequence",
)
_JSON_CAMPAIGN_COLUMNS = ("template", "summary", "reported_counts")
_EVENT_COLUMNS = ("event_id", "campaign_id", "sequence", "type", "occurred_at", "causation_id", "body")
_MESSAGE_COLUMNS = (
    "message_id", "campaign_id", "row", "channel", "destination", "variables", "status", "previous_status", "reason",
    "provider_code", "attempt", "run_no", "created_at", "updated_at", "last_sequence",
)
# Of a message as of a time, these come from its latest record then; the others (contact, row) from `messages`.
_AS_OF_RECORD_COLUMNS = frozenset({"channel", "status", "previous_status", "reason", "provider_code", "attempt",
                                   "run_no", "updated_at", "last_sequence"})
_MESSAGE_STATE_COLUMNS = (
    "status", "previous_status", "reason", "provider_code", "attempt", "run_no", "updated_at", "last_sequence",
)
_STATUS_COLUMNS = (
    "event_id", "message_id", "campaign_id", "row", "channel", "run_no", "status", "previous_status", "reason",
    "provider_code", "attempt", "occurred_at", "causation_id", "sequence", "extra",
)
_STATUS_RECORD_FIELDS = frozenset(_STATUS_COLUMNS) - {"extra"} | {"type"}
_JSON_COLUMNS = {"campaigns": _JSON_CAMPAIGN_COLUMNS, "campaign_events": ("body",), "messages": ("variables",),
                 "message_events": ("extra",)}
_TABLE_COLUMNS = {"campaigns": _CAMPAIGN_COLUMNS, "campaign_events": _EVENT_COLUMNS, "messages": _MESSAGE_COLUMNS,
                  "message_events": _STATUS_COLUMNS}
_TABLE_KEYS = {"campaigns": "campaign_id", "campaign_events": "event_id", "messages": "message_id",
               "message_events": "event_id"}


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


_UPSERT_CAMPAIGN = (
    _insert("campaigns", _CAMPAIGN_COLUMNS) + " ON CONFLICT (campaign_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _CAMPAIGN_COLUMNS[1:])
)
_INSERT_EVENT = _insert("campaign_events", _EVENT_COLUMNS) + " ON CONFLICT (event_id) DO NOTHING"
_INSERT_STATUS = _insert("message_events", _STATUS_COLUMNS) + " ON CONFLICT (event_id) DO NOTHING"
# The state columns follow the record with the highest sequence; the `waiting` record's fields fill in
# whenever it arrives (before or after later records).
_UPSERT_MESSAGE = (
    _insert("messages", _MESSAGE_COLUMNS) + " ON CONFLICT (message_id) DO UPDATE SET "
    + ", ".join(
        f"{c} = CASE WHEN excluded.last_sequence > messages.last_sequence THEN excluded.{c} ELSE messages.{c} END"
        for c in _MESSAGE_STATE_COLUMNS)
    + ", " + ", ".join(f"{c} = COALESCE(messages.{c}, excluded.{c})" for c in ("destination", "variables",
                                                                               "created_at"))
)


def _json_text(value: Any) -> str | None:
    return None if value is None else jsoncodec.dumps(value).decode()


def _canonical_json(text: str | None) -> str | None:
    return None if text is None else orjson.dumps(orjson.loads(text), option=orjson.OPT_SORT_KEYS).decode()


# ------------------------------------------------------------------ the read model

class ReadModel:
    """The read model. One instance per process; thread-safe (a small pool of connections)."""

    def __init__(self, location: Path | str, pool_size: int = 4):
        text = str(location)
        if text.startswith(("postgresql://", "postgres://")):
            self._backend: _SqliteBackend | _PostgresBackend = _PostgresBackend(text, pool_size)
            self.path: Path | None = None
            self.location = masked_dsn(text)  # logged: never with a password
        else:
            if text.startswith("sqlite:///"):
                text = text[len("sqlite:///"):]
            self._backend = _SqliteBackend(text, pool_size)
            self.path = Path(text)
            self.location = text
        self.dialect = self._backend.dialect
        self._fed_from_start: bool | None = None
        try:
            self._ensure_schema()
        except BaseException:
            self._backend.close()
            raise

    @classmethod
    def open(cls, settings: Settings | None = None) -> ReadModel:
        """The read model of `settings.read_model_url`, by default the SQLite file `data_dir / "read-model.db"`."""
        return cls(location_of(settings or get_settings()))

    @classmethod
    def open_existing(cls, settings: Settings | None = None) -> ReadModel | None:
        """The read model, or None when it is a SQLite file nobody has written yet (never creates one)."""
        settings = settings or get_settings()
        location = location_of(settings)
        if not location.startswith(("postgresql://", "postgres://")):
            path = location[len("sqlite:///"):] if location.startswith("sqlite:///") else location
            if not Path(path).exists():
                return None
        return cls(location)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> ReadModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_schema(self) -> None:
        """Create the tables; a read model of another schema version is dropped and built again (it is
        derived data: the projections then consume the topics from the beginning)."""
        with self._backend.session() as s:  # the usual case, without waiting for the write lock
            if self._schema_version(s) == SCHEMA_VERSION:
                return
        with self._backend.transaction() as s:
            if self._schema_version(s) == SCHEMA_VERSION:
                return  # another process made it meanwhile
            for table in ("read_model_meta", *TABLES):
                s.run(f"DROP TABLE IF EXISTS {table}")
            for statement in _schema(self.dialect):
                s.run(statement)
            s.many("INSERT INTO read_model_meta (key, value) VALUES (?, ?)",
                   [("schema_version", SCHEMA_VERSION), ("fed_from_start", "0")])

    def _schema_version(self, s: _Session) -> str | None:
        if not self._backend.table_exists(s, "read_model_meta"):
            return None
        row = s.one("SELECT value FROM read_model_meta WHERE key = 'schema_version'")
        return row["value"] if row else None

    @property
    def fed_from_start(self) -> bool:
        """False until a first batch is applied: a new (or rebuilt) read model must be fed every record from the
        beginning of the topics, whatever offsets a consumer group committed for an earlier one."""
        if not self._fed_from_start:
            with self._backend.session() as s:
                row = s.one("SELECT value FROM read_model_meta WHERE key = 'fed_from_start'")
            self._fed_from_start = bool(row) and row["value"] == "1"
        return self._fed_from_start

    def is_unavailable(self, exc: BaseException) -> bool:
        """True for errors worth retrying the same batch for (the database, not the records)."""
        return isinstance(exc, ReadModelUnavailable) or self._backend.transient(exc)

    # ------------------------------------------------------------------ writing

    def apply(self, records: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Apply (topic, value) pairs of one consumed batch in one transaction."""
        campaign_events: list[dict[str, Any]] = []
        statuses: list[dict[str, Any]] = []
        for topic, value in records:
            if topic == topics.CAMPAIGN_EVENTS:
                campaign_events.append(value)
            elif topic == topics.MESSAGE_STATUS:
                statuses.append(value)
        self.apply_batch(campaign_events, statuses)

    def apply_batch(self, campaign_events: list[dict[str, Any]], message_statuses: list[dict[str, Any]]) -> None:
        """Apply checked campaign events and message-status records in one transaction (all or nothing)."""
        try:
            with self._backend.transaction() as s:
                if campaign_events:
                    self._apply_campaign_events(s, campaign_events)
                if message_statuses:
                    self._apply_statuses(s, message_statuses)
                if not self._fed_from_start:
                    s.run("UPDATE read_model_meta SET value = '1' WHERE key = 'fed_from_start'")
        except ReadModelUnavailable:
            raise
        except Exception as exc:
            if self._backend.transient(exc):
                raise ReadModelUnavailable(str(exc)) from exc
            raise
        self._fed_from_start = True

    def _apply_campaign_events(self, s: _Session, events: list[dict[str, Any]]) -> None:
        s.many(_INSERT_EVENT, [
            (e["event_id"], e["campaign_id"], e["sequence"], e["type"], e.get("occurred_at"), e.get("causation_id"),
             _json_text(e))
            for e in events
        ])
        by_campaign: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            if event["sequence"] > 0:  # 0: a rejection of an unknown campaign, history only
                by_campaign.setdefault(event["campaign_id"], []).append(event)
        rows = []
        for campaign_id, new in by_campaign.items():
            new.sort(key=lambda e: (e["sequence"], e["event_id"]))
            state = _load_state(s, campaign_id)
            if state is not None and new[0]["sequence"] <= state["last_sequence"]:
                # A duplicate, or an event older than the row (delivered out of order): fold the row again
                # from the campaign's stored history, which now holds every event applied.
                state = _fold(campaign_id, _stored_events(s, campaign_id))
            else:
                state = _fold(campaign_id, new, state)
            rows.append(tuple(_json_text(state[c]) if c in _JSON_CAMPAIGN_COLUMNS else state[c]
                              for c in _CAMPAIGN_COLUMNS))
        s.many(_UPSERT_CAMPAIGN, rows)

    def _apply_statuses(self, s: _Session, records: list[dict[str, Any]]) -> None:
        s.many(_INSERT_STATUS, [
            (r["event_id"], r["message_id"], r["campaign_id"], _or_zero(r.get("row")), r.get("channel"),
             r.get("run_no"), r["status"], r.get("previous_status"), r.get("reason"), r.get("provider_code"),
             r.get("attempt"), r.get("occurred_at") or "", r.get("causation_id"), r["sequence"],
             _json_text(_extra_fields(r)))
            for r in records
        ])
        s.many(_UPSERT_MESSAGE, _message_rows(records))

    # ------------------------------------------------------------------ campaigns

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._backend.session() as s:
            return s.rows(sql, params)

    def counts(self, campaign_id: str) -> dict[str, int]:
        """Messages per status (every status, zeros included) and `total`."""
        return self._counts_of([campaign_id]).get(campaign_id, empty_counts())

    def _counts_of(self, campaign_ids: list[str] | None) -> dict[str, dict[str, int]]:
        sql = "SELECT campaign_id, status, COUNT(*) AS n FROM messages"
        params: list[Any] = []
        if campaign_ids is not None:
            if not campaign_ids:
                return {}
            sql += f" WHERE campaign_id IN ({', '.join('?' * len(campaign_ids))})"
            params = list(campaign_ids)
        result: dict[str, dict[str, int]] = {}
        for row in self._rows(sql + " GROUP BY campaign_id, status", params):
            counts = result.setdefault(row["campaign_id"], empty_counts())
            counts[row["status"]] = counts.get(row["status"], 0) + row["n"]
            counts["total"] += row["n"]
        return result

    def campaign(self, campaign_id: str) -> dict[str, Any] | None:
        """The campaign with its `counts`, or None if no event of it has been applied."""
        rows = self._rows("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,))
        if not rows:
            return None
        result = _campaign_dict(rows[0])
        result["counts"] = self.counts(campaign_id)
        return result

    def campaigns(self, *, status: str | None = None, limit: int | None = None,
                  offset: int = 0) -> list[dict[str, Any]]:
        """Campaigns (newest first), optionally of one status, each with its `counts`."""
        sql, params = "SELECT * FROM campaigns", []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        sql += " ORDER BY created_at DESC NULLS LAST, campaign_id" + self._page(params, limit, offset)
        result = [_campaign_dict(row) for row in self._rows(sql, params)]
        counts = self._counts_of([c["campaign_id"] for c in result] if limit is not None else None)
        for campaign in result:
            campaign["counts"] = counts.get(campaign["campaign_id"], empty_counts())
        return result

    def count_campaigns(self, *, status: str | None = None) -> int:
        if status is None:
            return self._rows("SELECT COUNT(*) AS n FROM campaigns")[0]["n"]
        return self._rows("SELECT COUNT(*) AS n FROM campaigns WHERE status = ?", (status,))[0]["n"]

    def is_final(self, campaign_id: str) -> bool:
        """True when the campaign's status is complete, complete_with_errors, failed or deleted."""
        rows = self._rows("SELECT status FROM campaigns WHERE campaign_id = ?", (campaign_id,))
        return bool(rows) and rows[0]["status"] in FINAL_CAMPAIGN_STATUSES

    def events(self, campaign_id: str) -> list[dict[str, Any]]:
        """The campaign's events (rejections of it as an unknown campaign included), in sequence order."""
        return [
            jsoncodec.loads(row["body"])
            for row in self._rows(
                "SELECT body FROM campaign_events WHERE campaign_id = ? ORDER BY sequence, occurred_at, event_id",
                (campaign_id,),
            )
        ]

    def answers(self, command_id: str) -> list[dict[str, Any]]:
        """The events answering one command (matched by causation_id), in sequence order."""
        return [
            jsoncodec.loads(row["body"])
            for row in self._rows(
                "SELECT body FROM campaign_events WHERE causation_id = ? ORDER BY sequence, event_id", (command_id,)
            )
        ]

    # ------------------------------------------------------------------ messages

    def _page(self, params: list[Any], limit: int | None, offset: int) -> str:
        if limit is not None:
            params.extend((limit, offset))
            return " LIMIT ? OFFSET ?"
        if offset:
            params.append(offset)
            return self.dialect.offset_without_limit
        return ""

    def _message_filter(self, campaign_id: str, status: str | None, reason: str | None,
                        search: str | None) -> tuple[str, list[Any]]:
        where, params = ["campaign_id = ?"], [campaign_id]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if reason is not None:
            where.append("reason = ?")
            params.append(reason)
        if search is not None and search.strip():
            term = search.strip()
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", term.lower()) + "%"
            lower = self.dialect.lower
            where.append(
                f"({lower}(destination) LIKE ? ESCAPE '\\' "
                f"OR EXISTS ({self.dialect.variable_values.replace('SELECT value', 'SELECT 1')} "
                f"WHERE {lower}(value) LIKE ? ESCAPE '\\') "
                "OR row = ? OR message_id = ?)")
            params.extend((pattern, pattern, _row_number(term), term.lower()))
        return " AND ".join(where), params

    def messages(self, campaign_id: str, *, status: str | None = None, reason: str | None = None,
                 search: str | None = None, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The campaign's messages in row order, optionally filtered (see `_message_filter`)."""
        where, params = self._message_filter(campaign_id, status, reason, search)
        sql = f"SELECT * FROM messages WHERE {where} ORDER BY row, message_id" + self._page(params, limit, offset)
        return [_message_dict(row) for row in self._rows(sql, params)]

    def count_messages(self, campaign_id: str, *, status: str | None = None, reason: str | None = None,
                       search: str | None = None) -> int:
        where, params = self._message_filter(campaign_id, status, reason, search)
        return self._rows(f"SELECT COUNT(*) AS n FROM messages WHERE {where}", params)[0]["n"]

    def iter_messages(self, campaign_id: str, *, status: str | None = None, reason: str | None = None,
                      search: str | None = None, batch_size: int = 2000) -> Iterator[dict[str, Any]]:
        """Every matching message in row order, fetched in keyset pages (bounded memory)."""
        where, params = self._message_filter(campaign_id, status, reason, search)
        last_row = -1
        while True:
            page = self._rows(f"SELECT * FROM messages WHERE {where} AND row > ? ORDER BY row LIMIT ?",
                              [*params, last_row, batch_size])
            for row in page:
                yield _message_dict(row)
            if len(page) < batch_size:
                return
            last_row = page[-1]["row"]

    def message(self, message_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM messages WHERE message_id = ?", (message_id,))
        return _message_dict(rows[0]) if rows else None

    # ------------------------------------------------------------------ audit

    def message_history(self, message_id: str) -> list[dict[str, Any]]:
        """The message's status records as published, in sequence order."""
        return [_status_record(row) for row in self._rows(
            "SELECT * FROM message_events WHERE message_id = ? ORDER BY sequence, event_id", (message_id,))]

    def history(self, campaign_id: str, *, include_messages: bool = True) -> list[dict[str, Any]]:
        """The full ordered audit history (see `iter_history`)."""
        return list(self.iter_history(campaign_id, include_messages=include_messages))

    def iter_history(self, campaign_id: str, *, include_messages: bool = True,
                     until: datetime | str | None = None) -> Iterator[dict[str, Any]]:
        """Campaign events and message-status records merged in occurred_at order (ties: campaign events by
        sequence first, then status records by (row, sequence)), each as published; optionally only those that
        occurred at or before `until`. Status records stream in keyset pages."""
        limit = _moment(until)
        events = [e for e in self.events(campaign_id) if limit is None or (e.get("occurred_at") or "") <= limit]
        events.sort(key=lambda e: (e.get("occurred_at") or "", e.get("sequence", 0)))
        keyed_events = (((e.get("occurred_at") or "", 0, e.get("sequence", 0), 0), e) for e in events)
        if not include_messages:
            yield from (e for _, e in keyed_events)
            return
        statuses = (((r["occurred_at"] or "", 1, r["row"] or 0, r["sequence"]), r)
                    for r in self._iter_statuses(campaign_id, limit))
        for _, item in heapq.merge(keyed_events, statuses, key=lambda pair: pair[0]):
            yield item

    def _iter_statuses(self, campaign_id: str, until: str | None) -> Iterator[dict[str, Any]]:
        after: tuple[str, int, int, str] | None = None
        while True:
            page = self._rows(*self._status_page(campaign_id, until, after))
            for row in page:
                yield _status_record(row)
            if len(page) < PAGE_ROWS:
                return
            last = page[-1]
            after = (last["occurred_at"], last["row"], last["sequence"], last["event_id"])

    def _status_page(self, campaign_id: str, until: str | None,
                     after: tuple[str, int, int, str] | None) -> tuple[str, list[Any]]:
        """The query of one page of the campaign's status records after the key `after`: a range scan of the
        (campaign_id, occurred_at, row, sequence, event_id) index, raw columns only (an ORDER BY on expressions
        sorted all of the campaign's records again for each page). event_id makes the key unique, so a page
        boundary between equal (time, row, sequence) keys loses nothing."""
        sql, params = "SELECT * FROM message_events WHERE campaign_id = ?", [campaign_id]
        if until is not None:
            sql += " AND occurred_at <= ?"
            params.append(until)
        if after is not None:
            sql += " AND (occurred_at, row, sequence, event_id) > (?, ?, ?, ?)"
            params.extend(after)
        sql += " ORDER BY occurred_at, row, sequence, event_id LIMIT ?"
        params.append(PAGE_ROWS)
        return sql, params

    def explain(self, sql: str, params: Iterable[Any] = ()) -> list[str]:
        """The database's plan for a query, one line a step (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on
        PostgreSQL): to check that a query uses the index it was written for."""
        if self.dialect.name == "sqlite":
            return [row["detail"] for row in self._rows("EXPLAIN QUERY PLAN " + sql, params)]
        return [row["QUERY PLAN"] for row in self._rows("EXPLAIN " + sql, params)]

    # ------------------------------------------------------------------ as of a time
    #
    # Built only from records that occurred at or before the time (a record without a time counts as the
    # earliest). The database folds the messages: a campaign of 300,000 messages is never in memory.

    def as_of_campaign(self, campaign_id: str, moment: datetime | str, *,
                       with_counts: bool = True) -> dict[str, Any] | None:
        """The campaign as it stood at `moment`, with its `counts` then (unless `with_counts` is False); None if
        the campaign is unknown or had no event by then."""
        limit = _moment(moment)
        events = [jsoncodec.loads(row["body"]) for row in self._rows(
            "SELECT body FROM campaign_events WHERE campaign_id = ? AND sequence > 0"
            " AND (occurred_at IS NULL OR occurred_at <= ?) ORDER BY sequence, event_id", (campaign_id, limit))]
        if not events:
            return None
        campaign = _campaign_dict(_fold(campaign_id, events))
        if with_counts:
            counts = empty_counts()
            source, params = self._as_of_source(campaign_id, limit)
            for row in self._rows(f"SELECT status, COUNT(*) AS n FROM {source} GROUP BY status", params):
                counts[row["status"]] = counts.get(row["status"], 0) + row["n"]
                counts["total"] += row["n"]
            campaign["counts"] = counts
        return campaign

    def as_of_messages(self, campaign_id: str, moment: datetime | str, *, status: str | None = None,
                       reason: str | None = None, search: str | None = None, limit: int | None = None,
                       offset: int = 0) -> list[dict[str, Any]]:
        """The campaign's messages as they stood at `moment`, in row order, with the filters and pages of
        `messages()` (status and reason of that time; the contact as imported)."""
        source, params = self._as_of_source(campaign_id, _moment(moment))
        where, filter_params = self._message_filter(campaign_id, status, reason, search)
        params += filter_params
        sql = f"SELECT * FROM {source} WHERE {where} ORDER BY row, message_id" + self._page(params, limit, offset)
        return [_message_dict(row) for row in self._rows(sql, params)]

    def iter_as_of_messages(self, campaign_id: str, moment: datetime | str, *,
                            batch_size: int = 2000) -> Iterator[dict[str, Any]]:
        """Every message as it stood at `moment`, in row order, fetched in keyset pages (bounded memory)."""
        source, params = self._as_of_source(campaign_id, _moment(moment))
        where, filter_params = self._message_filter(campaign_id, None, None, None)
        last_row = -1
        while True:
            page = self._rows(f"SELECT * FROM {source} WHERE {where} AND row > ? ORDER BY row LIMIT ?",
                              [*params, *filter_params, last_row, batch_size])
            for row in page:
                yield _message_dict(row)
            if len(page) < batch_size:
                return
            last_row = page[-1]["row"]

    def count_as_of_messages(self, campaign_id: str, moment: datetime | str, *, status: str | None = None,
                             reason: str | None = None, search: str | None = None) -> int:
        source, params = self._as_of_source(campaign_id, _moment(moment))
        where, filter_params = self._message_filter(campaign_id, status, reason, search)
        return self._rows(f"SELECT COUNT(*) AS n FROM {source} WHERE {where}", params + filter_params)[0]["n"]

    def as_of(self, campaign_id: str, moment: datetime | str) -> dict[str, Any] | None:
        """{as_of, campaign, messages}: the campaign and all its messages as they stood at `moment` (for the CLI's
        whole view; pages: `as_of_messages`); None if the campaign is unknown or had no event by then."""
        limit = _moment(moment)
        campaign = self.as_of_campaign(campaign_id, limit)
        if campaign is None:
            return None
        return {"as_of": limit, "campaign": campaign, "messages": self.as_of_messages(campaign_id, limit)}

    def _as_of_source(self, campaign_id: str, moment: str) -> tuple[str, list[Any]]:
        """A FROM item named `messages`, with the messages table's columns, of the campaign's messages as they
        stood at `moment`, and its parameters: `_message_filter` applies to it unchanged."""
        state = ", ".join(
            "NULLIF(e.occurred_at, '') AS updated_at" if c == "updated_at"
            else "e.sequence AS last_sequence" if c == "last_sequence"
            else f"e.{c}" if c in _AS_OF_RECORD_COLUMNS else f"m.{c}"
            for c in _MESSAGE_COLUMNS)
        return (f"(SELECT {state} FROM messages m {self.dialect.latest_record_as_of} WHERE m.campaign_id = ?) messages",
                [moment, campaign_id])

    # ------------------------------------------------------------------ replay support

    def canonical_dump(self) -> Iterator[tuple[str, tuple]]:
        """(table, row) for every row of every table, tables in a fixed order and rows by primary key (byte
        order in both databases), JSON re-encoded with sorted keys: equal events give equal dumps on SQLite
        and PostgreSQL."""
        for table in TABLES:
            columns, key = _TABLE_COLUMNS[table], _TABLE_KEYS[table]
            json_at = [i for i, c in enumerate(columns) if c in _JSON_COLUMNS[table]]
            after = ""
            while True:
                page = self._rows(f"SELECT {', '.join(columns)} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?",
                                  (after, PAGE_ROWS))
                for row in page:
                    values = [row[c] for c in columns]
                    for i in json_at:
                        values[i] = _canonical_json(values[i])
                    yield table, tuple(values)
                if len(page) < PAGE_ROWS:
                    break
                after = page[-1][key]

    def row_counts(self) -> dict[str, int]:
        """Rows per table."""
        return {table: self._rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] for table in TABLES}


def location_of(settings: Settings) -> str:
    """Where the read model lives: `read_model_url`, or the SQLite file in data_dir."""
    return getattr(settings, "read_model_url", None) or str(settings.data_dir / FILE_NAME)


_SECRET_DSN_KEYS = ("password", "sslpassword")


def masked_dsn(dsn: str) -> str:
    """A PostgreSQL DSN (URL or key=value) fit for logs: libpq's own parser finds the password wherever it is
    (user info, query parameter, keyword), and the result is key=value text with it masked. A DSN libpq cannot
    parse is shown as nothing but its scheme."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        return "postgresql://***"
    for key in _SECRET_DSN_KEYS:
        if params.get(key) is not None:
            params[key] = "***"
    return make_conninfo("", **params)


def _row_number(term: str) -> int:
    """The row a search term names, or -1: ASCII digits only ('²'.isdigit() is True but int('²') raises, and
    int('٣') is 3), at most 17 of them so the number fits a 64-bit column."""
    return int(term) if re.fullmatch(r"[0-9]{1,17}", term, re.ASCII) else -1


def _moment(moment: datetime | str | None) -> str | None:
    if moment is None or isinstance(moment, str):
        return moment
    return rfc3339(moment)


def _new_state(campaign_id: str) -> dict[str, Any]:
    state = dict.fromkeys(_CAMPAIGN_COLUMNS)
    state.update(campaign_id=campaign_id, status="created", stopped=0, last_sequence=-1)
    return state


def _load_state(s: _Session, campaign_id: str) -> dict[str, Any] | None:
    row = s.one("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,))
    if row is None:
        return None
    state = {c: row[c] for c in _CAMPAIGN_COLUMNS}
    for c in _JSON_CAMPAIGN_COLUMNS:
        if state[c] is not None:
            state[c] = jsoncodec.loads(state[c])
    return state


def _stored_events(s: _Session, campaign_id: str) -> list[dict[str, Any]]:
    return [jsoncodec.loads(row["body"]) for row in s.rows(
        "SELECT body FROM campaign_events WHERE campaign_id = ? AND sequence > 0 ORDER BY sequence, event_id",
        (campaign_id,))]


def _fold(campaign_id: str, events: list[dict[str, Any]], state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The campaign row after `events` (in sequence order) on top of `state` (default: nothing yet)."""
    state = dict(state) if state is not None else _new_state(campaign_id)
    for event in events:
        if event["sequence"] <= state["last_sequence"]:
            continue  # the same event twice in one batch
        _evolve(state, event)
        state["last_sequence"] = event["sequence"]
        state["updated_at"] = event.get("occurred_at") or state["updated_at"]
    return state


def _evolve(state: dict[str, Any], event: dict[str, Any]) -> None:
    """The effect of one new campaign event on the campaign's row (unknown types: none)."""
    kind = event["type"]
    if kind == "CampaignCreated":
        state.update(name=event.get("name"), description=event.get("description"), channel=event.get("channel"),
                     template=event.get("template"), created_by=event.get("created_by"),
                     created_at=event.get("occurred_at"))
    elif kind == "CampaignReady":
        state["message_count"] = event.get("message_count")
        if event.get("summary") is not None:
            state["summary"] = event["summary"]
    elif kind == "TemplateUpdated":
        state["template"] = event.get("template")
        if isinstance(event.get("summary"), dict):
            state["summary"] = event["summary"]
            state["message_count"] = event["summary"].get("message_count", state["message_count"])
    elif kind in ("CampaignRunStarted", "RetryStarted"):
        state["run_no"] = event.get("run_no")
    elif kind == "CampaignStopped":
        state["stopped"] = 1
        state["stopped_by"] = event.get("stopped_by")
        state["stopped_at"] = event.get("occurred_at")
    elif kind == "CampaignDeleted":
        state["previous_status"], state["status"] = state["status"], "deleted"
    elif kind == "CampaignStatusChanged":
        state["status"] = event.get("status") or state["status"]
        state["previous_status"] = event.get("previous_status")
        state["stopped"] = int(bool(state["stopped"]) or bool(event.get("stopped")))
        state["reported_counts"] = event.get("counts")


def _message_rows(records: list[dict[str, Any]]) -> list[tuple]:
    """One row per message: its record with the highest sequence in the batch, and its `waiting` record's
    destination, variables and time if the batch has it."""
    latest: dict[str, dict[str, Any]] = {}
    waiting: dict[str, dict[str, Any]] = {}
    for record in records:
        message_id = record["message_id"]
        current = latest.get(message_id)
        if current is None or record["sequence"] > current["sequence"]:
            latest[message_id] = record
        if record["status"] == "waiting" and record.get("previous_status") is None:
            waiting[message_id] = record
    rows = []
    for message_id, r in latest.items():
        w = waiting.get(message_id)
        rows.append((
            message_id, r["campaign_id"], r.get("row"), r.get("channel"),
            w.get("destination") if w else None, _json_text(w.get("variables")) if w else None,
            r["status"], r.get("previous_status"), r.get("reason"), r.get("provider_code"), r.get("attempt"),
            r.get("run_no"), w.get("occurred_at") if w else None, r.get("occurred_at"), r["sequence"],
        ))
    return rows


def _extra_fields(record: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of a status record beyond the standard ones (e.g. a `waiting` record's destination), and a
    null for each NOT NULL column the record left out (stored as '' or 0): it reads back as published."""
    extra = {k: v for k, v in record.items() if k not in _STATUS_RECORD_FIELDS}
    extra.update((k, None) for k in ("occurred_at", "row") if record.get(k) is None)
    return extra or None


def _or_zero(row: Any) -> Any:
    return 0 if row is None else row


def _campaign_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    result = {c: row[c] for c in _CAMPAIGN_COLUMNS}
    for c in _JSON_CAMPAIGN_COLUMNS:
        if isinstance(result[c], str):
            result[c] = jsoncodec.loads(result[c])
    result["stopped"] = bool(result["stopped"])
    result["final"] = result["status"] in FINAL_CAMPAIGN_STATUSES
    return result


def _message_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    result = {c: row[c] for c in _MESSAGE_COLUMNS}
    result["variables"] = jsoncodec.loads(result["variables"]) if result["variables"] else {}
    return result


def _status_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored status record as it was published."""
    record: dict[str, Any] = {"type": "MessageStatusChanged"}
    record.update((c, row[c]) for c in _STATUS_COLUMNS if c != "extra")
    if row["extra"]:
        record.update(jsoncodec.loads(row["extra"]))
    return record

