"""Record -> use case. Decides what a raw record is (command, claim, result, expiry, poison) and answers it.

Kept free of Kafka: the consumer loop in `app.py` hands each record's topic, key and value here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from schemas import topics
from services.common import ids, jsoncodec
from services.command_handler.application import MAX_CHUNK_BYTES, OutreachApp

log = logging.getLogger(__name__)

DLQ_VALUE_LIMIT = 64 * 1024


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


def validation_detail(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"][1:] or item["loc"])  # drop the union tag
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class RecordHandler:
    def __init__(self, app: OutreachApp):
        self.app = app

    def handle(self, topic: str, raw: bytes | None) -> DeadLetter | None:
        if topic == topics.COMMANDS:
            return self.handle_command(raw)
        value = jsoncodec.loads(raw or b"null")
        if topic == topics.CLAIM_REQUESTS:
            self.app.claim(claim_id=value["claim_id"], campaign_id=value["campaign_id"],
                           max_messages=int(value["max_messages"]))
        elif topic == topics.SENDER_RESULTS and value.get("type") == "SendingHold":
            self.app.apply_hold(hold_id=value["hold_id"], campaign_id=value["campaign_id"],
                                provider=value["provider"], held=bool(value["held"]), reason=value.get("reason", ""))
        elif topic == topics.SENDER_RESULTS:
            self.app.apply_results(result_id=value["result_id"], campaign_id=value["campaign_id"],
                                   results=value["results"])
        elif topic == topics.OPT_OUTS:
            self.app.apply_opt_out(opt_out_id=value["opt_out_id"], channel=value["channel"],
                                   destination=value["destination"], opted_out=bool(value["opted_out"]),
                                   source=value.get("source", ""))
        elif topic == topics.EXPIRIES:
            self.app.apply_expiry(expiry_id=value["expiry_id"], campaign_id=value["campaign_id"],
                                  message_id=value["message_id"], kind=value["kind"],
                                  since_sequence=int(value["since_sequence"]))
        else:
            return DeadLetter(f"unexpected topic {topic}")
        return None

    def handle_command(self, raw: bytes | None) -> DeadLetter | None:
        from schemas.commands import COMMAND_TYPES, parse_command

        try:
            value = jsoncodec.loads(raw) if raw is not None else None
        except jsoncodec.JSONDecodeError as exc:
            return DeadLetter(f"not JSON: {exc}")
        error = envelope_error(value)
        if error:
            return DeadLetter(error)
        command = None
        detail = None
        size = len(raw or b"")
        if value["type"] not in COMMAND_TYPES:
            detail = f"unknown command type {value['type']!r}"
        elif value["type"] == "AddContacts" and size > MAX_CHUNK_BYTES:
            detail = f"a contacts chunk is at most {MAX_CHUNK_BYTES // 1024} KiB ({size} bytes given)"
        elif size > topics.MAX_RECORD_BYTES:
            detail = f"a command is at most {topics.MAX_RECORD_BYTES} bytes ({size} given)"
        else:
            try:
                command = parse_command(raw)
            except ValidationError as exc:
                detail = validation_detail(exc)
        self.app.handle_command(command, value, invalid_detail=detail)
        return None
