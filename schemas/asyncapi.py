"""Write the AsyncAPI 3.0 document of the public topics (schemas/asyncapi.json), generated from the code.

    python -m schemas.asyncapi          # (re)write the file
    python -m schemas.asyncapi --check  # exit 1 if the file differs from the code

Channels are the four public topics of the wire contract; each command and event type is one message whose
payload schema comes from the pydantic models in schemas/ (the same ones the services validate with), so
the document cannot describe a field the code does not have. Internal topics are ours and left out
(docs/design.md describes them). Deterministic output: a diff shows exactly what changed.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas import topics
from schemas.commands import COMMAND_CLASSES
from schemas.events import CAMPAIGN_EVENT_CLASSES, MessageStatusChanged

DOCUMENT_PATH = Path(__file__).parent / "asyncapi.json"
ASYNCAPI_VERSION = "3.0.0"
CONTRACT_VERSION = "1.0.0"  # wire contract v1: fields may be added, nothing renamed or removed

_UUID_KEY = {"type": "string", "format": "uuid"}
_CHANNELS: tuple[dict[str, Any], ...] = (
    {
        "id": "commands", "address": topics.COMMANDS, "key": "campaign_id", "action": "receive",
        "operation": "receiveCommands", "classes": COMMAND_CLASSES, "mode": "validation",
        "description": "Commands from upstream systems, the CLI and the HTTP API. Each is answered on "
                       f"{topics.CAMPAIGN_EVENTS} by events whose causation_id is its command_id, or by one "
                       "CommandRejected; a repeated command_id has no new effect.",
    },
    {
        "id": "campaignEvents", "address": topics.CAMPAIGN_EVENTS, "key": "campaign_id", "action": "send",
        "operation": "publishCampaignEvents", "classes": CAMPAIGN_EVENT_CLASSES, "mode": "serialization",
        "description": "What happened to each campaign, in sequence order per campaign. Delivered at least "
                       "once: dedupe on event_id (a republished event keeps its event_id and sequence).",
    },
    {
        "id": "messageStatus", "address": topics.MESSAGE_STATUS, "key": "message_id", "action": "send",
        "operation": "publishMessageStatus", "classes": (MessageStatusChanged,), "mode": "serialization",
        "description": "One record per status change of one message, in order per message. Delivered at "
                       "least once: dedupe on event_id, or keep the highest sequence per message.",
    },
)
_DLQ = {
    "id": "commandsDlq", "address": topics.COMMANDS_DLQ, "operation": "publishDeadLetters",
    "description": "Records on outreach.commands that are not a JSON object with a string type and ids "
                   "command_id and campaign_id: the original key, the value cut to 64 KiB, the error in a header. "
                   "Also parked here: records of the internal topics the command handler cannot read, and any "
                   "record batch a consumer cannot decode (a codec or CRC failure), from any topic it reads: "
                   "the raw batch, cut to 64 KiB, x-error starting 'undecodable record batch'. Several consumer "
                   "groups read the event topics, so each parks such a batch once (x-consumer says which).",
}


def _summary(cls: type[BaseModel]) -> str:
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0]


def generate() -> dict[str, Any]:
    """The AsyncAPI document as a dict."""
    # One call for every model: pydantic then names a model differently where its validation and
    # serialization schemas differ (e.g. a template read in a command and written in an event).
    keys, defs = models_json_schema(
        [(cls, channel["mode"]) for channel in _CHANNELS for cls in channel["classes"]],
        ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = defs.get("$defs", {})
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for channel in _CHANNELS:
        channel_messages = {}
        for cls in channel["classes"]:
            name = cls.__name__
            messages[name] = {
                "name": name,
                "title": name,
                "summary": _summary(cls),
                "contentType": "application/json",
                "payload": keys[(cls, channel["mode"])],
                "bindings": {"kafka": {"key": {**_UUID_KEY, "description": f"the {channel['key']}, UTF-8"},
                                       "bindingVersion": "0.5.0"}},
            }
            channel_messages[name] = {"$ref": f"#/components/messages/{name}"}
        channels[channel["id"]] = {
            "address": channel["address"],
            "description": channel["description"],
            "messages": channel_messages,
            "bindings": {"kafka": {"topic": channel["address"], "bindingVersion": "0.5.0"}},
        }
        operations[channel["operation"]] = {
            "action": channel["action"],
            "channel": {"$ref": f"#/channels/{channel['id']}"},
            "messages": [{"$ref": f"#/channels/{channel['id']}/messages/{cls.__name__}"}
                         for cls in channel["classes"]],
        }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "DeadLetter",
        "summary": "A record, or a record batch, that could not be read.",
        "contentType": "application/octet-stream",
        "headers": {"type": "object", "properties": {
            "x-error": {"type": "string", "description": "why the record was rejected (at most 1,000 bytes)"},
            "x-source-topic": {"type": "string", "description": "the topic it was read from"},
            "x-source-offset": {"type": "string", "description": "partition:offset it was read from"},
            "x-consumer": {"type": "string", "description": "the consumer group (or sender instance) that parked it"},
        }},
        "payload": {"type": "string", "description": "the original value, cut to 64 KiB"},
    }
    channels[_DLQ["id"]] = {
        "address": _DLQ["address"],
        "description": _DLQ["description"],
        "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
        "bindings": {"kafka": {"topic": _DLQ["address"], "partitions": 1, "bindingVersion": "0.5.0"}},
    }
    operations[_DLQ["operation"]] = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{_DLQ['id']}"},
        "messages": [{"$ref": f"#/channels/{_DLQ['id']}/messages/DeadLetter"}],
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Outreach public topics",
            "version": CONTRACT_VERSION,
            "description": "The Kafka interface of Outreach (wire contract v1). Values are UTF-8 JSON objects "
                           "with snake_case keys; times are RFC 3339 UTC; ids are lowercase UUIDs (matched whole: "
                           "no surrounding whitespace). Records are at most 1 MiB, in any codec Kafka defines "
                           "(none, gzip, snappy, lz4, zstd). JSON nested deeper than 1,024 levels is not read as "
                           "JSON (a command: the DLQ); a number past 64-bit integers is no integer. Generated "
                           "by `python -m schemas.asyncapi` from the pydantic models in schemas/.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:9092", "protocol": "kafka",
                      "description": "the broker `outreach up` starts (KAFKA_BOOTSTRAP_SERVERS)"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": dict(sorted(schemas.items())), "messages": messages},
    }


def render() -> str:
    return json.dumps(generate(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.asyncapi", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the code")
    args = parser.parse_args(argv)
    text = render()
    current = DOCUMENT_PATH.read_text(encoding="utf-8") if DOCUMENT_PATH.exists() else None
    if args.check:
        if current != text:
            out(f"drifted: {DOCUMENT_PATH}; run `python -m schemas.asyncapi` to regenerate")
            return 1
        return 0
    if current != text:
        DOCUMENT_PATH.write_text(text, encoding="utf-8")
        out(f"wrote: {DOCUMENT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
