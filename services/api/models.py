"""Request and response bodies of the HTTP API (what /openapi.json documents)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from schemas.commands import ATTACHMENTS_MAX_BYTES, SMS_BODY_MAX_CHARS, Channel, Template, WireId
from schemas.commands import _integral_float_as_int  # the contract's own reading of 338.0 as an integer
from schemas.events import CampaignStatus, FailureReason, MessageStatus, RejectionReason, TestMessageOutcome
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


# ------------------------------------------------------------------ errors


class Problem(BaseModel):
    """An error. `detail` says what is wrong: a text, or one entry per field for a request the OpenAPI schema
    refuses (FastAPI's validation errors: `loc`, `msg`, `type`)."""
    detail: str | list[dict[str, Any]]


# ------------------------------------------------------------------ commands

_STATE_DESCRIPTION = ("`answered`: the command handler accepted the command within the wait, `events` are its "
                      "answer events; `pending`: no answer yet (it is at `GET /commands/{command_id}` when it comes).")


class CommandAccepted(BaseModel):
    """The command was published and acknowledged by the broker, and the command handler accepted it (`answered`)
    or has not answered it yet (`pending`)."""
    command_id: str
    campaign_id: str
    command_type: str
    state: Literal["answered", "pending"] = Field(description=_STATE_DESCRIPTION)
    events: list[dict[str, Any]] = Field(description="The answer events (`causation_id` = `command_id`), in order; "
                                                     "empty while pending.")


class CommandRefused(BaseModel):
    """The command handler rejected the command (a `CommandRejected` answered it): the status tells the kind of
    reason (404 unknown campaign, 409 the campaign's state, 422 the command itself), `reason` which one."""
    detail: str = Field(description="The rejection's detail (its reason when the handler gave none).")
    reason: RejectionReason
    command_id: str = Field(description="The rejected command (for a CSV create: the AddContacts chunk, when one "
                                        "was rejected).")
    campaign_id: str
    command_type: str
    state: Literal["rejected"] = "rejected"
    events: list[dict[str, Any]] = Field(description="The answer events, the CommandRejected among them.")


class InvalidReason(BaseModel):
    count: int
    first_rows: list[int] = Field(description="The first rows (CSV line numbers) with this reason.")


class MissingVariable(BaseModel):
    """A placeholder of the template that some contacts have no value for: it would stay literal in their
    messages."""
    variable: str
    count: int = Field(description="Contacts (valid ones: those that become messages) without a value for it.")
    first_rows: list[int] = Field(description="The first of their rows (CSV line numbers).")


class ImportCheckReport(BaseModel):
    """What the API's check of the CSV found before publishing anything, with the command handler's own rules
    (destination validity after the default region's normalisation, duplicates within the file). The handler
    judges every row again when the chunks arrive: its ContactsAdded are the answer."""
    contacts: int
    valid: int
    invalid: int
    invalid_reasons: dict[str, InvalidReason] = Field(description="reason -> its count and first rows.")
    missing_variables: list[MissingVariable] = Field(
        description="The template's placeholders that some valid contacts have no value for, in template order.")
    default_region: str | None = Field(description="The region national SMS numbers were read with (the form's "
                                                   "`default_region`, else OUTREACH_DEFAULT_REGION), or null.")


class ImportRefused(Problem):
    """The CSV has no valid contact (it is empty, or every row is invalid): refused at once, nothing published."""
    detail: str
    reason: Literal["no_valid_contacts"] = "no_valid_contacts"
    check: ImportCheckReport


class CampaignCreateAccepted(CommandAccepted):
    """`state` is `answered` once the CreateCampaign and the last AddContacts chunk are answered (the campaign is
    then Ready); `events` answer the CreateCampaign, `contacts_events` the last chunk."""
    contacts: int = Field(description="Contacts read from the CSV (valid or not: the handler judges them).")
    has_header: bool
    destination_column: str
    variables: dict[str, str] = Field(description="CSV column -> template variable.")
    contacts_command_ids: list[str] = Field(description="AddContacts command ids, chunk 0 first; the last one "
                                                        "is answered by CampaignReady.")
    contacts_events: list[dict[str, Any]] = Field(
        description="The last chunk's answer events (ContactsAdded with its valid and invalid rows, CampaignReady, "
                    "the status change); empty while pending.")
    check: ImportCheckReport = Field(description="The check of the CSV made before publishing: valid and invalid "
                                                 "rows as the handler will judge them, and missing variables.")
    missing_variables: list[MissingVariable] = Field(
        description="The template's placeholders that some contacts have no value for (the check's), with their "
                    "rows: those messages would show the placeholder literally.")


class TemplateUpdateAccepted(CommandAccepted):
    """An UpdateTemplate accepted (or pending). Once the contacts are closed the handler's TemplateUpdated carries
    the new run summary: `missing_variables` is its report."""
    missing_variables: list[MissingVariable] | None = Field(
        None, description="The new template's placeholders that some contacts have no value for, with their rows "
                          "(from TemplateUpdated.summary); null while pending or before the contacts are imported.")


class CommandAnswer(BaseModel):
    command_id: str
    state: Literal["pending", "answered", "rejected"]
    events: list[dict[str, Any]]


# Request bodies are strict, as commands are: JSON true/false only, no coercion of "yes" or 1.
_STRICT = ConfigDict(strict=True, extra="ignore")


# ------------------------------------------------------------------ templates, as the OpenAPI document states them

# The contract's template models (schemas/commands.py) validate; this is their rule written as JSON Schema, so the
# document accepts what they accept: an address as email-validator takes it (not a special-use domain: .test...),
# an SMS template is one without the email keys (with any of them it is read as an email template).
EMAIL_ADDRESS_SCHEMA = {
    "type": "string", "format": "email",
    "pattern": r"^(?!.*\.(" + "|".join(SPECIAL_USE_DOMAIN_NAMES) + r")\.?$).*$",
    "description": "An address email-validator 2.x accepts (no deliverability check; special-use domains such as "
                   ".test and .localhost are refused).",
}
_EMAIL_KEYS = ("subject", "html", "from_email")
SMS_TEMPLATE_SCHEMA = {
    "title": "SmsTemplate", "type": "object",
    "properties": {"body": {"type": "string", "minLength": 1, "maxLength": SMS_BODY_MAX_CHARS,
                            "description": "The message; {{column}} placeholders are filled from the contact's "
                                           "variables."}},
    "required": ["body"],
    "not": {"anyOf": [{"required": [key]} for key in _EMAIL_KEYS]},
}
EMAIL_TEMPLATE_SCHEMA = {
    "title": "EmailTemplate", "type": "object",
    "properties": {
        "subject": {"type": "string", "minLength": 1},
        "html": {"type": "string", "minLength": 1},
        "from_email": EMAIL_ADDRESS_SCHEMA,
        "from_name": {"type": "string", "default": ""},
        "reply_to": {"anyOf": [EMAIL_ADDRESS_SCHEMA, {"type": "null"}], "default": None},
        "attachments": {
            "type": "array", "default": [],
            "description": f"At most {ATTACHMENTS_MAX_BYTES} bytes in all; only status `complete` counts as uploaded "
                           "(a run with another is rejected attachments_not_ready).",
            "items": {"type": "object", "required": ["filename", "content_type", "size_bytes", "status"],
                      "properties": {"filename": {"type": "string"}, "content_type": {"type": "string"},
                                     "size_bytes": {"type": "integer", "minimum": 0,
                                                    "maximum": ATTACHMENTS_MAX_BYTES},
                                     "status": {"type": "string"}}}},
    },
    "required": list(_EMAIL_KEYS),
}
TEMPLATE_SCHEMA = {"oneOf": [SMS_TEMPLATE_SCHEMA, EMAIL_TEMPLATE_SCHEMA],
                   "description": "An SMS template {body} or an email template {subject, html, from_email, from_name, "
                                  "reply_to?, attachments}; the campaign's channel decides which one it takes "
                                  "(another: CommandRejected invalid_command)."}

DocumentedTemplate = Annotated[Template, WithJsonSchema(TEMPLATE_SCHEMA)]


class UpdateTemplateBody(BaseModel):
    model_config = _STRICT

    template: DocumentedTemplate


def _flags_must_be_true(schema: dict[str, Any]) -> None:
    """Documents the rule, not the transport: every flag is required and true. A flag false or left out is still
    published, and the handler answers it with its reason, in the contract's order (an unknown campaign first)."""
    for flag in schema["properties"].values():
        flag.pop("default", None)
        flag["const"] = True
    schema["required"] = list(schema["properties"])


class RunDisclaimer(BaseModel):
    """The run disclaimer (the contract's `disclaimer`): all four flags true."""
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_flags_must_be_true)

    consent: bool = Field(False, description="The recipients consented to be contacted.")
    content_compliance: bool = Field(False, description="The content is lawful and appropriate.")
    opt_out: bool = Field(False, description="An opt-out (SMS) / unsubscribe (email) is included and opted-out "
                                             "contacts are excluded.")
    data_responsibility: bool = Field(False, description="You are responsible for the uploaded data.")


