"""Stored events -> wire records. Pure: the same stored event always gives the same records and ids.

The relay publishes these; the application also uses them to store a command's answer, so a repeated
command is answered with byte-identical records.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from schemas import topics
from services.common import ids
from services.command_handler.domain.model import SEQUENCE_STEP, Campaign, CommandLog, MessageBlock, message_sequences

RECORDS_PER_STORED_EVENT = 10  # campaign sequence = version * 10 + k


@dataclass(frozen=True)
class WireRecord:
    topic: str
    key: str
    value: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "key": self.key, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WireRecord":
        return cls(data["topic"], data["key"], data["value"])


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_records(stored_event: Any) -> list[WireRecord]:
    """Every wire record one stored event stands for (possibly none)."""
    if isinstance(stored_event, MessageBlock.Created):
        return _waiting_records(stored_event)
    if isinstance(stored_event, MessageBlock.Moved):
        return _moved_records(stored_event)
    if isinstance(stored_event, CommandLog.Answered):
        return [WireRecord.from_dict(r) for r in stored_event.records] if stored_event.publish else []
    if isinstance(stored_event, CommandLog.AnswerRepeated):
        return [WireRecord.from_dict(r) for r in stored_event.records]
    mapper = _CAMPAIGN_MAPPERS.get(type(stored_event))
    if mapper is None:
        return []  # e.g. ChannelLock events: internal only
    return _campaign_records(stored_event, mapper(stored_event))


def campaign_answer_records(stored_events: list[Any], causation_id: str) -> list[WireRecord]:
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

def _campaign_records(e: Any, bodies: list[tuple[str, str, dict]]) -> list[WireRecord]:
    campaign_id = str(e.originator_id)
    records = []
    status_change = getattr(e, "status_change", None)
    if status_change:
        bodies = bodies + [(topics.CAMPAIGN_EVENTS, "CampaignStatusChanged", dict(status_change))]
    for k, (topic, type_name, body) in enumerate(bodies):
        value = {
            "type": type_name,
            "event_id": ids.record_event_id(e.originator_id, e.originator_version, k),
            "campaign_id": campaign_id,
            "sequence": e.originator_version * RECORDS_PER_STORED_EVENT + k,
            "occurred_at": rfc3339(e.timestamp),
            "causation_id": e.causation_id,
            **body,
        }
        records.append(WireRecord(topic, campaign_id, value))
    return records


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
        "claim_id": e.claim_id, "channel": e.channel, "run_no": e.run_no, "template": e.template,
        "items": e.items, "remaining_queued": e.counts["queued"], "holds_channel": e.holds_channel,
    })]


def _progressed(e: Any) -> list:
    return []


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


# A message moves about five times: its id (a uuid5) is worth remembering between the events of a run.
_message_id = functools.lru_cache(maxsize=1 << 16)(ids.message_id)


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
