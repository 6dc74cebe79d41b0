"""Internal records on `outreach.internal.*` topics, as docs/design.md fixes them.

Written and read only by our services, so validated in lax mode; unknown fields are ignored so a
newer writer does not stop an older reader during a rolling restart.
"""
import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.commands import (
    Channel,
    WireTime,
    WireId,
    mark_type_required,
)

NonNegativeInt = Annotated[int, Field(ge=0)]
TemplateDigest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def template_digest(template: Mapping[str, Any]) -> str:
    """The SHA-256 of a template's canonical JSON: how a work record names the template its messages are
    rendered with (a template may be up to 1 MiB, so work records carry this, not the template; the sender
    knows the template from the campaign's CampaignCreated / TemplateUpdated)."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _internal_config(**extra) -> ConfigDict:
    return ConfigDict(frozen=True, extra="ignore", **extra)


class ClaimRequest(BaseModel):
    """Sender -> handler (`outreach.internal.claim-requests`): claim up to max_messages queued ones."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["ClaimRequest"] = "ClaimRequest"
    claim_id: WireId
    campaign_id: WireId
    max_messages: Annotated[int, Field(ge=1)]
    requested_at: WireTime


class WorkItem(BaseModel):
    """One claimed message, with what the sender needs to render and submit it."""

    model_config = _internal_config()

    message_id: WireId
    row: Annotated[int, Field(ge=1)]
    destination: str
    variables: dict[str, str] = Field(default_factory=dict)
    attempt: NonNegativeInt  # provider submissions known so far (0 before the first)


class WorkClaimed(BaseModel):
    """Relay -> sender (`outreach.internal.sender-work`), from the Campaign's stored WorkClaimed.

    Empty `items` means nothing was queued: the sender stops claiming for that campaign.
    """

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["WorkClaimed"] = "WorkClaimed"
    event_id: WireId
    claim_id: WireId
    campaign_id: WireId
    channel: Channel
    run_no: Annotated[int, Field(ge=1)]
    template_digest: TemplateDigest  # `template_digest(the template)`: the campaign events carry the template
    items: list[WorkItem] = Field(default_factory=list)
    remaining_queued: NonNegativeInt
    holds_channel: bool


SenderOutcome = Literal[
    "accepted",  # provider took the request (Twilio 201 / SendGrid 202 / SMTP 250)
    "presend_error",  # nothing reached the provider, or 429/5xx; `final` on the last one reported
    "refused",  # refused at submission, with provider_code (21211, 21610, ...)
    "sent",  # SMS receipt
    "delivered",
    "undelivered",  # receipt with provider_code
    "failed",  # receipt with provider_code
    "deferred",  # email -> retrying
    "bounced",  # email: provider_code = SMTP code or enhanced status
    "blocked",  # email: the receiving server refused the message
    "dropped",  # email: SendGrid did not send it; provider_code = its reason
    "opted_out",
    "spamreport",  # email, after delivery: the destination is opted out, the message keeps its status
    "unsubscribe",  # email, after delivery: likewise
    "resubmitted",  # SMTP re-submission of a retrying email (status stays retrying)
    "no_answer",  # handed off, no answer: nothing changes, the message times out
]
SENDER_OUTCOMES: tuple[SenderOutcome, ...] = get_args(SenderOutcome)


class SenderResult(BaseModel):
    """What happened to one message at the provider; the handler maps it to a status and reason."""

    model_config = _internal_config()

    message_id: WireId
    outcome: SenderOutcome
    attempt: Annotated[int, Field(ge=1)] | None = None  # the submission this result is about
    provider_code: str | None = None
    provider_message_id: str | None = None
    occurred_at: WireTime
    # On a presend_error: the sender gives up after this one -> failed / provider_error.
    final: bool = False


