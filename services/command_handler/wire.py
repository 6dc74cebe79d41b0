"""Stored events -> wire records. Pure: the same stored event always gives the same records and ids.

The relay publishes these; the application also uses them to store a command's answer, so a repeated
command is answered with byte-identical records. Public records are dicts the contract fixes; an internal
record (the sender's WorkClaimed) is built as its `schemas.internal` model, so one the model refuses is
caught here, where it is made, and never published.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from schemas import topics
from schemas.internal import OptOutListChanged, TestMessageWork, WorkClaimed, template_digest
from schemas.times import rfc3339
from services.common import ids, jsoncodec, records
from services.command_handler.domain.model import (
    SEQUENCE_STEP, Campaign, CommandLog, MessageBlock, OptOutList, message_sequences,
)

log = logging.getLogger(__name__)

RECORDS_PER_STORED_EVENT = 10  # campaign sequence = version * 10 + k
# The internal records the relay publishes (on topics other than the campaign events), by type: their models.
INTERNAL_MODELS: dict[str, type[BaseModel]] = {"WorkClaimed": WorkClaimed, "TestMessageWork": TestMessageWork}


@dataclass(frozen=True)
class WireRecord:
    """A public record (campaign event or message status): its value as the contract words it."""
    topic: str
    key: str
    value: dict[str, Any]

    def encoded(self) -> bytes:
        return jsoncodec.dumps(self.value)

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "key": self.key, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WireRecord":
        return cls(data["topic"], data["key"], data["value"])


@dataclass(frozen=True)
class ModelRecord:
    """An internal record: its `schemas/` model (validated when it was built), encoded by `records.encode`."""
    topic: str
    key: str
    model: BaseModel

    @functools.cached_property
    def value(self) -> dict[str, Any]:
        """The record as JSON-ready data, for readers that are not the broker (replay, tests)."""
        return self.model.model_dump(mode="json")

    def encoded(self) -> bytes:
        return records.encode(self.model)

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "key": self.key, "value": self.value}


Record = Union[WireRecord, ModelRecord]


def to_records(stored_event: Any) -> list[Record]:
    """Every wire record one stored event stands for (possibly none)."""
    if isinstance(stored_event, MessageBlock.Created):
        return _waiting_records(stored_event)
    if isinstance(stored_event, MessageBlock.Moved):
        return _moved_records(stored_event)
    if isinstance(stored_event, CommandLog.Answered):
        return [WireRecord.from_dict(r) for r in stored_event.records] if stored_event.publish else []
    if isinstance(stored_event, CommandLog.AnswerRepeated):
        return [WireRecord.from_dict(r) for r in stored_event.records]
    if isinstance(stored_event, (OptOutList.OptedOut, OptOutList.OptedIn)):
        return _opt_out_list_records(stored_event)
    mapper = _CAMPAIGN_MAPPERS.get(type(stored_event))
    if mapper is None:
        return []  # e.g. ChannelLock events: internal only
    return _campaign_records(stored_event, mapper(stored_event))


def campaign_answer_records(stored_events: list[Any], causation_id: str) -> list[Record]:
    """The campaign-event records answering one command, from the stored events it caused."""
    return [
        r for e in stored_events for r in to_records(e)
        if r.topic == topics.CAMPAIGN_EVENTS and r.value.get("causation_id") == causation_id
    ]


def rejection_for_unknown_campaign(*, command_id: str, campaign_id: str, command_type: str, reason: str,
                                   detail: str, occurred_at: datetime) -> WireRecord:
    """A rejection with no campaign to hold it: sequence 0, event id derived from the command id."""
    return WireRecord(topics.CAMPAIGN_EVENTS, campaign_id, {
        "type": "CommandRejected",
        "event_id": ids.record_event_id(ids.command_log_id(command_id), 0, 0),
        "campaign_id": campaign_id,
        "sequence": 0,
        "occurred_at": rfc3339(occurred_at),
        "causation_id": command_id,
        "command_id": command_id,
        "command_type": command_type,
        "reason": reason,
        "detail": detail,
    })


# ----- campaign events -------------------------------------------------------------------------

# What a command says about who sent it and how it arrived, copied by the handler onto the campaign events
# answering it (schemas.events' CampaignEventBase): its issuer, through the API after its token was checked,
# replayed from the DLQ. So a campaign's history names the person behind every command it answers.
PROVENANCE_FIELDS = ("issued_by", "issued_via", "replayed_by")


def _campaign_records(e: Any, bodies: list[tuple[str, str, dict]]) -> list[Record]:
    campaign_id = str(e.originator_id)
    out: list[Record] = []
    status_change = getattr(e, "status_change", None)
    if status_change:
        bodies = bodies + [(topics.CAMPAIGN_EVENTS, "CampaignStatusChanged", dict(status_change))]
    for k, (topic, type_name, body) in enumerate(bodies):
        event_id = ids.record_event_id(e.originator_id, e.originator_version, k)
        model = INTERNAL_MODELS.get(type_name) if topic != topics.CAMPAIGN_EVENTS else None
        if model is not None:
            out += _internal_record(model, topic, campaign_id, type=type_name, event_id=event_id,
                                    campaign_id=campaign_id, **body)
            continue
        value = {
            "type": type_name,
            "event_id": event_id,
            "campaign_id": campaign_id,
            "sequence": e.originator_version * RECORDS_PER_STORED_EVENT + k,
            "occurred_at": rfc3339(e.timestamp),
            "causation_id": e.causation_id,
            **body,
        }
        for name in PROVENANCE_FIELDS:
            if provenance := getattr(e, name, None):
                value[name] = provenance
        out.append(WireRecord(topic, campaign_id, value))
    return out


def _internal_record(model: type[BaseModel], topic: str, key: str, **fields: Any) -> list[ModelRecord]:
    """The record as its model, or none (logged) if the model refuses it: a bug, never published."""
    try:
        return [ModelRecord(topic, key, model(**fields))]
    except ValidationError as exc:
        log.error("not publishing a %s its model refuses (event %s): %s", model.__name__, fields.get("event_id"), exc)
        return []


def _event(type_name: str, **body: Any) -> tuple[str, str, dict]:
    return (topics.CAMPAIGN_EVENTS, type_name, body)


def _created(e: Campaign.Created) -> list:
    return [_event("CampaignCreated", name=e.name, description=e.description, channel=e.channel,
                   template=e.template, created_by=e.created_by)]


def _contacts_added(e: Any) -> list:
    out = [_event("ContactsAdded", chunk_no=e.chunk_no, valid=len(e.valid_rows), invalid=len(e.invalid_rows),
                  invalid_rows=[{"row": row, "reason": reason} for row, reason in e.invalid_rows])]
    if e.last_chunk:
        out.append(_event("CampaignReady", message_count=e.message_count, summary=e.summary))
    return out


def _contacts_answer_repeated(e: Any) -> list:
    return [_event("ContactsAdded", **e.answer)]


def _template_updated(e: Any) -> list:
    return [_event("TemplateUpdated", template=e.template, summary=e.summary)]


def _run_started(e: Any) -> list:
    return [_event("CampaignRunStarted", run_no=e.run_no, accepted_by=e.accepted_by, disclaimer=e.disclaimer,
                   message_count=e.message_count, suppressed_count=e.suppressed_count)]


def _stopped(e: Any) -> list:
    return [_event("CampaignStopped", stopped_by=e.stopped_by, cancelled_count=e.cancelled_count)]


def _retry_started(e: Any) -> list:
    return [_event("RetryStarted", run_no=e.run_no, message_count=e.message_count)]


def _deleted(e: Any) -> list:
    return [_event("CampaignDeleted")]


def _rejected(e: Any) -> list:
    return [_event("CommandRejected", command_id=e.command_id, command_type=e.command_type, reason=e.reason,
                   detail=e.detail)]


def _work_claimed(e: Any) -> list:
    return [(topics.SENDER_WORK, "WorkClaimed", {
        "claim_id": e.claim_id, "channel": e.channel, "run_no": e.run_no,
        "template_digest": getattr(e, "template_digest", None) or template_digest(e.template),
        "items": e.items, "remaining_queued": e.counts["queued"], "holds_channel": e.holds_channel,
    })]


def _progressed(e: Any) -> list:
    return []


def _test_message_queued(e: Any) -> list:
    """The answer to a SendTestMessage, then the sender's work (after it: the relay opens the fence row first)."""
    return [_event("TestMessageQueued", message_id=e.message_id, destination=e.destination,
                   requested_by=e.requested_by, row=e.row, variables=e.variables, preview=e.preview),
            (topics.SENDER_WORK, "TestMessageWork", {
                "command_id": e.causation_id, "channel": e.channel, "template_digest": e.template_digest,
                "message_id": e.message_id, "destination": e.destination, "variables": e.variables})]


