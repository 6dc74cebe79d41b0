"""The projector: the fold of consumed records into the read model (decoding, checking, applying a batch).

`decode_batch` turns a consumed batch into checked campaign events and message-status records (poison
records logged and skipped); `apply_isolating_poison` applies them in one transaction, or one by one when a
record cannot be stored. The consumer (`app.py`) and `outreach replay` share both.
"""
from __future__ import annotations

import logging
from typing import Any

from schemas import topics
from services.common import jsoncodec
from services.projections.read_model import InvalidRecord, ReadModel, check_campaign_event, check_message_status

log = logging.getLogger("outreach.projections")

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
            log.warning("skipping poison record %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            continue
        (campaign_events if record.topic == topics.CAMPAIGN_EVENTS else statuses).append(value)
    return campaign_events, statuses, skipped


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
            log.warning("skipping poison campaign event %s: %r", event.get("event_id"), exc)
    for status in statuses:
        try:
            model.apply_batch([], [status])
        except Exception as exc:
            if model.is_unavailable(exc):
                raise
            skipped += 1
            log.warning("skipping poison message-status record %s: %r", status.get("event_id"), exc)
    return skipped


__all__ = ["InvalidRecord", "ReadModel", "apply_isolating_poison", "check_campaign_event", "check_message_status",
           "decode_batch"]