class SenderResults(BaseModel):
    """Sender -> handler (`outreach.internal.sender-results`): a batch of results of one campaign."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["SenderResults"] = "SenderResults"
    result_id: WireId
    campaign_id: WireId
    results: list[SenderResult]


class TestMessageWork(BaseModel):
    """Relay -> sender (`outreach.internal.sender-work`, key campaign_id), from the Campaign's stored
    TestMessageQueued: one test message (SendTestMessage) to submit once, through the fence under `command_id`."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["TestMessageWork"] = "TestMessageWork"
    event_id: WireId
    command_id: WireId  # the SendTestMessage: the claim its fence row is open under
    campaign_id: WireId
    channel: Channel
    template_digest: TemplateDigest  # as in WorkClaimed: the campaign events carry the template
    message_id: WireId
    destination: str
    variables: dict[str, str] = Field(default_factory=dict)


# What the sender did with a test message: the outcome of its one submission (a SenderOutcome of the submission:
# accepted, refused, presend_error, no_answer, deferred, bounced...), or why it made none: `held` (the provider's
# breaker is open), `not_sent` (the fence refused it and it was never handed off: its Sending limit passed, or a
# hold closed it), `no_answer` also when the fence refused it because it was handed off before (a redelivery).
TestMessageSenderOutcome = Literal[SenderOutcome, Literal["held", "not_sent"]]


class TestMessageResult(BaseModel):
    """Sender -> handler (`outreach.internal.sender-results`, key campaign_id): what became of a test message's one
    submission. The handler records it on the campaign as TestMessageCompleted; never a message status."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["TestMessageResult"] = "TestMessageResult"
    result_id: WireId
    campaign_id: WireId
    command_id: WireId
    message_id: WireId
    outcome: TestMessageSenderOutcome
    provider_code: str | None = None
    provider_message_id: str | None = None
    occurred_at: WireTime


ExpiryKind = Literal["sending", "sent", "retry_window"]
EXPIRY_KINDS: tuple[ExpiryKind, ...] = get_args(ExpiryKind)


class Expiry(BaseModel):
    """Sweeper -> handler (`outreach.internal.expiries`): a timer ran out.

    Applied only if the message is still in the state (same block sequence) the timer started for.
    """

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["Expiry"] = "Expiry"
    expiry_id: WireId
    campaign_id: WireId
    message_id: WireId
    kind: ExpiryKind
    since_sequence: NonNegativeInt


class SendingHold(BaseModel):
    """Sender -> handler (`outreach.internal.sender-results`): a provider's circuit breaker opened or closed."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["SendingHold"] = "SendingHold"
    hold_id: WireId
    campaign_id: WireId
    provider: str
    held: bool
    reason: str = ""
    occurred_at: WireTime


# How a destination came on or off a channel's opt-out list: the recipient (STOP / START replies, an unsubscribe, a
# spam report), Twilio's 21610 (the recipient replied STOP to Twilio), or a person by hand (`manual`: added by a
# campaign user, removed only by an org admin with a reason, through the HTTP API or the console).
OptOutSource = Literal["sms_stop", "sms_start", "twilio_21610", "email_unsubscribe", "email_spamreport", "manual"]
MANUAL_OPT_OUT = "manual"
MAX_OPT_OUT_REASON_CHARS = 1000
Principal = Annotated[str, Field(min_length=1, max_length=300)]


