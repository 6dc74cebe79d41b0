"""The read model: campaigns, their event history and their messages' latest states, in one SQLite file.

Plain SQL behind one small class, so the HTTP API, audit and replay can share it later.

Idempotence comes from the positions the records carry, never from Kafka offsets:
- a campaign event changes the `campaigns` row only if its `sequence` is above the row's `last_sequence`
  (and is kept in `campaign_events` once, by `event_id`);
- a message-status record changes its `messages` row only if its `sequence` (the per-message position)
  is above the row's `last_sequence`.
So a batch may be applied again, whole or in part, in any order per message, with the same result.

A `CommandRejected` for an unknown campaign (sequence 0) has no campaign row: it is kept in
`campaign_events` only, so `events(campaign_id)` shows it.

Counts are computed from `messages` (GROUP BY over the (campaign_id, status) index), so they always add up.
The file is opened in WAL mode: the projections process writes while CLI processes read.
"""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from schemas import topics
from schemas.events import MESSAGE_STATUSES
from services.common import jsoncodec
from services.common.settings import Settings, get_settings

FILE_NAME = "read-model.db"
FINAL_CAMPAIGN_STATUSES = frozenset({"complete", "complete_with_errors", "failed", "deleted"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    campaign_id     TEXT PRIMARY KEY,
    name            TEXT,
    description     TEXT,
    channel         TEXT,
    status          TEXT NOT NULL DEFAULT 'created',
    previous_status TEXT,
    stopped         INTEGER NOT NULL DEFAULT 0,
    stopped_by      TEXT,
    created_by      TEXT,
    created_at      TEXT,
    updated_at      TEXT,
    template        TEXT,            -- JSON
    summary         TEXT,            -- JSON: the latest RunSummary (CampaignReady / TemplateUpdated)
    reported_counts TEXT,            -- JSON: counts of the latest CampaignStatusChanged
    message_count   INTEGER,
    run_no          INTEGER,
    last_sequence   INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS campaign_events (
    campaign_id  TEXT NOT NULL,
    sequence     INTEGER NOT NULL,
    event_id     TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    occurred_at  TEXT,
    causation_id TEXT,
    body         TEXT NOT NULL       -- JSON: the whole record value
);
CREATE INDEX IF NOT EXISTS campaign_events_by_campaign ON campaign_events (campaign_id, sequence);
CREATE INDEX IF NOT EXISTS campaign_events_by_causation ON campaign_events (causation_id);
CREATE TABLE IF NOT EXISTS messages (
    message_id      TEXT PRIMARY KEY,
    campaign_id     TEXT NOT NULL,
    row             INTEGER,
    channel         TEXT,
    status          TEXT NOT NULL,
    previous_status TEXT,
    reason          TEXT,
    provider_code   TEXT,
    attempt         INTEGER,
    run_no          INTEGER,
    occurred_at     TEXT,
    last_sequence   INTEGER NOT NULL
);  -- a rowid table: upserts measured 4x faster than WITHOUT ROWID with random uuid keys
CREATE INDEX IF NOT EXISTS messages_by_campaign_status ON messages (campaign_id, status);
"""

_CAMPAIGN_COLUMNS = (
    "campaign_id", "name", "description", "channel", "status", "previous_status", "stopped", "stopped_by",
    "created_by", "created_at", "updated_at", "template", "summary", "reported_counts", "message_count", "run_no",
    "last_sequence",
)
_JSON_CAMPAIGN_COLUMNS = ("template", "summary", "reported_counts")
_UPSERT_CAMPAIGN = (
    f"INSERT INTO campaigns ({', '.join(_CAMPAIGN_COLUMNS)}) VALUES ({', '.join('?' * len(_CAMPAIGN_COLUMNS))}) "
    "ON CONFLICT (campaign_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _CAMPAIGN_COLUMNS[1:])
    + " WHERE excluded.last_sequence > campaigns.last_sequence"
)
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO campaign_events (campaign_id, sequence, event_id, type, occurred_at, causation_id, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_MESSAGE_COLUMNS = (
    "message_id", "campaign_id", "row", "channel", "status", "previous_status", "reason", "provider_code",
    "attempt", "run_no", "occurred_at", "last_sequence",
)
_UPSERT_MESSAGE = (
    f"INSERT INTO messages ({', '.join(_MESSAGE_COLUMNS)}) VALUES ({', '.join('?' * len(_MESSAGE_COLUMNS))}) "
    "ON CONFLICT (message_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _MESSAGE_COLUMNS[1:])
    + " WHERE excluded.last_sequence > messages.last_sequence"
)


class InvalidRecord(ValueError):
    """A record that is JSON but lacks what the read model needs (logged and skipped by the consumer)."""


def _require(value: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    item = value.get(key)
    if not isinstance(item, kind) or isinstance(item, bool) and kind is int:
        raise InvalidRecord(f"{key!r} missing or not {getattr(kind, '__name__', kind)}")
    return item


def check_campaign_event(value: Any) -> dict[str, Any]:
    """The record if it has what a campaign event needs; InvalidRecord otherwise."""
    if not isinstance(value, dict):
        raise InvalidRecord("not a JSON object")
    for key in ("type", "event_id", "campaign_id"):
        _require(value, key, str)
    if _require(value, "sequence", int) < 0:
        raise InvalidRecord("negative sequence")
    return value


def check_message_status(value: Any) -> dict[str, Any]:
    """The record if it has what a message-status record needs; InvalidRecord otherwise."""
    if not isinstance(value, dict):
        raise InvalidRecord("not a JSON object")
    for key in ("message_id", "campaign_id", "status"):
        _require(value, key, str)
    _require(value, "sequence", int)
    return value


def empty_counts() -> dict[str, int]:
    return {"total": 0, **{status: 0 for status in MESSAGE_STATUSES}}


class ReadModel:
    """The SQLite read model. One instance per process; safe to share between threads (one lock)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: a 300k-message campaign stays in memory
        self._conn.execute("PRAGMA temp_store=MEMORY")
        self._conn.executescript(_SCHEMA)

    @classmethod
    def open(cls, settings: Settings | None = None) -> ReadModel:
        """The read model at `settings.data_dir / "read-model.db"`."""
        settings = settings or get_settings()
        return cls(settings.data_dir / FILE_NAME)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ReadModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if campaign_events:
                    self._apply_campaign_events(conn, campaign_events)
                if message_statuses:
                    conn.executemany(_UPSERT_MESSAGE, _latest_message_rows(message_statuses))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _apply_campaign_events(self, conn: sqlite3.Connection, events: list[dict[str, Any]]) -> None:
        conn.executemany(_INSERT_EVENT, [
            (e["campaign_id"], e["sequence"], e["event_id"], e["type"], e.get("occurred_at"), e.get("causation_id"),
             jsoncodec.dumps(e).decode())
            for e in events
        ])
        states: dict[str, dict[str, Any] | None] = {}
        # A campaign's sequence is its order: sorting makes a batch's order within a campaign irrelevant.
        for event in sorted(events, key=lambda e: (e["campaign_id"], e["sequence"])):
            if event["sequence"] == 0:  # a rejection of an unknown campaign: history only
                continue
            campaign_id = event["campaign_id"]
            if campaign_id not in states:
                states[campaign_id] = self._load_state(conn, campaign_id)
            state = states[campaign_id]
            if state is None:
                state = states[campaign_id] = dict.fromkeys(_CAMPAIGN_COLUMNS)
                state.update(campaign_id=campaign_id, status="created", stopped=0, last_sequence=-1)
            if event["sequence"] <= state["last_sequence"]:
                continue  # seen already
            _evolve(state, event)
            state["last_sequence"] = event["sequence"]
            state["updated_at"] = event.get("occurred_at") or state["updated_at"]
        rows = []
        for state in states.values():
            if state is None:
                continue
            rows.append(tuple(
                jsoncodec.dumps(state[c]).decode() if c in _JSON_CAMPAIGN_COLUMNS and state[c] is not None
                else state[c]
                for c in _CAMPAIGN_COLUMNS
            ))
        conn.executemany(_UPSERT_CAMPAIGN, rows)

    @staticmethod
    def _load_state(conn: sqlite3.Connection, campaign_id: str) -> dict[str, Any] | None:
        row = conn.execute("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,)).fetchone()
        if row is None:
            return None
        state = {c: row[c] for c in _CAMPAIGN_COLUMNS}
        for c in _JSON_CAMPAIGN_COLUMNS:
            if state[c] is not None:
                state[c] = jsoncodec.loads(state[c])
        return state

    # ------------------------------------------------------------------ queries

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def counts(self, campaign_id: str) -> dict[str, int]:
        """Messages per status (every status, zeros included) and `total`."""
        counts = empty_counts()
        for row in self._read(
            "SELECT status, COUNT(*) AS n FROM messages WHERE campaign_id = ? GROUP BY status", (campaign_id,)
        ):
            counts[row["status"]] = counts.get(row["status"], 0) + row["n"]
            counts["total"] += row["n"]
        return counts

    def campaign(self, campaign_id: str) -> dict[str, Any] | None:
        """The campaign with its `counts`, or None if no event of it has been applied."""
        rows = self._read("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,))
        if not rows:
            return None
        result = _campaign_dict(rows[0])
        result["counts"] = self.counts(campaign_id)
        return result

    def campaigns(self) -> list[dict[str, Any]]:
        """Every campaign (newest first) with its `counts`."""
        counts: dict[str, dict[str, int]] = {}
        for row in self._read("SELECT campaign_id, status, COUNT(*) AS n FROM messages GROUP BY campaign_id, status"):
            c = counts.setdefault(row["campaign_id"], empty_counts())
            c[row["status"]] = c.get(row["status"], 0) + row["n"]
            c["total"] += row["n"]
        result = []
        for row in self._read("SELECT * FROM campaigns ORDER BY created_at DESC, campaign_id"):
            campaign = _campaign_dict(row)
            campaign["counts"] = counts.get(campaign["campaign_id"], empty_counts())
            result.append(campaign)
        return result

    def events(self, campaign_id: str) -> list[dict[str, Any]]:
        """The campaign's events (rejections of it as an unknown campaign included), in sequence order."""
        return [
            jsoncodec.loads(row["body"])
            for row in self._read(
                "SELECT body FROM campaign_events WHERE campaign_id = ? ORDER BY sequence, occurred_at, event_id",
                (campaign_id,),
            )
        ]

    def answers(self, command_id: str) -> list[dict[str, Any]]:
        """The events answering one command (matched by causation_id), in sequence order."""
        return [
            jsoncodec.loads(row["body"])
            for row in self._read(
                "SELECT body FROM campaign_events WHERE causation_id = ? ORDER BY sequence, event_id", (command_id,)
            )
        ]

    def is_final(self, campaign_id: str) -> bool:
        """True when the campaign's status is complete, complete_with_errors, failed or deleted."""
        rows = self._read("SELECT status FROM campaigns WHERE campaign_id = ?", (campaign_id,))
        return bool(rows) and rows[0]["status"] in FINAL_CAMPAIGN_STATUSES

    def messages(self, campaign_id: str, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The campaign's messages in row order, optionally of one status."""
        sql = "SELECT * FROM messages WHERE campaign_id = ?"
        params: list[Any] = [campaign_id]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        sql += " ORDER BY row"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [dict(row) for row in self._read(sql, tuple(params))]


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
        if event.get("summary") is not None:
            state["summary"] = event["summary"]
            state["message_count"] = event["summary"].get("message_count", state["message_count"])
    elif kind in ("CampaignRunStarted", "RetryStarted"):
        state["run_no"] = event.get("run_no")
    elif kind == "CampaignStopped":
        state["stopped"] = 1
        state["stopped_by"] = event.get("stopped_by")
    elif kind == "CampaignDeleted":
        state["previous_status"], state["status"] = state["status"], "deleted"
    elif kind == "CampaignStatusChanged":
        state["status"] = event.get("status") or state["status"]
        state["previous_status"] = event.get("previous_status")
        state["stopped"] = int(bool(state["stopped"]) or bool(event.get("stopped")))
        state["reported_counts"] = event.get("counts")


def _latest_message_rows(records: list[dict[str, Any]]) -> list[tuple]:
    """One row per message: its record with the highest sequence in the batch."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        current = latest.get(record["message_id"])
        if current is None or record["sequence"] > current["sequence"]:
            latest[record["message_id"]] = record
    return [
        (r["message_id"], r["campaign_id"], r.get("row"), r.get("channel"), r["status"], r.get("previous_status"),
         r.get("reason"), r.get("provider_code"), r.get("attempt"), r.get("run_no"), r.get("occurred_at"),
         r["sequence"])
        for r in latest.values()
    ]


def _campaign_dict(row: sqlite3.Row) -> dict[str, Any]:
    result = {c: row[c] for c in _CAMPAIGN_COLUMNS}
    for c in _JSON_CAMPAIGN_COLUMNS:
        if result[c] is not None:
            result[c] = jsoncodec.loads(result[c])
    result["stopped"] = bool(result["stopped"])
    result["final"] = result["status"] in FINAL_CAMPAIGN_STATUSES
    return result