class RunBody(BaseModel):
    model_config = _STRICT

    disclaimer: RunDisclaimer = Field(description=(
        "All four flags must be true, on every run. Otherwise the handler answers "
        "CommandRejected(disclaimer_not_accepted) (422) and nothing is queued."))


class StopBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_flags_must_be_true)

    confirmed: bool = Field(description="Must be true; otherwise CommandRejected(stop_not_confirmed) (422).")


class RetryBody(BaseModel):
    model_config = _STRICT

    message_ids: list[WireId] | None = Field(None, description="Only these messages (default: every failed one "
                                                               "but those timed out).")
    include_cancelled: bool = False


class TestSendBody(BaseModel):
    """A test message: the campaign's message, rendered, to one destination of your choice (SendTestMessage)."""
    model_config = _STRICT

    destination: str = Field(min_length=1, max_length=320, description=(
        "A phone number (E.164, or national with OUTREACH_DEFAULT_REGION set) for an SMS campaign, an email address "
        "for an email campaign; judged by the contacts' rule (else CommandRejected invalid_command, 422)."))
    # JSON Schema counts 2.0 as an integer (the document says integer): an integral float is the integer it is.
    row: Annotated[int, Field(ge=1, le=2_147_483_647), BeforeValidator(_integral_float_as_int)] | None = Field(
        None, description=(
        "The contact (its CSV row) whose variables the message is rendered with (default: the campaign's first "
        "valid contact). Not a valid contact of the campaign: invalid_command (422)."))
    variables: dict[str, str] | None = Field(None, max_length=100, description=(
        "Variables to render with, over the contact's (these win)."))


