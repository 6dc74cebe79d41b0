"""Deterministic ids: every id derived from stored facts, so a republished record carries the same id."""
import re
import uuid

OUTREACH_NS = uuid.UUID("6f1d3c2e-8c4b-5d7a-9e0f-0a1b2c3d4e5f")
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_UUID_RE = re.compile(UUID_PATTERN)


def is_wire_uuid(value: object) -> bool:
    """True for a string in the lowercase 8-4-4-4-12 form the contract requires."""
    return isinstance(value, str) and _UUID_RE.match(value) is not None


def message_id(campaign_id: str, row: int) -> str:
    return str(uuid.uuid5(uuid.UUID(campaign_id), f"message:{row}"))


def block_id(campaign_id: str, block_no: int) -> uuid.UUID:
    return uuid.uuid5(uuid.UUID(campaign_id), f"block:{block_no}")


def channel_lock_id(channel: str) -> uuid.UUID:
    return uuid.uuid5(OUTREACH_NS, f"channel-lock:{channel}")


def opt_out_list_id(channel: str) -> uuid.UUID:
    return uuid.uuid5(OUTREACH_NS, f"opt-outs:{channel}")


def command_log_id(command_id: str) -> uuid.UUID:
    return uuid.uuid5(OUTREACH_NS, f"command:{command_id}")


def record_event_id(originator_id: uuid.UUID | str, version: int, part: object) -> str:
    """The event_id of one wire record made from one stored event (part: record index or row)."""
    return str(uuid.uuid5(OUTREACH_NS, f"{originator_id}:{version}:{part}"))
