"""Record -> use case. Decides what a record is (command, claim, results, hold, expiry, opt-out, poison),
parses it with its `schemas/` model and hands the typed record to its use case.

Kept free of Kafka: the consumer in `app.py` hands each record's topic and value here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from schemas import topics
from schemas.commands import COMMAND_TYPES, MAX_CHUNK_BYTES, CommandHeader, parse_command, validation_detail
from schemas.internal import ClaimRequest, Expiry, OptOutChanged, SenderResults, SendingHold, TestMessageResult
from services.common import ids, jsoncodec, logs, records
from services.command_handler.application import OutreachApp

# The sender's results, its circuit breakers' holds and its test messages' results share a topic (same key, in
# order): told by `type`.
SenderRecord = Union[SenderResults, SendingHold, TestMessageResult]
SENDER_RESULTS_RECORD: TypeAdapter[SenderRecord] = TypeAdapter(Annotated[SenderRecord, Field(discriminator="type")])


@dataclass(frozen=True)
class DeadLetter:
    """A record that cannot be answered: it goes to the DLQ with the error in a header."""
    error: str


def envelope_error(value: object) -> str | None:
    """Why a command record cannot be answered at all (contract: the only reasons for the DLQ), or None."""
    if not isinstance(value, dict):
        return "not a JSON object"
    if not isinstance(value.get("type"), str):
        return "no string 'type'"
    for field in ("command_id", "campaign_id"):
        if not ids.is_wire_uuid(value.get(field)):
            return f"'{field}' is missing or not a lowercase UUID"
    return None


class RecordHandler:
    def __init__(self, app: OutreachApp):
        self.app = app
        # topic -> (the model its records are parsed with, the use case a parsed record goes to)
        self._internal: dict[str, tuple[Any, Callable[[Any], None]]] = {
            topics.CLAIM_REQUESTS: (ClaimRequest, self.claim),
            topics.SENDER_RESULTS: (SENDER_RESULTS_RECORD, self.sender_record),
            topics.EXPIRIES: (Expiry, self.expiry),
            topics.OPT_OUTS: (OptOutChanged, self.opt_out),
        }

    def handle(self, topic: str, raw: bytes | None) -> DeadLetter | None:
        if topic == topics.COMMANDS:
            return self.handle_command(raw)
        route = self._internal.get(topic)
        if route is None:
            return DeadLetter(f"unexpected topic {topic}")
        model, use_case = route
        try:
            record = records.decode(model, raw)
        except records.InvalidRecord as exc:
            return DeadLetter(f"invalid record on {topic}: {exc}")
        with logs.context(campaign_id=getattr(record, "campaign_id", None),
                          message_id=getattr(record, "message_id", None)):
            use_case(record)
        return None

    # ----- internal records -----------------------------------------------------------------------
    def claim(self, request: ClaimRequest) -> None:
        self.app.claim(claim_id=request.claim_id, campaign_id=request.campaign_id,
                       max_messages=request.max_messages)

    def sender_record(self, record: SenderRecord) -> None:
        if isinstance(record, TestMessageResult):
            self.app.apply_test_result(result_id=record.result_id, campaign_id=record.campaign_id,
                                       command_id=record.command_id, message_id=record.message_id,
                                       outcome=record.outcome, provider_code=record.provider_code,
                                       provider_message_id=record.provider_message_id)
        elif isinstance(record, SendingHold):
            self.app.apply_hold(hold_id=record.hold_id, campaign_id=record.campaign_id, provider=record.provider,
                                held=record.held, reason=record.reason)
        else:
            self.app.apply_results(result_id=record.result_id, campaign_id=record.campaign_id,
                                   results=record.results)

    def expiry(self, expiry: Expiry) -> None:
        self.app.apply_expiry(expiry_id=expiry.expiry_id, campaign_id=expiry.campaign_id,
                              message_id=expiry.message_id, kind=expiry.kind, since_sequence=expiry.since_sequence)

    def opt_out(self, change: OptOutChanged) -> None:
        self.app.apply_opt_out(opt_out_id=change.opt_out_id, channel=change.channel, destination=change.destination,
                               opted_out=change.opted_out, source=change.source, issued_by=change.issued_by,
                               reason=change.reason)

    # ----- commands -------------------------------------------------------------------------------
    def handle_command(self, raw: bytes | None) -> DeadLetter | None:
        try:
            value = jsoncodec.loads(raw) if raw is not None else None
        except jsoncodec.JSONDecodeError as exc:
            return DeadLetter(f"not JSON: {exc}")
        error = envelope_error(value)
        if error:
            return DeadLetter(error)
        # Checked just above, as the contract words the DLQ's reasons: built without validating again.
        header = CommandHeader.model_construct(type=value["type"], command_id=value["command_id"],
                                               campaign_id=value["campaign_id"])
        command = None
        detail = None
        size = len(raw or b"")
        if header.type not in COMMAND_TYPES:
            detail = f"unknown command type {header.type!r}"
        elif header.type == "AddContacts" and size > MAX_CHUNK_BYTES:
            detail = f"a contacts chunk is at most {MAX_CHUNK_BYTES // 1024} KiB ({size} bytes given)"
        elif size > topics.MAX_RECORD_BYTES:
            detail = f"a command is at most {topics.MAX_RECORD_BYTES} bytes ({size} given)"
        else:
            try:
                command = parse_command(raw)
            except ValidationError as exc:
                detail = validation_detail(exc)
        with logs.context(campaign_id=header.campaign_id, command_id=header.command_id):
            self.app.handle_command(command, header, invalid_detail=detail)
        return None
