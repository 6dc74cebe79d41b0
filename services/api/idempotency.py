"""`Idempotency-Key`: safe retries of the command endpoints.

A command's identity is its `command_id` (wire contract, Answers: "a command_id seen before has no new effect:
its stored answer is published again, same event ids"). With an `Idempotency-Key`, the API derives the ids of
what it publishes from (principal, command type, campaign id, key) instead of drawing them at random, so a
request sent again after a 503 or a lost response publishes the very same command_id, and the handler's rule
makes the retry harmless. Nothing is stored here: the command handler's CommandLog is the memory.

The same key with a different body makes the same command_id, so the first command wins (the handler answers
the later one with the first one's stored answer); bodies are not stored or compared. For a CSV create, a
different file under the same key re-sends the first file's chunk ids for its first chunks (answered as before)
and new ids for any chunks beyond them, which the handler rejects (contacts_closed). One key, one intended command.
"""
from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import Header

from services.common.ids import OUTREACH_NS

# Fixed for ever: changing it would give a retry after an upgrade a new command_id.
IDEMPOTENCY_NS = uuid.uuid5(OUTREACH_NS, "api:idempotency-key")

MAX_KEY_LENGTH = 200
# Printable ASCII, spaces inside only: HTTP drops white space around a header's value, so a key beginning or
# ending with one would not reach the API as sent.
KEY_PATTERN = rf"^[\x21-\x7e](?:[\x20-\x7e]{{0,{MAX_KEY_LENGTH - 2}}}[\x21-\x7e])?$"

HEADER_DESCRIPTION = (
    "Optional: makes retrying this request safe. A client-chosen string of 1-200 printable ASCII characters (no "
    "space at either end), "
    "unique per intended command (a UUID is a good choice). The command's ids are derived from the token's "
    "principal, the command, the campaign and this key, so the same request sent again (after a 503, a timeout "
    "or a lost response) publishes the same command_id and the command handler publishes its stored answer "
    "again instead of acting twice. The same key with a different body makes the same command_id too: the first "
    "command wins. Without the header every request is a new command.")

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LENGTH, pattern=KEY_PATTERN,
           description=HEADER_DESCRIPTION),
]


def derived_id(principal: str, command_type: str, campaign_id: str | None, key: str, part: str | None = None) -> str:
    """A UUID fixed by its inputs. They are joined as a JSON array, so no choice of principal or key (both free
    text) can make two different inputs read alike, as "a:b" + "c" and "a" + "b:c" would."""
    name = json.dumps([principal, command_type, campaign_id, key, part], ensure_ascii=True, separators=(",", ":"))
    return str(uuid.uuid5(IDEMPOTENCY_NS, name))


def command_id(principal: str, command_type: str, campaign_id: str, key: str | None) -> str | None:
    """The command_id for this key, or None without a key (a fresh random one is used)."""
    return None if key is None else derived_id(principal, command_type, campaign_id, key)


def created_campaign_id(principal: str, key: str) -> str:
    """The campaign_id of a create-from-CSV request with this key (the route has no campaign id of its own)."""
    return derived_id(principal, "CreateCampaign", None, key, "campaign_id")


def contacts_command_id(principal: str, campaign_id: str, key: str, chunk_no: int) -> str:
    return derived_id(principal, "AddContacts", campaign_id, key, f"chunk:{chunk_no}")
