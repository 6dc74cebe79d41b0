"""The AsyncAPI document: generated from the code, in step with it, and valid AsyncAPI 3.0."""
import copy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest

from schemas import asyncapi, topics
from schemas.commands import COMMAND_TYPES
from schemas.events import CAMPAIGN_EVENT_TYPES

# The official AsyncAPI 3.0.0 JSON Schema (npm @asyncapi/specs 6.11.1, schemas/3.0.0-without-$id.json).
SPEC_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0-schema.json.gz"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(gzip.decompress(SPEC_SCHEMA.read_bytes())))


def test_the_committed_document_is_what_the_code_generates():
    assert asyncapi.main(["--check"], out=lambda _: None) == 0, "run `python -m schemas.asyncapi`"


def test_the_document_is_valid_asyncapi_3(validator):
    errors = [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(asyncapi.generate())]
    assert errors == []


def test_the_validator_would_notice_a_broken_document(validator):
    broken = copy.deepcopy(asyncapi.generate())
    broken["operations"]["receiveCommands"]["action"] = "subscribe"  # an AsyncAPI 2 word, not 3
    assert not validator.is_valid(broken)


def test_every_public_topic_and_record_type_is_described():
    document = asyncapi.generate()
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == set(topics.PUBLIC_TOPICS)
    by_address = {channel["address"]: set(channel["messages"]) for channel in document["channels"].values()}
    assert by_address[topics.COMMANDS] == set(COMMAND_TYPES)
    assert by_address[topics.CAMPAIGN_EVENTS] == set(CAMPAIGN_EVENT_TYPES)
    assert by_address[topics.MESSAGE_STATUS] == {"MessageStatusChanged"}


def test_every_reference_resolves():
    document = asyncapi.generate()

    def resolve(ref: str):
        node = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                resolve(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    status = resolve(document["components"]["messages"]["MessageStatusChanged"]["payload"]["$ref"])
    assert {"event_id", "message_id", "status", "reason", "attempt", "occurred_at"} <= set(status["properties"])
