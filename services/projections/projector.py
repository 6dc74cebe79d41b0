"""The projector: the fold of consumed records into the read model (checking, decoding, applying a batch).

Idempotence comes from what the records carry, never from Kafka offsets, and is stored in the same
transaction as the effect:
- a campaign event is kept once in `campaign_events` (by `event_id`); the `campaigns` row is the fold of the
  campaign's events in `sequence` order (`fold.py`; an event older than the row's `last_sequence` refolds the
  row from the stored history, so even out-of-order delivery gives the same row);
- a message-status record is kept once in `message_events` (by `event_id`); the `messages` row holds the
  record with the highest `sequence` (the per-message position), plus the destination and variables of its
  `waiting` record.
So the tables are a function of the *set* of records applied: a batch may be applied again, whole or in part,
in any order, with the same result, and a replay of the same events gives the same rows (`canonical_dump`).
Every value comes from the records: the projection stamps nothing with its own clock.

A `CommandRejected` for an unknown campaign (sequence 0) has no campaign row: it is kept in `campaign_events`
only, so `events(campaign_id)` shows it.

The consumer (`app.py`) and `outreach replay` use `ReadModel`, `decode_batch` and `apply_isolating_poison`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from schemas import topics
from schemas.events import CAMPAIGN_EVENT_ADAPTER, CAMPAIGN_EVENT_TYPES, MessageStatusChanged
from schemas.internal import OptOutListChanged
from services.common import jsoncodec, logs
from services.common import records as records_codec
from services.common.records import InvalidRecord
from services.projections import schema
from services.projections.fold import fold_campaign
from services.projections.schema import (
    CAMPAIGN_COLUMNS,
    EVENT_COLUMNS,
    JSON_CAMPAIGN_COLUMNS,
    MESSAGE_COLUMNS,
    MESSAGE_STATE_COLUMNS,
    OPT_OUT_COLUMNS,
    STATUS_COLUMNS,
    STATUS_RECORD_FIELDS,
)
from services.projections.storage import ReadModelUnavailable, Session
from services.projections.views import ReadViews

log = logging.getLogger("outreach.projections")


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


_MESSAGE_STATUS = TypeAdapter(MessageStatusChanged)


def _conforms(model: TypeAdapter, value: dict[str, Any]) -> None:
    """InvalidRecord unless `value` is a valid `model` (the contract's own models: ids in their exact form,
    statuses and reasons from their lists), so nothing a stranger publishes half-right reaches the model."""
    try:
        model.validate_python(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InvalidRecord(f"{'.'.join(map(str, first['loc'])) or 'record'}: {first['msg']}") from None


def check_campaign_event(value: Any) -> dict[str, Any]:
    """The record if it is a campaign event of a type the contract (or this version) knows, as it words it;
    InvalidRecord otherwise."""
    if not isinstance(value, dict):
        raise InvalidRecord("not a JSON object")
    for key in ("type", "event_id", "campaign_id"):
        _require(value, key, str)
    if _require(value, "sequence", int) < 0:
        raise InvalidRecord("negative sequence")
    for key in ("occurred_at", "causation_id"):
        _optional(value, key, str)
    if value["type"] not in CAMPAIGN_EVENT_TYPES:  # nothing to fold it into; it must not make a campaign row
        raise InvalidRecord(f"unknown campaign event type {value['type'][:64]!r}")
    _conforms(CAMPAIGN_EVENT_ADAPTER, value)
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
    _conforms(_MESSAGE_STATUS, value)
    return value


_CHECKS = {topics.CAMPAIGN_EVENTS: check_campaign_event, topics.MESSAGE_STATUS: check_message_status}


def decode_batch(records: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(campaign events, message statuses, skipped) from aiokafka ConsumerRecords; poison records are logged."""
    campaign_events: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []
    skipped = 0
    for record in records:
        check = _CHECKS.get(record.topic)
        if check is None:
            continue
        try:
            value = check(jsoncodec.loads(record.value or b""))
        except (jsoncodec.JSONDecodeError, InvalidRecord) as exc:
            skipped += 1
            with logs.context(**logs.ids_in_json(record.value)):
                log.warning("skipping poison record %s[%d]@%d: %s", record.topic, record.partition, record.offset,
                            exc)
            continue
        (campaign_events if record.topic == topics.CAMPAIGN_EVENTS else statuses).append(value)
    return campaign_events, statuses, skipped


