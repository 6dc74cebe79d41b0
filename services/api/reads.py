"""Read endpoints: campaigns, messages (filters, search, pagination), CSV export, live progress (SSE), history.

Everything is read from the projections' read model (services/projections/views.py), whose methods
are blocking: they run in worker threads so the event loop keeps serving.
"""
from __future__ import annotations

import asyncio
import itertools
import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse

from schemas.times import rfc3339
from services.api import export
from services.api.auth import CAMPAIGN_RESPONSES, CampaignUser
from services.api.models import (
    Campaign,
    CampaignPage,
    CampaignStatusFilter,
    MessagePage,
    MessageStatusFilter,
    Problem,
    Progress,
    ReasonFilter,
)
from services.common import jsoncodec
from services.common.ids import UUID_PATTERN
from services.projections.views import settled

router = APIRouter(tags=["campaigns"], responses=CAMPAIGN_RESPONSES)

PROGRESS_POLL_S = 0.5
PROGRESS_PING_S = 15
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
# Far beyond any list (300,000 messages a campaign; their history a few million records), and a 32-bit integer,
# so no database (SQLite's or PostgreSQL's LIMIT / OFFSET) nor Python's islice ever overflows on it.
MAX_OFFSET = 2**31 - 1

CampaignId = Annotated[str, Path(pattern=UUID_PATTERN, description="The campaign's id (lowercase UUID).")]
MessageId = Annotated[str, Path(pattern=UUID_PATTERN, description="The message's id (lowercase UUID).")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Page size (at most {MAX_LIMIT}).")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"Items to skip (at most {MAX_OFFSET}).")]
StatusQuery = Annotated[MessageStatusFilter | None, Query(alias="status",
                                                          description="Only messages with this status.")]
ReasonQuery = Annotated[ReasonFilter | None, Query(description="Only failed messages with this reason.")]
SearchQuery = Annotated[str | None, Query(
    min_length=1, max_length=200, description="Case-insensitive substring of the destination or of any variable "
                                              "value, or the exact row number or message id.")]
AsOfQuery = Annotated[str | None, Query(
    json_schema_extra={"format": "date-time"},
    description="An RFC 3339 date-time, with its offset (`2026-01-05T09:00:00Z`, `2026-01-05T10:00:00+01:00`): show "
                "the state as it stood then (built only from records that occurred at or before it). A time before "
                "the year 1 or after 9999 in UTC is before or after everything.")]


def _read_model(request: Request):
    return request.app.state.read_model


async def _call(request: Request, method: str, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(getattr(_read_model(request), method), *args, **kwargs)


async def _campaign_or_404(request: Request, campaign_id: str) -> dict[str, Any]:
    campaign = await _call(request, "campaign", campaign_id)
    if campaign is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no campaign {campaign_id}")
    return campaign


# RFC 3339's date-time (section 5.6): the offset is required, `T` and `Z` may be lower case.
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
                      r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))")
_BEFORE_EVERYTHING = "0000-12-31T23:59:59.999999Z"  # sorts before every time the read model holds
_AFTER_EVERYTHING = "9999-12-31T23:59:59.999999Z"


def as_of_text(text: str) -> str:
    """An RFC 3339 date-time as the read model's time text (UTC, microseconds, zero-padded year); ValueError if it
    is not one. A leap second (:60) is the last microsecond of its minute; a moment before the year 1 or after
    9999 in UTC (0001-01-01T00:00:00+01:00) is before or after everything."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("not an RFC 3339 date-time with an offset, like 2026-01-05T09:00:00Z")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    microsecond = int((match.group(7) or ".0")[1:7].ljust(6, "0"))
    if second == 60:
        second, microsecond = 59, 999_999
    local = datetime(year, month, day, hour, minute, second, microsecond)  # ValueError if out of range
    offset = timedelta()
    if match.group(9):
        hours, minutes = int(match.group(10)), int(match.group(11))
        if hours > 23 or minutes > 59:
            raise ValueError("the offset is out of range")
        offset = timedelta(hours=hours, minutes=minutes) * (1 if match.group(9) == "+" else -1)
    try:
        return rfc3339(local - offset)
    except OverflowError:
        return _BEFORE_EVERYTHING if offset > timedelta() else _AFTER_EVERYTHING


def _as_of_text(as_of: str) -> str:
    """`as_of` as the read model's time text; 422 when it is not an RFC 3339 date-time."""
    try:
        return as_of_text(as_of)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"as_of {as_of!r}: {exc}") from None


