"""Request and response bodies of the HTTP API (what /openapi.json documents)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.commands import Channel, Disclaimer, Template, WireId
from schemas.events import CampaignStatus, FailureReason, MessageStatus
from services.api.store import Role

# ------------------------------------------------------------------ reads


class Counts(BaseModel):
    """Messages per status, zeros included, and their total."""
    model_config = ConfigDict(extra="allow")

    total: int = 0


class Campaign(BaseModel):
    campaign_id: str
    name: str | None = None
    description: str | None = None
    channel: str | None = None
    status: str
    previous_status: str | None = None
    stopped: bool = False
    stopped_by: str | None = None
    stopped_at: str | None = Field(None, description="When the stop was accepted (the CampaignStopped event's time).")
    created_by: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    template: dict[str, Any] | None = None
    summary: dict[str, Any] | None = Field(None, description="The run summary (RunSummary of the latest "
                                                               "CampaignReady / TemplateUpdated).")
    message_count: int | None = None
    run_no: int | None = None
    final: bool = False
    counts: Counts


class CampaignPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[Campaign]


class Message(BaseModel):
    message_id: str
    campaign_id: str
    row: int | None = None
    channel: str | None = None
    destination: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    status: str
    previous_status: str | None = None
    reason: str | None = None
    provider_code: str | None = None
    attempt: int | None = None
    run_no: int | None = None
    created_at: str | None = None
    updated_at: str | None = None


class MessagePage(BaseModel):
    total: int
    limit: int
    offset: int
    as_of: str | None = Field(None, description="Set when the messages are shown as they stood at that time.")
    items: list[Message]


class Progress(BaseModel):
    """The data of each `progress` Server-Sent Event."""
    campaign_id: str
    status: str
    stopped: bool
    final: bool = Field(description="The status is final and every message is counted final: the last event.")
    counts: Counts


# ------------------------------------------------------------------ commands


class CommandAccepted(BaseModel):
    """The command was published and acknowledged by the broker; its answer comes later
    (`GET /commands/{command_id}?wait=...`)."""
    command_id: str
    campaign_id: str
    command_type: str


class CampaignCreateAccepted(CommandAccepted):
    contacts: int = Field(description="Contacts read from the CSV (valid or not: the handler judges them).")
    has_header: bool
    destination_column: str
    variables: dict[str, str] = Field(description="CSV column -> template variable.")
    contacts_command_ids: list[str] = Field(description="AddContacts command ids, chunk 0 first; the last one "
                                                        "is answered by CampaignReady.")


class CommandAnswer(BaseModel):
    command_id: str
    state: Literal["pending", "answered", "rejected"]
    events: list[dict[str, Any]]


# Request bodies are strict, as commands are: JSON true/false only, no coercion of "yes" or 1.
_STRICT = ConfigDict(strict=True, extra="ignore")


class UpdateTemplateBody(BaseModel):
    model_config = _STRICT

    template: Template


class RunBody(BaseModel):
    model_config = _STRICT

    disclaimer: Disclaimer = Field(description=(
        "All four flags must be true, on every run: recipients consented; the content is lawful and "
        "appropriate; an opt-out (SMS) / unsubscribe (email) is included and opted-out contacts are excluded; "
        "you are responsible for the uploaded data. Otherwise the handler answers "
        "CommandRejected(disclaimer_not_accepted) and nothing is queued."))


class StopBody(BaseModel):
    model_config = _STRICT

    confirmed: bool = Field(description="Must be true; otherwise CommandRejected(stop_not_confirmed).")


class RetryBody(BaseModel):
    model_config = _STRICT

    message_ids: list[WireId] | None = Field(None, description="Only these messages (default: every failed one "
                                                               "but those timed out).")
    include_cancelled: bool = False


# ------------------------------------------------------------------ channel settings


class ChannelSettingsBody(BaseModel):
    provider: str
    credentials: dict[str, str] = Field(default_factory=dict, description="Write-only: stored encrypted, shown masked.")


class ChannelSettingsView(BaseModel):
    channel: Channel
    provider: str
    credentials: dict[str, str] = Field(description="Masked: only the last 4 characters of long values.")
    source: Literal["stored", "environment"]
    updated_by: str | None = None
    updated_at: str | None = None
    applied_to_sender: bool = Field(False, description="True once the broker acknowledged the settings for the "
                                                       "sender and the webhook receiver (they switch to them "
                                                       "within a moment); false while they are stored only.")


# ------------------------------------------------------------------ API tokens


class TokenCreateBody(BaseModel):
    model_config = _STRICT

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                      description="The principal: written as `issued_by` on the commands sent with the token.")
    role: Role = Field(description="org_admin may create any role; admin only campaigner.")


class TokenView(BaseModel):
    """A token's stored facts: never the token itself (only its SHA-256 hash is kept)."""
    token_id: str
    principal: str
    role: str = Field(description="org_admin, admin, campaigner or operations.")
    created_at: str
    revoked_at: str | None = None
    created_by: str | None = Field(None, description="Who made it: a principal, or cli:<OS user>.")
    revoked_by: str | None = Field(None, description="Who revoked it: a principal, or cli:<OS user>.")


class TokenCreated(TokenView):
    token: str = Field(description="The bearer token: shown in this answer only, it cannot be read back.")


# Filters, as documented enums.
MessageStatusFilter = MessageStatus
ReasonFilter = FailureReason
CampaignStatusFilter = CampaignStatus