def decode_opt_out_list(records: list[Any]) -> tuple[list[OptOutListChanged], int]:
    """(changes of the opt-out lists, skipped) from aiokafka ConsumerRecords of outreach.internal.opt-out-list (an
    internal record: checked by its model); poison records are logged."""
    changes: list[OptOutListChanged] = []
    skipped = 0
    for record in records:
        if record.topic != topics.OPT_OUT_LIST:
            continue
        try:
            changes.append(records_codec.decode(OptOutListChanged, record.value))
        except InvalidRecord as exc:
            skipped += 1
            log.warning("skipping poison record %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
    return changes, skipped


# ------------------------------------------------------------------ the read model, written

class ReadModel(ReadViews):
    """The read model the projections write (and every query of `ReadViews`). One instance per process;
    thread-safe (a small pool of connections)."""

    _fed_from_start: bool | None = None

    @property
    def fed_from_start(self) -> bool:
        """False until a first batch is applied: a new (or rebuilt) read model must be fed every record from the
        beginning of the topics, whatever offsets a consumer group committed for an earlier one."""
        if not self._fed_from_start:
            with self._backend.session() as s:
                self._fed_from_start = schema.fed_from_start(s)
        return self._fed_from_start

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
                    _apply_campaign_events(s, campaign_events)
                if message_statuses:
                    _apply_statuses(s, message_statuses)
                if not self._fed_from_start:
                    schema.mark_fed_from_start(s)
        except ReadModelUnavailable:
            raise
        except Exception as exc:
            if self._backend.transient(exc):
                raise ReadModelUnavailable(str(exc)) from exc
            raise
        self._fed_from_start = True


    def apply_opt_out_changes(self, changes: list[OptOutListChanged]) -> None:
        """Apply changes of the opt-out lists in one transaction: each destination's row follows its change with the
        highest sequence, so a change applied again, or late, changes nothing."""
        try:
            with self._backend.transaction() as s:
                s.many(_UPSERT_OPT_OUT, [
                    (c.channel, c.destination, int(c.opted_out), c.source, c.issued_by, c.reason, c.occurred_at,
                     c.sequence, c.event_id)
                    for c in changes])
        except ReadModelUnavailable:
            raise
        except Exception as exc:
            if self._backend.transient(exc):
                raise ReadModelUnavailable(str(exc)) from exc
            raise


def apply_opt_outs_isolating_poison(model: ReadModel, changes: list[OptOutListChanged]) -> int:
    """As `apply_isolating_poison`, for changes of the opt-out lists. Returns the skipped count."""
    try:
        model.apply_opt_out_changes(changes)
        return 0
    except Exception as exc:
        if model.is_unavailable(exc):
            raise
        log.warning("batch of %d opt-out list changes failed; applying them one by one", len(changes), exc_info=True)
    skipped = 0
    for change in changes:
        try:
            model.apply_opt_out_changes([change])
        except Exception as exc:
            if model.is_unavailable(exc):
                raise
            skipped += 1
            log.warning("skipping poison opt-out list change %s: %r", change.event_id, exc)
    return skipped


def apply_isolating_poison(model: ReadModel, campaign_events: list[dict], statuses: list[dict]) -> int:
    """Apply a batch in one transaction; if a record in it cannot be stored (a value the database cannot bind,
    a number out of range), apply the records one by one and skip the bad ones. Returns the skipped count.
    An unavailable database (locked, disk full, connection lost) is raised: the caller retries the batch."""
    try:
        model.apply_batch(campaign_events, statuses)
        return 0
    except Exception as exc:
        if model.is_unavailable(exc):
            raise
        log.warning("batch of %d records failed; applying them one by one", len(campaign_events) + len(statuses),
                    exc_info=True)
    skipped = 0
    for event in campaign_events:
        try:
            model.apply_batch([event], [])
        except Exception as exc:
            if model.is_unavailable(exc):
                raise
            skipped += 1
            with logs.context(**logs.ids_of(event)):
                log.warning("skipping poison campaign event %s: %r", event.get("event_id"), exc)
    for status in statuses:
        try:
            model.apply_batch([], [status])
        except Exception as exc:
            if model.is_unavailable(exc):
                raise
            skipped += 1
            with logs.context(**logs.ids_of(status)):
                log.warning("skipping poison message-status record %s: %r", status.get("event_id"), exc)
    return skipped


# ------------------------------------------------------------------ the statements of a batch

def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


# A fold never replaces a newer one: two projections instances may fold one campaign while its partition
# moves between them, and the later commit may be the older fold.
_UPSERT_CAMPAIGN = (
    _insert("campaigns", CAMPAIGN_COLUMNS) + " ON CONFLICT (campaign_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in CAMPAIGN_COLUMNS[1:])
    + " WHERE excluded.last_sequence >= campaigns.last_sequence"
)
_INSERT_EVENT = _insert("campaign_events", EVENT_COLUMNS) + " ON CONFLICT (event_id) DO NOTHING"
_INSERT_STATUS = _insert("message_events", STATUS_COLUMNS) + " ON CONFLICT (event_id) DO NOTHING"
# The state columns follow the record with the highest sequence; the `waiting` record's fields fill in
# whenever it arrives (before or after later records).
_UPSERT_MESSAGE = (
    _insert("messages", MESSAGE_COLUMNS) + " ON CONFLICT (message_id) DO UPDATE SET "
    + ", ".join(
        f"{c} = CASE WHEN excluded.last_sequence > messages.last_sequence THEN excluded.{c} ELSE messages.{c} END"
        for c in MESSAGE_STATE_COLUMNS)
    + ", " + ", ".join(f"{c} = COALESCE(messages.{c}, excluded.{c})" for c in ("destination", "variables",
                                                                               "created_at"))
)


_UPSERT_OPT_OUT = (
    _insert("opt_outs", OPT_OUT_COLUMNS) + " ON CONFLICT (channel, destination) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in OPT_OUT_COLUMNS[2:])
    + " WHERE excluded.sequence > opt_outs.sequence"
)


def _apply_campaign_events(s: Session, events: list[dict[str, Any]]) -> None:
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
            state = fold_campaign(campaign_id, _stored_events(s, campaign_id))
        else:
            state = fold_campaign(campaign_id, new, state)
        rows.append(tuple(_json_text(state[c]) if c in JSON_CAMPAIGN_COLUMNS else state[c]
                          for c in CAMPAIGN_COLUMNS))
    s.many(_UPSERT_CAMPAIGN, rows)


def _apply_statuses(s: Session, records: list[dict[str, Any]]) -> None:
    s.many(_INSERT_STATUS, [
        (r["event_id"], r["message_id"], r["campaign_id"], _or_zero(r.get("row")), r.get("channel"),
         r.get("run_no"), r["status"], r.get("previous_status"), r.get("reason"), r.get("provider_code"),
         r.get("attempt"), r.get("occurred_at") or "", r.get("causation_id"), r["sequence"],
         _json_text(_extra_fields(r)))
        for r in records
    ])
    s.many(_UPSERT_MESSAGE, _message_rows(records))


def _load_state(s: Session, campaign_id: str) -> dict[str, Any] | None:
    row = s.one("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,))
    if row is None:
        return None
    state = {c: row[c] for c in CAMPAIGN_COLUMNS}
    for c in JSON_CAMPAIGN_COLUMNS:
        if state[c] is not None:
            state[c] = jsoncodec.loads(state[c])
    return state


def _stored_events(s: Session, campaign_id: str) -> list[dict[str, Any]]:
    return [jsoncodec.loads(row["body"]) for row in s.rows(
        "SELECT body FROM campaign_events WHERE campaign_id = ? AND sequence > 0 ORDER BY sequence, event_id",
        (campaign_id,))]


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
    extra = {k: v for k, v in record.items() if k not in STATUS_RECORD_FIELDS}
    extra.update((k, None) for k in ("occurred_at", "row") if record.get(k) is None)
    return extra or None


def _or_zero(row: Any) -> Any:
    return 0 if row is None else row


def _json_text(value: Any) -> str | None:
    return None if value is None else jsoncodec.dumps(value).decode()


__all__ = ["ReadModel", "apply_isolating_poison", "apply_opt_outs_isolating_poison", "check_campaign_event",
           "check_message_status", "decode_batch", "decode_opt_out_list"]
