"""Events on `outreach.campaign-events` and `outreach.message-status` (shared/wire-contract-v1.md).

We produce these, so they are validated in lax mode, but every invariant the contract states for a
single record (counts add up, a reason only on `failed`) is checked so a bug cannot publish it.
Unknown fields are ignored: consumers must accept fields added later.
The value tuples (`MESSAGE_STATUSES`, ...) are the single list other modules should use.
"""
from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from schemas.commands import (
    Channel,
    Disclaimer,
    Template,
    UtcDatetime,
    WireId,
    mark_type_required,
)

# --- Value sets --------------------------------------------------------------------------------

CampaignStatus = Literal[
    "created",
    "ready",
    "in_progress",
    "active_retries",
    "complete",
    "complete_with_errors",
    "failed",
    "deleted",
]
CAMPAIGN_STATUSES: tuple[CampaignStatus, ...] = get_args(CampaignStatus)

MessageStatus = Literal[
    "waiting",
    "queued",
    "sending",
    "sent",
    "delivered",
    "assumed_delivered",
    "retrying",
    "failed",
    "opted_out",
    "cancelled",
]
MESSAGE_STATUSES: tuple[MessageStatus, ...] = get_args(MessageStatus)

FinalMessageStatus = Literal["delivered", "assumed_delivered", "failed", "opted_out", "cancelled"]
FINAL_MESSAGE_STATUSES: tuple[FinalMessageStatus, ...] = get_args(FinalMessageStatus)

FailureReason = Literal[
    "timed_out",
    "invalid_destination",
    "carrier_rejected",
    "undeliverable",
    "bounced",
    "blocked",
    "expired",
    "provider_error",
    "setup_error",
    "unknown",
]
FAILURE_REASONS: tuple[FailureReason, ...] = get_args(FailureReason)

# In the contract's order of precedence (the first that applies is given), except that
# `invalid_command` appears once although it is checked at two points of that order.
RejectionReason = Literal[
    "invalid_command",
    "unknown_campaign",
    "campaign_exists",
    "campaign_not_ready",
    "campaign_not_running",
    "not_editable",
    "not_deletable",
    "not_retryable",
    "contacts_closed",
    "too_many_contacts",
    "disclaimer_not_accepted",
    "stop_not_confirmed",
    "no_valid_contacts",
    "attachments_not_ready",
    "nothing_to_retry",
    "test_send_limit",  # (our addition) SendTestMessage: the issuer sent as many test messages as an hour allows
    "channel_busy",
]
REJECTION_REASONS: tuple[RejectionReason, ...] = get_args(RejectionReason)

InvalidRowReason = Literal[
    "missing_destination", "invalid_e164", "invalid_email", "duplicate_destination"
]
INVALID_ROW_REASONS: tuple[InvalidRowReason, ...] = get_args(InvalidRowReason)

SmsEncoding = Literal["GSM-7", "UCS-2"]

NonNegativeInt = Annotated[int, Field(ge=0)]
Row = Annotated[int, Field(ge=1)]


def _event_config(**extra) -> ConfigDict:
    # Serialized events always carry every field, so their schema marks defaulted fields required.
    return ConfigDict(
        frozen=True, extra="ignore", json_schema_serialization_defaults_required=True, **extra
    )


# --- Parts of events ---------------------------------------------------------------------------


class Counts(BaseModel):
    """Messages of a campaign per status; every status present (zeros included), summing to total."""

    model_config = _event_config()

    total: NonNegativeInt = 0
    waiting: NonNegativeInt = 0
    queued: NonNegativeInt = 0
    sending: NonNegativeInt = 0
    sent: NonNegativeInt = 0
    delivered: NonNegativeInt = 0
    assumed_delivered: NonNegativeInt = 0
    retrying: NonNegativeInt = 0
    failed: NonNegativeInt = 0
    opted_out: NonNegativeInt = 0
    cancelled: NonNegativeInt = 0

    @model_validator(mode="after")
    def _adds_up(self) -> "Counts":
        by_status = self.by_status()
        if sum(by_status.values()) != self.total:
            raise ValueError(f"status counts add up to {sum(by_status.values())}, not total {self.total}")
        return self

    def by_status(self) -> dict[MessageStatus, int]:
        return {status: getattr(self, status) for status in MESSAGE_STATUSES}

    @classmethod
    def from_statuses(cls, by_status: dict[str, int]) -> "Counts":
        """Counts with `total` computed; statuses not given are zero."""
        return cls(total=sum(by_status.values()), **by_status)