def _test_message_completed(e: Any) -> list:
    return [_event("TestMessageCompleted", message_id=e.message_id, destination=e.destination,
                   requested_by=e.requested_by, outcome=e.outcome, reason=e.reason, provider_code=e.provider_code,
                   provider_message_id=e.provider_message_id)]


def _hold_changed(e: Any) -> list:
    if e.held:
        return [_event("CampaignSendingHeld", provider=e.provider, reason=e.reason)]
    return [_event("CampaignSendingResumed", provider=e.provider)]


_CAMPAIGN_MAPPERS = {
    Campaign.Created: _created,
    Campaign.ContactsAdded: _contacts_added,
    Campaign.ContactsAnswerRepeated: _contacts_answer_repeated,
    Campaign.TemplateUpdated: _template_updated,
    Campaign.RunStarted: _run_started,
    Campaign.Stopped: _stopped,
    Campaign.RetryStarted: _retry_started,
    Campaign.Deleted: _deleted,
    Campaign.CommandRejected: _rejected,
    Campaign.WorkClaimed: _work_claimed,
    Campaign.Progressed: _progressed,
    Campaign.HoldChanged: _hold_changed,
    Campaign.TestMessageQueued: _test_message_queued,
    Campaign.TestMessageCompleted: _test_message_completed,
}