async def _as_of_campaign_or_404(request: Request, campaign_id: str, moment: str,
                                  with_counts: bool = True) -> dict[str, Any]:
    campaign = await _call(request, "as_of_campaign", campaign_id, moment, with_counts=with_counts)
    if campaign is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no campaign {campaign_id} at {moment}")
    return campaign


def _search(q: str | None) -> str | None:
    """The search term as the read model takes it (blank: no search)."""
    return (q.strip() or None) if q is not None else None


# ------------------------------------------------------------------ campaigns

@router.get("/campaigns", response_model=CampaignPage, summary="List campaigns, newest first")
async def list_campaigns(
    request: Request, _: CampaignUser,
    status_: Annotated[CampaignStatusFilter | None, Query(alias="status", description="Only this status.")] = None,
    limit: Limit = DEFAULT_LIMIT, offset: Offset = 0,
) -> dict[str, Any]:
    items = await _call(request, "campaigns", status=status_, limit=limit, offset=offset)
    total = await _call(request, "count_campaigns", status=status_)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/campaigns/{campaign_id}", response_model=Campaign, summary="One campaign with its live counts",
            responses={404: {"model": Problem, "description": "Unknown campaign (or not yet projected)."}})
async def get_campaign(request: Request, _: CampaignUser, campaign_id: CampaignId,
                       as_of: AsOfQuery = None) -> dict[str, Any]:
    if as_of is not None:
        return await _as_of_campaign_or_404(request, campaign_id, _as_of_text(as_of))
    return await _campaign_or_404(request, campaign_id)


# ------------------------------------------------------------------ messages

@router.get("/campaigns/{campaign_id}/messages", response_model=MessagePage, tags=["messages"],
            summary="A campaign's messages in row order: filters, search, pagination",
            responses={404: {"model": Problem, "description": "Unknown campaign."}})
async def list_messages(
    request: Request, _: CampaignUser, campaign_id: CampaignId,
    status_: StatusQuery = None, reason: ReasonQuery = None, q: SearchQuery = None,
    limit: Limit = DEFAULT_LIMIT, offset: Offset = 0, as_of: AsOfQuery = None,
) -> dict[str, Any]:
    filters = {"status": status_, "reason": reason, "search": _search(q)}
    if as_of is not None:  # filtered, counted and paged by the database, as the live view
        moment = _as_of_text(as_of)
        await _as_of_campaign_or_404(request, campaign_id, moment, with_counts=False)
        items = await _call(request, "as_of_messages", campaign_id, moment, limit=limit, offset=offset, **filters)
        total = await _call(request, "count_as_of_messages", campaign_id, moment, **filters)
        return {"total": total, "limit": limit, "offset": offset, "as_of": moment, "items": items}
    await _campaign_or_404(request, campaign_id)
    items = await _call(request, "messages", campaign_id, limit=limit, offset=offset, **filters)
    total = await _call(request, "count_messages", campaign_id, **filters)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@router.get("/campaigns/{campaign_id}/messages.csv", tags=["messages"], response_class=StreamingResponse,
            summary="Export all or filtered messages as CSV (streamed)",
            description="Columns: " + ", ".join(export.FIXED_COLUMNS) + ", then one per template variable. Cells "
                        "beginning with = + - @ are prefixed with a single quote (CSV injection), so SMS "
                        "destinations appear as '+1...",
            responses={200: {"content": {"text/csv": {}}, "description": "The CSV, streamed."},
                       404: {"model": Problem, "description": "Unknown campaign."}})
async def export_messages(request: Request, _: CampaignUser, campaign_id: CampaignId,
                          status_: StatusQuery = None, reason: ReasonQuery = None,
                          q: SearchQuery = None) -> StreamingResponse:
    campaign = await _campaign_or_404(request, campaign_id)
    read_model = _read_model(request)
    q = _search(q)

    def messages():
        return read_model.iter_messages(campaign_id, status=status_, reason=reason, search=q)

    # A sync generator: Starlette pulls each block in a worker thread (iterate_in_threadpool).
    filename = f"campaign-{campaign_id}-messages.csv"
    return StreamingResponse(export.csv_blocks(messages), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "X-Campaign-Status": str(campaign.get("status"))})


@router.get("/campaigns/{campaign_id}/messages/{message_id}/history", tags=["history"],
            response_model=list[dict[str, Any]], summary="One message's status records, in order",
            responses={404: {"model": Problem, "description": "Unknown message in this campaign."}})
async def message_history(request: Request, _: CampaignUser, campaign_id: CampaignId,
                          message_id: MessageId) -> list[dict[str, Any]]:
    records = [r for r in await _call(request, "message_history", message_id) if r.get("campaign_id") == campaign_id]
    if not records:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no message {message_id} in campaign {campaign_id}")
    return records


