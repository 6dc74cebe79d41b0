"""Drives the command handler's application directly (no broker) and reads back the wire records it stored."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from schemas import topics
from schemas.times import utc_now
from schemas.internal import SenderResult
from services.common import jsoncodec
from services.command_handler import wire
from services.command_handler.application import OutreachApp
from services.command_handler.handlers import RecordHandler


class Driver:
    """Publishes commands straight into the application (through RecordHandler); `last` holds every record
    the latest command stored, `new_records()` those stored since the last read."""

    def __init__(self, app: OutreachApp):
        self.app = app
        self.handler = RecordHandler(app)
        self.position = 0
        self.last: list[dict] = []

    def send(self, type_: str, campaign_id: str, command_id: str | None = None, **payload) -> list[dict]:
        command_id = command_id or str(uuid.uuid4())
        value = {"type": type_, "command_id": command_id, "campaign_id": campaign_id, "issued_by": "alice",
                 "issued_at": datetime.now(timezone.utc).isoformat(), **payload}
        assert self.handler.handle(topics.COMMANDS, jsoncodec.dumps(value)) is None
        self.last = self.new_records()
        return [r["value"] for r in self.last if r["topic"] == topics.CAMPAIGN_EVENTS
                and r["value"]["causation_id"] == command_id]

    def new_records(self) -> list[dict]:
        out = []
        for n in self.app.recorder.select_notifications(start=self.position + 1, limit=10_000):
            self.position = n.id
            out += [r.as_dict() for r in wire.to_records(self.app.mapper.to_domain_event(n))]
        return out


def sender_result(message_id: str, outcome: str, attempt: int | None = 1, provider_code: str | None = None,
                  **fields) -> SenderResult:
    """One provider result as the sender reports it (schemas.internal.SenderResult), happening now."""
    return SenderResult(message_id=message_id, outcome=outcome, attempt=attempt, provider_code=provider_code,
                        occurred_at=utc_now(), **fields)