# ----- message status --------------------------------------------------------------------------

def _status_record(e: Any, *, sequence: int, campaign_id: str, channel: str, row: int, run_no: int,
                   status: str, previous_status: str | None, reason: str | None, provider_code: str | None,
                   attempt: int, occurred_at: str) -> WireRecord:
    mid = _message_id(campaign_id, row)
    return WireRecord(topics.MESSAGE_STATUS, mid, {
        "type": "MessageStatusChanged",
        "event_id": ids.record_event_id(e.originator_id, e.originator_version, f"{row}.{sequence}"),
        "message_id": mid,
        "campaign_id": campaign_id,
        "channel": channel,
        "row": row,
        "run_no": run_no or None,
        "status": status,
        "previous_status": previous_status,
        "reason": reason,
        "provider_code": provider_code,
        "attempt": attempt or None,
        "occurred_at": occurred_at,
        "causation_id": e.causation_id,
        "sequence": sequence,
    })


# A message moves about five times: its id (a uuid5) is worth remembering between nearby events. Bounded
# well below a campaign: 65,536 ids held 17 MB, so the relay's memory followed the campaign.
_message_id = functools.lru_cache(maxsize=1 << 12)(ids.message_id)


def _waiting_records(e: Any) -> list[WireRecord]:
    occurred_at = rfc3339(e.timestamp)  # once per stored event, not per record
    records = []
    for row, destination, variables in zip(e.rows, e.destinations, e.variables):
        record = _status_record(e, sequence=e.originator_version * SEQUENCE_STEP, campaign_id=e.campaign_id,
                                channel=e.channel, row=row, run_no=0, status="waiting", previous_status=None,
                                reason=None, provider_code=None, attempt=0, occurred_at=occurred_at)
        record.value.update(destination=destination, variables=variables)  # the contact, for read models
        records.append(record)
    return records


def _moved_records(e: Any) -> list[WireRecord]:
    occurred_at = rfc3339(e.timestamp)
    return [
        _status_record(e, sequence=sequence, campaign_id=e.campaign_id, channel=e.channel, row=row,
                       run_no=run_no, status=status, previous_status=previous, reason=reason, provider_code=code,
                       attempt=attempt, occurred_at=occurred_at)
        for (_index, row, previous, status, reason, code, attempt, run_no, _accepted, record), sequence
        in zip(e.changes, message_sequences(e.originator_version, e.changes))
        if record
    ]


# ----- opt-out lists ---------------------------------------------------------------------------

# An opt-out list's id is made from its channel (ids.opt_out_list_id): its events name no channel of their own.
_OPT_OUT_LIST_CHANNELS = {ids.opt_out_list_id(channel): channel for channel in ("sms", "email")}


def _opt_out_list_records(e: Any) -> list[Record]:
    """A change of a channel's opt-out list (`outreach.internal.opt-out-list`, key channel:destination), for the
    read model's list. Events stored before manual changes existed have no issued_by or reason."""
    channel = _OPT_OUT_LIST_CHANNELS.get(e.originator_id)
    if channel is None:
        log.error("an opt-out list event of an unknown list %s: not published", e.originator_id)
        return []
    return _internal_record(
        OptOutListChanged, topics.OPT_OUT_LIST, f"{channel}:{e.destination}",
        event_id=ids.record_event_id(e.originator_id, e.originator_version, 0), channel=channel,
        destination=e.destination, opted_out=isinstance(e, OptOutList.OptedOut), source=e.source,
        issued_by=getattr(e, "issued_by", None), reason=getattr(e, "reason", None), causation_id=e.causation_id,
        sequence=e.originator_version, occurred_at=rfc3339(e.timestamp))