class InvalidRow(BaseModel):
    model_config = _event_config()

    row: Row
    reason: InvalidRowReason


ROWS_MISSING_VARIABLES_LIMIT = 100
MISSING_VARIABLES_LIMIT = 50  # variables named in a summary's `missing_variables` (the template's first ones)
MISSING_VARIABLE_ROWS_LIMIT = 5  # rows named per variable (its count has them all)
MISSING_VARIABLE_NAME_LIMIT = 200  # characters of a variable's name shown (a longer one is cut, ending with "…")


class MissingVariable(BaseModel):
    """Our addition: a placeholder of the template that has no value in some contacts (it stays literal there)."""

    model_config = _event_config()

    variable: str  # the placeholder's name (cut to MISSING_VARIABLE_NAME_LIMIT characters)
    count: Annotated[int, Field(ge=1)]  # contacts (messages) without a value for it
    first_rows: Annotated[list[Row], Field(max_length=MISSING_VARIABLE_ROWS_LIMIT)]


class RunSummary(BaseModel):
    """Our addition: what an operator sees before accepting the disclaimer and running."""

    model_config = _event_config()

    name: str
    channel: Channel
    message_count: NonNegativeInt
    preview: str  # the SMS text or the email subject
    from_email: str | None = None
    from_name: str | None = None
    attachments: list[str] = Field(default_factory=list)  # filenames
    encoding: SmsEncoding | None = None  # SMS only
    segments: NonNegativeInt | None = None  # SMS only: the most segments one message takes
    segments_total: NonNegativeInt | None = None  # SMS only: over every message
    rows_missing_variables: Annotated[
        list[Row], Field(max_length=ROWS_MISSING_VARIABLES_LIMIT)
    ] = Field(default_factory=list)  # the first ones only; the count has them all
    missing_variables_count: NonNegativeInt = 0
    # Which placeholders have no value, in template order, each with its count and first rows.
    missing_variables: Annotated[
        list[MissingVariable], Field(max_length=MISSING_VARIABLES_LIMIT)
    ] = Field(default_factory=list)


# --- Campaign events ---------------------------------------------------------------------------


class CampaignEventBase(BaseModel):
    model_config = _event_config(json_schema_extra=mark_type_required)

    type: str
    event_id: WireId
    campaign_id: WireId
    # Strictly increasing over a campaign's distinct events (gaps allowed); 0 on rejections of
    # unknown campaigns.
    sequence: NonNegativeInt
    occurred_at: UtcDatetime
    causation_id: WireId
    # Our addition: present on the events answering a command.
    issued_by: str | None = Field(
        None, exclude_if=lambda v: v is None,
        description="(our addition) The principal that issued the command this event answers (its causation_id): "
                    "the command's issued_by, e.g. `user:NAME` (a console user), `token:NAME` or a bare token name "
                    "(an API token), or what a Kafka producer asserted (see issued_via). Absent on events that "
                    "answer no command (the engine's own: status changes of a running campaign, holds).")
    # Our addition: present only on the events answering a command the HTTP API published.
    issued_via: Literal["api"] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="(our addition) \"api\" on the events answering a command the HTTP API published after "
                    "authenticating its issued_by (the command's issued_via); absent when a Kafka producer "
                    "published the command, whose issued_by is then that producer's assertion.")
    # Our addition: present only on the events answering a command an operator replayed from the DLQ.
    replayed_by: str | None = Field(
        None, exclude_if=lambda v: v is None,
        description="(our addition) The operator who replayed the command this event answers (its causation_id) "
                    "from outreach.commands.dlq: the command's replayed_by. Absent otherwise.")