class OptOutChanged(BaseModel):
    """Webhook receiver and HTTP API -> handler (`outreach.internal.opt-outs`, key destination): a destination
    opted out or in. A `manual` one names who made it (`issued_by`, a principal: `user:NAME`, a token's name); a
    manual removal also says why (`reason`, not blank)."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["OptOutChanged"] = "OptOutChanged"
    opt_out_id: WireId
    channel: Literal["sms", "email"]
    destination: str
    opted_out: bool
    source: OptOutSource
    occurred_at: WireTime
    issued_by: Principal | None = None  # who, for a manual change (our addition: absent from the providers' ones)
    reason: Annotated[str, Field(max_length=MAX_OPT_OUT_REASON_CHARS)] | None = None  # why, for a manual removal

    @model_validator(mode="after")
    def _a_manual_change_says_who_and_a_manual_removal_why(self) -> "OptOutChanged":
        if self.source == MANUAL_OPT_OUT:
            if self.issued_by is None:
                raise ValueError("a manual opt-out change names who made it (issued_by)")
            if not self.opted_out and not (self.reason or "").strip():
                raise ValueError("a manual removal from the opt-out list says why (reason)")
        return self


class OptOutListChanged(BaseModel):
    """Relay -> projections (`outreach.internal.opt-out-list`, key `channel:destination`), from the command handler's
    stored OptOutList events: a destination came on (`opted_out` true) or off a channel's opt-out list, the list
    every send obeys. Published only when the list changes (an opt-out of a destination already listed stores
    nothing). `sequence` orders one channel's changes (the list's version): for one destination, the change with
    the highest sequence is the one in force. `source` is an OptOutChanged's source, or the provider's answer to a
    message that opted its destination out: `result:OUTCOME` (a campaign message) or `test_message:OUTCOME` (a test
    send), e.g. result:refused for Twilio's 21610, result:spamreport."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["OptOutListChanged"] = "OptOutListChanged"
    event_id: WireId
    channel: Literal["sms", "email"]
    destination: Annotated[str, Field(min_length=1, max_length=320)]
    opted_out: bool
    source: Annotated[str, Field(min_length=1, max_length=100)]
    issued_by: str | None = None  # a manual change's author
    reason: str | None = None  # a manual removal's reason
    causation_id: str | None = None  # the OptOutChanged's opt_out_id, or the provider result's id
    sequence: NonNegativeInt
    occurred_at: WireTime


class ChannelSettingsChanged(BaseModel):
    """API -> sender and webhook receiver (`outreach.internal.channel-settings`, key channel): the provider a
    channel uses now and its credentials, as the API stored them. The latest record of a channel wins.

    `credentials` is the Fernet token (OUTREACH_API_ENCRYPTION_KEY, else data_dir/api-encryption.key) of
    the credentials' JSON object: never plaintext on the broker.
    """

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["ChannelSettingsChanged"] = "ChannelSettingsChanged"
    settings_id: WireId
    channel: Literal["sms", "email"]
    provider: Annotated[str, Field(min_length=1, max_length=64)]
    credentials: Annotated[str, Field(min_length=1)]
    occurred_at: WireTime


class InstanceHeartbeat(BaseModel):
    """Every service instance -> `outreach status` (`outreach.internal.heartbeats`, key `SERVICE[-N]@host`):
    where its /metrics, /healthz and /readyz answer, published every `interval_s` seconds by its observability
    server (services/common/observability.py). The latest record of a key wins; a null value (a tombstone)
    is published when the instance stops, so a stopped instance is not taken for a dead one."""

    model_config = _internal_config(json_schema_extra=mark_type_required)

    type: Literal["InstanceHeartbeat"] = "InstanceHeartbeat"
    deployment: str  # OUTREACH_DEPLOYMENT: `outreach status` shows its own deployment's instances only
    service: Annotated[str, Field(min_length=1, max_length=64)]
    instance: Annotated[str, Field(max_length=64)]  # OUTREACH_INSTANCE_NAME, "0" for the first (none)
    host: Annotated[str, Field(min_length=1, max_length=255)]
    pid: Annotated[int, Field(ge=0)]
    # Where the endpoints answer from other hosts: OUTREACH_METRICS_ADVERTISED_URL, else the host's name when
    # it listens on every address (0.0.0.0, as in docker-compose), else OUTREACH_METRICS_HOST.
    url: str
    metrics_url: str  # url + "/metrics" (what Prometheus scrapes)
    interval_s: Annotated[float, Field(gt=0)]
    started_at: WireTime
    at: WireTime
