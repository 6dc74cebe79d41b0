"""Deterministic ids: every id derived from stored facts, so a republished record carries the same id."""
import uuid

from schemas.ids import UUID_PATTERN, is_wire_uuid  # noqa: F401  (the contract's form, re-exported for services)

OUTREACH_NS = uuid.UUID("6f1d3c2e-8c4b-5d7a-9e0f-0a1b2c3d4e5f")


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