class CampaignCreated(CampaignEventBase):
    type: Literal["CampaignCreated"] = "CampaignCreated"
    name: str
    description: str | None = None
    channel: Channel
    template: Template
    created_by: str


class ContactsAdded(CampaignEventBase):
    type: Literal["ContactsAdded"] = "ContactsAdded"
    chunk_no: NonNegativeInt
    valid: NonNegativeInt
    invalid: NonNegativeInt
    invalid_rows: list[InvalidRow] = Field(default_factory=list)


class CampaignReady(CampaignEventBase):
    type: Literal["CampaignReady"] = "CampaignReady"
    message_count: NonNegativeInt
    summary: RunSummary | None = None


class TemplateUpdated(CampaignEventBase):
    type: Literal["TemplateUpdated"] = "TemplateUpdated"
    template: Template
    summary: RunSummary | None = None


class CampaignRunStarted(CampaignEventBase):
    type: Literal["CampaignRunStarted"] = "CampaignRunStarted"
    run_no: Annotated[int, Field(ge=1)]
    accepted_by: str
    disclaimer: Disclaimer
    message_count: NonNegativeInt  # queued; the suppressed ones are in suppressed_count
    suppressed_count: NonNegativeInt


class CampaignStopped(CampaignEventBase):
    type: Literal["CampaignStopped"] = "CampaignStopped"
    stopped_by: str
    cancelled_count: NonNegativeInt


class RetryStarted(CampaignEventBase):
    type: Literal["RetryStarted"] = "RetryStarted"
    run_no: Annotated[int, Field(ge=1)]
    message_count: NonNegativeInt


class CampaignDeleted(CampaignEventBase):
    type: Literal["CampaignDeleted"] = "CampaignDeleted"


class CampaignStatusChanged(CampaignEventBase):
    type: Literal["CampaignStatusChanged"] = "CampaignStatusChanged"
    status: CampaignStatus
    previous_status: CampaignStatus | None = None  # null on the first status of a campaign
    stopped: bool = False
    counts: Counts


class CommandRejected(CampaignEventBase):
    type: Literal["CommandRejected"] = "CommandRejected"
    command_id: WireId
    command_type: str  # as received: may name no known command
    reason: RejectionReason
    detail: str = ""


class CampaignSendingHeld(CampaignEventBase):
    """Our addition: the provider's circuit breaker holds sending during an outage (messages wait, unburnt)."""

    type: Literal["CampaignSendingHeld"] = "CampaignSendingHeld"
    provider: str
    reason: str = ""


class CampaignSendingResumed(CampaignEventBase):
    """Our addition: the provider answers again; held messages are being sent."""

    type: Literal["CampaignSendingResumed"] = "CampaignSendingResumed"
    provider: str


# (our addition) What became of a test message (SendTestMessage): the provider took it, refused it (`reason`: the
# contract's failure reason of its code, or `deferred`: an email the receiving server deferred, not sent again),
# it failed before reaching the provider (`provider_error`: a pre-send error, not retried; `provider_held`: the
# provider's circuit breaker is open; `not_sent`: no sender took it before its Sending limit), the destination
# is opted out (on the channel's list, or so said the provider: nothing sent), or it was handed off with no
# answer (it may have reached the recipient).
TestMessageOutcome = Literal["accepted", "refused", "failed", "opted_out", "no_answer"]
TEST_MESSAGE_OUTCOMES: tuple[TestMessageOutcome, ...] = get_args(TestMessageOutcome)
TestMessageReason = Literal[FailureReason, Literal["deferred", "provider_held", "not_sent"]]