# ------------------------------------------------------------------ progress (SSE)

def _progress_event_schema() -> dict[str, Any]:
    """Progress's JSON schema with its references into the OpenAPI document's components (Counts is one: Campaign
    uses it), not into `$defs` of its own, which a reader of the document could not resolve."""
    schema = Progress.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


PROGRESS_EVENT_SCHEMA = _progress_event_schema()


def progress_snapshot(campaign: dict[str, Any]) -> dict[str, Any]:
    return {"campaign_id": campaign["campaign_id"], "status": campaign["status"],
            "stopped": bool(campaign.get("stopped")), "final": settled(campaign), "counts": campaign["counts"]}


@router.get("/campaigns/{campaign_id}/progress", tags=["progress"], response_class=EventSourceResponse,
            summary="Live progress as Server-Sent Events",
            description="A `progress` event (data: JSON " + Progress.__name__ + ": status, stopped, final, counts) "
                        "at once and whenever the status or a count changes (checked every "
                        f"{PROGRESS_POLL_S} s). The stream ends after the event with `final: true`: the status is "
                        "final (complete, complete_with_errors, failed, deleted) and the counts show every message "
                        "final too. Comment pings keep proxies open.",
            responses={200: {"content": {"text/event-stream": {"schema": PROGRESS_EVENT_SCHEMA}},
                             "description": "The event stream."},
                       404: {"model": Problem, "description": "Unknown campaign."}})
async def progress(request: Request, _: CampaignUser, campaign_id: CampaignId) -> EventSourceResponse:
    first = await _campaign_or_404(request, campaign_id)

    async def events():
        campaign: dict[str, Any] | None = first
        last = None
        while campaign is not None:
            snapshot = progress_snapshot(campaign)
            if snapshot != last:
                yield {"event": "progress", "data": jsoncodec.dumps(snapshot).decode()}
                last = snapshot
            if snapshot["final"]:
                return
            await asyncio.sleep(PROGRESS_POLL_S)
            campaign = await _call(request, "campaign", campaign_id)

    return EventSourceResponse(events(), ping=PROGRESS_PING_S)


# ------------------------------------------------------------------ history

HISTORY_BLOCK_RECORDS = 500


def json_array_blocks(records, block_records: int = HISTORY_BLOCK_RECORDS):
    """A JSON array of `records`, as text blocks (the history of a big campaign never sits in memory whole)."""
    parts = ["["]
    first = True
    for count, record in enumerate(records, start=1):
        parts.append(("" if first else ",") + jsoncodec.dumps(record).decode())
        first = False
        if count % block_records == 0:
            yield "".join(parts)
            parts = []
    parts.append("]")
    yield "".join(parts)


@router.get("/campaigns/{campaign_id}/history", tags=["history"], response_class=StreamingResponse,
            summary="The full ordered audit history of a campaign (streamed JSON array)",
            description="Campaign events and message status records, merged in occurred_at order (ties: campaign "
                        "events by sequence, then status records by row and sequence), each as published (`type` "
                        "tells which). `as_of` keeps what occurred at or before that time; `limit` / `offset` page "
                        "through it. The array is streamed: a campaign of 300,000 messages has well over a million "
                        "records.",
            responses={200: {"content": {"application/json": {"schema": {"type": "array", "items": {
                "type": "object", "description": "A campaign event or a MessageStatusChanged record."}}}},
                "description": "The records, in order."},
                404: {"model": Problem, "description": "Unknown campaign."}})
async def history(request: Request, _: CampaignUser, campaign_id: CampaignId,
                  include_messages: Annotated[bool, Query(description="Include message status records.")] = True,
                  as_of: AsOfQuery = None,
                  limit: Annotated[int | None, Query(ge=1, le=MAX_LIMIT, description=(
                      f"At most this many records (at most {MAX_LIMIT}); without it, every record from `offset` "
                      "on."))] = None,
                  offset: Offset = 0) -> StreamingResponse:
    read_model = _read_model(request)
    until = _as_of_text(as_of) if as_of is not None else None  # a malformed as_of is 422, whatever the campaign
    if await _call(request, "campaign", campaign_id) is None and not await _call(request, "events", campaign_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no campaign {campaign_id}")
    records = read_model.iter_history(campaign_id, include_messages=include_messages, until=until)
    page = itertools.islice(records, offset, None if limit is None else offset + limit)
    return StreamingResponse(json_array_blocks(page), media_type="application/json")