class TestMessageView(BaseModel):
    """A test message and, once the sender answered, its outcome (from TestMessageQueued / TestMessageCompleted)."""
    message_id: str = Field(description="The test message's own id (no message of the campaign).")
    destination: str
    preview: str | None = Field(None, description="The rendered SMS text, or the rendered email subject (null when "
                                                  "nothing was queued: an opted-out destination).")
    outcome: TestMessageOutcome | None = Field(description=(
        "accepted (the provider took it), refused (by the provider: `reason` the contract's failure reason of its "
        "code, or deferred), failed (never reached the provider: provider_error, provider_held or not_sent), "
        "opted_out (the destination is on the channel's opt-out list, or the provider said so: nothing sent), "
        "no_answer (handed off, no answer: it may have arrived); null while the sender has not answered (the "
        "outcome then comes at `GET /commands/{command_id}`)."))
    reason: str | None = None
    provider_code: str | None = None
    provider_message_id: str | None = None


class TestSendAccepted(CommandAccepted):
    """A SendTestMessage accepted (`answered`) or not answered yet (`pending`); the answer waits for the sender's
    outcome too, within the same wait."""
    test_message: TestMessageView | None = Field(None, description="null while pending.")


# ------------------------------------------------------------------ channel settings


# Each channel's body is a union by `provider`, each with exactly its credential fields (write-only: stored
# encrypted, shown masked), so the OpenAPI document says what services.common.channel_settings.check accepts.
_Required = Annotated[str, Field(min_length=1, max_length=4096)]
_BaseUrl = Annotated[str, Field(pattern=r"^(https?://[^\s/?#]+[^\s]*)?$", max_length=2048,
                                description="default: the environment's (the simulator unless set)")]
_SMTP_PORT = r"^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
_FLAG = r"^(1|true|yes|on|0|false|no|off)?$"


class _Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TwilioCredentials(_Credentials):
    account_sid: _Required
    auth_token: _Required
    messaging_service_sid: _Required
    base_url: _BaseUrl | None = None


class SendgridCredentials(_Credentials):
    api_key: _Required
    base_url: _BaseUrl | None = None
    webhook_public_key: Annotated[str, Field(pattern=r"^([A-Za-z0-9+/]+={0,2})?$", max_length=4096,
                                             description="base64 DER (SubjectPublicKeyInfo) of SendGrid's "
                                                         "Event Webhook verification key")] | None = None


class SmtpCredentials(_Credentials):
    host: Annotated[str, Field(pattern=r"^[^\s]+$", max_length=253)]
    port: Annotated[str, Field(pattern=_SMTP_PORT, description="1 to 65535")]
    username: Annotated[str, Field(max_length=4096)] | None = None
    password: Annotated[str, Field(max_length=4096)] | None = None
    starttls: Annotated[str, Field(pattern=_FLAG, description="true or false (1/0, yes/no, on/off)")] | None = None


class NoCredentials(_Credentials):
    pass


class TwilioSettings(BaseModel):
    provider: Literal["twilio"]
    credentials: TwilioCredentials


class SendgridSettings(BaseModel):
    provider: Literal["sendgrid"]
    credentials: SendgridCredentials


class SmtpSettings(BaseModel):
    provider: Literal["smtp"]
    credentials: SmtpCredentials


class InprocessSettings(BaseModel):
    provider: Literal["inprocess"]
    credentials: NoCredentials = Field(default_factory=NoCredentials)


SmsChannelSettingsBody = Annotated[TwilioSettings | InprocessSettings, Field(discriminator="provider")]
EmailChannelSettingsBody = Annotated[SendgridSettings | SmtpSettings | InprocessSettings,
                                     Field(discriminator="provider")]


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


# Python's white space (what str.strip() removes) and the control characters: never at either end of a name.
_NAME_END = r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
TOKEN_NAME_PATTERN = rf"^{_NAME_END}(?:[^\x00-\x1f\x7f]*{_NAME_END})?$"


class TokenCreateBody(BaseModel):
    model_config = _STRICT

    name: str = Field(max_length=200, pattern=TOKEN_NAME_PATTERN,
                      description="The principal: written as `issued_by` on the commands sent with the token. No "
                                  "control character, and no white space at either end.")
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