class TestMessageQueued(CampaignEventBase):
    """Our addition: a test message (SendTestMessage) goes to the provider; TestMessageCompleted tells its outcome."""

    type: Literal["TestMessageQueued"] = "TestMessageQueued"
    message_id: WireId = Field(description="The test message's own id (no message of the campaign: it has no "
                                           "status records), as the provider's callbacks carry it.")
    destination: str  # in its normalised form (E.164, or the address as email-validator normalises it)
    requested_by: str  # the command's issued_by
    row: Row | None = Field(description="The contact whose variables it is rendered with; null: none (the "
                                        "campaign has no valid contact yet: only the command's variables).")
    variables: dict[str, str]  # what it is rendered with: the contact's, then the command's over them
    preview: str  # the rendered SMS text, or the rendered email subject


class TestMessageCompleted(CampaignEventBase):
    """Our addition: what became of a test message. causation_id is its SendTestMessage's command_id."""

    type: Literal["TestMessageCompleted"] = "TestMessageCompleted"
    message_id: WireId
    destination: str
    requested_by: str
    outcome: TestMessageOutcome
    reason: TestMessageReason | None = None  # set when outcome is refused or failed, else null
    provider_code: str | None = None
    provider_message_id: str | None = None

    @model_validator(mode="after")
    def _reason_only_when_not_sent_as_asked(self) -> "TestMessageCompleted":
        if (self.outcome in ("refused", "failed")) != (self.reason is not None):
            raise ValueError("reason is set when, and only when, outcome is 'refused' or 'failed'")
        return self


CampaignEvent = Annotated[
    Union[
        CampaignCreated,
        ContactsAdded,
        CampaignReady,
        TemplateUpdated,
        CampaignRunStarted,
        CampaignStopped,
        RetryStarted,
        CampaignDeleted,
        CampaignStatusChanged,
        CommandRejected,
        CampaignSendingHeld,
        CampaignSendingResumed,
        TestMessageQueued,
        TestMessageCompleted,
    ],
    Field(discriminator="type"),
]
CAMPAIGN_EVENT_ADAPTER: TypeAdapter[CampaignEvent] = TypeAdapter(CampaignEvent)
CAMPAIGN_EVENT_CLASSES: tuple[type[CampaignEventBase], ...] = get_args(get_args(CampaignEvent)[0])
CAMPAIGN_EVENT_TYPES: frozenset[str] = frozenset(cls.__name__ for cls in CAMPAIGN_EVENT_CLASSES)


def parse_campaign_event(raw: bytes | str) -> CampaignEvent:
    """Validate one `outreach.campaign-events` record value; raises pydantic.ValidationError."""
    return CAMPAIGN_EVENT_ADAPTER.validate_json(raw)


# --- Message status stream ---------------------------------------------------------------------


class MessageStatusChanged(BaseModel):
    """One status change of one message (or one failed pre-send submission / SMTP re-submission)."""

    model_config = _event_config(json_schema_extra=mark_type_required)

    type: Literal["MessageStatusChanged"] = "MessageStatusChanged"
    event_id: WireId
    message_id: WireId
    campaign_id: WireId
    channel: Channel
    row: Row
    run_no: Annotated[int, Field(ge=1)] | None  # null before the first run (the `waiting` record)
    status: MessageStatus
    previous_status: MessageStatus | None  # null on the `waiting` record
    reason: FailureReason | None  # set exactly when status is `failed`
    provider_code: str | None
    attempt: Annotated[int, Field(ge=1)] | None  # provider submissions so far; null before the first
    occurred_at: UtcDatetime
    causation_id: WireId
    # Our addition: a per-message position (the block's version); consumers keep the highest applied.
    sequence: NonNegativeInt
    # Our addition, on `waiting` records only (absent elsewhere): the contact as added, so read models and
    # audits can show each message's recipient and variables.
    destination: str | None = Field(None, exclude_if=lambda v: v is None)
    variables: dict[str, str] | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _reason_only_when_failed(self) -> "MessageStatusChanged":
        if (self.status == "failed") != (self.reason is not None):
            raise ValueError("reason is set when, and only when, status is 'failed'")
        return self


def parse_message_status(raw: bytes | str) -> MessageStatusChanged:
    """Validate one `outreach.message-status` record value; raises pydantic.ValidationError."""
    return MessageStatusChanged.model_validate_json(raw)
