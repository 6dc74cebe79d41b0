"""Commands on `outreach.commands`, as the wire contract fixes them (shared/wire-contract-v1.md).

Commands come from other systems, so they are validated strictly: JSON `true`/`false` only for
booleans, JSON integers only for integers, ids only in the lowercase 8-4-4-4-12 form. Parse raw
records with `parse_command` (JSON mode: RFC 3339 strings become datetimes, nothing else is coerced).
Unknown fields are ignored: the contract lets senders add fields.

The primitives shared by every record (`WireId`, `UtcDatetime`, `WireTime`, `Channel`, templates) live here too;
events and internal records import them.
"""
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union, get_args

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from schemas.ids import UUID_PATTERN
from schemas.phone import check_region
from schemas.times import WIRE_TIME_PATTERN, rfc3339, utc_now

# --- Shared primitives -------------------------------------------------------------------------

# Kept as str (not uuid.UUID) so an id is echoed byte for byte.
WireId = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]
"""A UUID in the lowercase 8-4-4-4-12 form."""



def _to_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


# RFC 3339 requires an offset, so naive times are rejected; every time is held in UTC and written
# with microseconds always present (fixed width: written times sort as strings).
UtcDatetime = Annotated[
    AwareDatetime,
    AfterValidator(_to_utc),
    PlainSerializer(rfc3339, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]

# Internal records' times: the wire text itself, as `schemas.times.rfc3339` writes it (`utc_now()`), kept as
# str. They pass through several services unread, and a datetime there would cost two Python calls per
# record and hop (UtcDatetime's conversion to UTC and its serializer); this is checked and written natively.
WireTime = Annotated[
    str,
    StringConstraints(pattern=WIRE_TIME_PATTERN),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": WIRE_TIME_PATTERN}),
]

Channel = Literal["sms", "email"]
CHANNELS: tuple[Channel, ...] = get_args(Channel)


def _check_email_address(value: str) -> str:
    # The contract names email-validator 2.x with check_deliverability=False as the judge.
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    return value


EmailAddress = Annotated[str, AfterValidator(_check_email_address)]
"""An address email-validator accepts; kept as given (the template is echoed in events)."""


def _strict_config(**extra: Any) -> ConfigDict:
    # The serialization-mode schema (used where templates appear in events) marks defaulted fields
    # required, since a serialized record always carries them.
    return ConfigDict(
        strict=True,
        frozen=True,
        extra="ignore",
        json_schema_serialization_defaults_required=True,
        **extra,
    )


# --- Templates ---------------------------------------------------------------------------------

SMS_BODY_MAX_CHARS = 1600
ATTACHMENTS_MAX_BYTES = 20 * 1024 * 1024
# (v1.1) An email subject or html over this many bytes of UTF-8 is invalid: every record that carries a
# template stays under the 1 MiB record limit.
EMAIL_TEXT_MAX_BYTES = 512 * 1024


def _integral_float_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


class SmsTemplate(BaseModel):
    model_config = _strict_config()

    body: Annotated[str, StringConstraints(min_length=1, max_length=SMS_BODY_MAX_CHARS)]


class Attachment(BaseModel):
    model_config = _strict_config()

    filename: str
    content_type: str
    # JSON Schema counts 338.0 as an integer (the API's OpenAPI document says integer): an integral float is
    # taken as the integer it is; 338.5 is still refused.
    size_bytes: Annotated[int, Field(ge=0), BeforeValidator(_integral_float_as_int)]  # this order: "minimum" in the schema
    status: str

    @property
    def uploaded(self) -> bool:
        # Only "complete" counts as uploaded; any other status (pending, failed, ...) does not.
        return self.status == "complete"


class EmailTemplate(BaseModel):
    model_config = _strict_config()

    subject: Annotated[str, StringConstraints(min_length=1)]
    html: Annotated[str, StringConstraints(min_length=1)]
    from_email: EmailAddress
    # The contract lists from_name but calls valid any email with subject, html, from_email and
    # small enough attachments, so it (and the attachment list) may be left out.
    from_name: str = ""
    reply_to: EmailAddress | None = None
    attachments: list[Attachment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _texts_fit(self) -> "EmailTemplate":
        for name in ("subject", "html"):
            size = len(getattr(self, name).encode())
            if size > EMAIL_TEXT_MAX_BYTES:
                raise ValueError(f"{name} is {size} bytes of UTF-8, more than the {EMAIL_TEXT_MAX_BYTES} allowed")
        return self

    @model_validator(mode="after")
    def _attachments_fit(self) -> "EmailTemplate":
        total = self.attachments_bytes
        if total > ATTACHMENTS_MAX_BYTES:
            raise ValueError(
                f"attachments total {total} bytes, more than the {ATTACHMENTS_MAX_BYTES} allowed"
            )
        return self

    @property
    def attachments_bytes(self) -> int:
        return sum(attachment.size_bytes for attachment in self.attachments)

    @property
    def attachments_uploaded(self) -> bool:
        return all(attachment.uploaded for attachment in self.attachments)


_EMAIL_KEYS = ("subject", "html", "from_email")


def _template_shape(value: Any) -> str | None:
    """Tell an SMS template from an email one by its keys, so errors name the right fields."""
    if isinstance(value, SmsTemplate):
        return "sms"
    if isinstance(value, EmailTemplate):
        return "email"
    if isinstance(value, dict):
        # Email keys win: an email template may one day carry a plain-text `body` as well.
        if any(key in value for key in _EMAIL_KEYS):
            return "email"
        if "body" in value:
            return "sms"
    return None


Template = Annotated[
    Union[Annotated[SmsTemplate, Tag("sms")], Annotated[EmailTemplate, Tag("email")]],
    Discriminator(
        _template_shape,
        custom_error_type="template_shape",
        custom_error_message="template must be an SMS template {body} or an email template "
        "{subject, html, from_email, from_name, reply_to?, attachments}",
    ),
]

_TEMPLATE_CLASS_BY_CHANNEL: dict[str, type[BaseModel]] = {"sms": SmsTemplate, "email": EmailTemplate}


def template_matches_channel(template: SmsTemplate | EmailTemplate, channel: str) -> bool:
    """True when the template has the shape the channel sends (SMS body, or email)."""
    return isinstance(template, _TEMPLATE_CLASS_BY_CHANNEL.get(channel, ()))


# --- Commands ----------------------------------------------------------------------------------


def mark_type_required(schema: dict[str, Any]) -> None:
    # `type` has a default for convenience in Python, but every record on the wire carries it.
    required = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class CommandBase(BaseModel):
    """The envelope every command carries."""

    model_config = _strict_config(json_schema_extra=mark_type_required)

    type: str
    command_id: WireId
    campaign_id: WireId
    issued_by: str
    issued_at: UtcDatetime
    # Our addition: the HTTP API writes "api" on every command it publishes (issued_by is then the principal of
    # the bearer token it checked). Absent: a Kafka producer's own assertion. The handler takes it as given, like
    # issued_by: a producer with write access to outreach.commands could write it too (README, "The CLI's sign-in").
    issued_via: Literal["api"] | None = Field(
        None, description="(our addition) \"api\" when the HTTP API published the command after authenticating "
                          "issued_by's bearer token; absent when a Kafka producer publishes it (issued_by is then "
                          "that producer's assertion). Taken as given by the command handler.")
    # Our addition: `outreach dlq replay` writes the operator who published a parked command again; the handler
    # copies it onto every campaign event answering the command, so the campaign's history names who replayed it.
    replayed_by: str | None = Field(
        None, description="(our addition) The operator who replayed this command from outreach.commands.dlq "
                          "(`outreach dlq replay`: the local account, USER@HOST); absent otherwise. The command "
                          "handler copies it onto the campaign events answering the command. Taken as given.")


class CreateCampaign(CommandBase):
    type: Literal["CreateCampaign"] = "CreateCampaign"
    name: str
    description: str | None = None
    channel: Channel
    template: Template

    @model_validator(mode="after")
    def _template_fits_channel(self) -> "CreateCampaign":
        if not template_matches_channel(self.template, self.channel):
            raise ValueError(f"template does not match channel {self.channel!r}")
        return self


MAX_CONTACTS_PER_CHUNK = 1000
MAX_CHUNK_BYTES = 900 * 1024  # the contract's limit on one encoded AddContacts record


def _none_as_empty(value: Any) -> Any:
    return "" if value is None else value


class Contact(BaseModel):
    model_config = _strict_config()

    row: Annotated[int, Field(ge=1)]
    # Absent or null means an empty cell: the handler reports the row as `missing_destination`
    # rather than rejecting the whole chunk. Kept as given: validity is judged on the cell as is.
    destination: Annotated[str, BeforeValidator(_none_as_empty)] = ""
    variables: dict[str, str] = Field(default_factory=dict)


DefaultRegion = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$"), AfterValidator(check_region)]
"""An ISO 3166-1 alpha-2 region, upper case, that phonenumbers knows (schemas/phone.py)."""


class AddContacts(CommandBase):
    type: Literal["AddContacts"] = "AddContacts"
    chunk_no: Annotated[int, Field(ge=0)]
    # The 900 KiB limit is on the raw record, so the handler checks it, not this model.
    contacts: Annotated[list[Contact], Field(max_length=MAX_CONTACTS_PER_CHUNK)]
    last_chunk: bool
    # (v1.1) An import's own default region (the CLI's --default-region, the API's `default_region` field, else
    # the importer's OUTREACH_DEFAULT_REGION): the handler normalises with it, so its judgement stays the one.
    default_region: DefaultRegion | None = Field(
        None, description="(v1.1, our addition) The region this chunk's SMS destinations are read with: national "
                          "and formatted numbers become E.164 with phonenumbers (parse and format only) before the "
                          "contract's rule judges them; a cell already in E.164 is kept as given. An ISO 3166-1 "
                          "alpha-2 code, upper case, that phonenumbers knows (else invalid_command). Absent or null: "
                          "the command handler's OUTREACH_DEFAULT_REGION, and without it the cell as given. Ignored "
                          "for email campaigns.")


class UpdateTemplate(CommandBase):
    # The channel is campaign state: the handler checks `template_matches_channel` after the
    # state checks, as the contract's order of rejection reasons requires.
    type: Literal["UpdateTemplate"] = "UpdateTemplate"
    template: Template


class Disclaimer(BaseModel):
    model_config = _strict_config()

    consent: bool = False
    content_compliance: bool = False
    opt_out: bool = False
    data_responsibility: bool = False

    @property
    def accepted(self) -> bool:
        return self.consent and self.content_compliance and self.opt_out and self.data_responsibility


def _none_as_default_disclaimer(value: Any) -> Any:
    return Disclaimer() if value is None else value


class RunCampaign(CommandBase):
    type: Literal["RunCampaign"] = "RunCampaign"
    # Absent (or null) is a disclaimer with every flag false: `disclaimer_not_accepted`, not invalid.
    disclaimer: Annotated[Disclaimer, BeforeValidator(_none_as_default_disclaimer)] = Field(
        default_factory=Disclaimer
    )


class StopCampaign(CommandBase):
    type: Literal["StopCampaign"] = "StopCampaign"
    confirmed: bool = False


class RetryFailedMessages(CommandBase):
    type: Literal["RetryFailedMessages"] = "RetryFailedMessages"
    message_ids: list[WireId] | None = None
    include_cancelled: bool = False


class DeleteCampaign(CommandBase):
    type: Literal["DeleteCampaign"] = "DeleteCampaign"


TEST_VARIABLES_MAX = 100  # variables a test message may be given (a template rarely names more than a few)


class SendTestMessage(CommandBase):
    """(our addition) Send the campaign's message, rendered, to one destination of the issuer's choice, through the
    real provider path (adapter, rate limit, circuit breaker, hand-off fence), whatever the channel lock says.
    Answered on outreach.campaign-events (TestMessageQueued, then TestMessageCompleted with the provider's
    answer; or TestMessageCompleted opted_out at once; or CommandRejected), never on outreach.message-status: a
    test message is no message of the campaign and changes none of its counts. Not retried; at most 5 per issuer
    (issued_by) in any hour, over every campaign (else CommandRejected test_send_limit)."""

    type: Literal["SendTestMessage"] = "SendTestMessage"
    # Judged by the handler with the contacts' rule for the campaign's channel (its state): E.164 (or a national
    # number read with OUTREACH_DEFAULT_REGION) for SMS, an address email-validator accepts for email.
    destination: Annotated[str, StringConstraints(min_length=1, max_length=320)] = Field(
        description="(our addition) Where the test message goes: a phone number (E.164) for an SMS campaign, an "
                    "email address for an email campaign, judged by the contacts' rule (else invalid_command).")
    row: Annotated[int, Field(ge=1)] | None = Field(
        None, description="(our addition) The contact (its row) whose variables the message is rendered with; "
                          "absent: the campaign's first valid contact's (none: the placeholders stay literal). A row "
                          "that is no valid contact of the campaign is invalid_command.")
    variables: Annotated[dict[str, str], Field(max_length=TEST_VARIABLES_MAX)] | None = Field(
        None, description="(our addition) Variables to render with, over the contact's (these win).")


Command = Annotated[
    Union[
        CreateCampaign,
        AddContacts,
        UpdateTemplate,
        RunCampaign,
        StopCampaign,
        RetryFailedMessages,
        DeleteCampaign,
        SendTestMessage,
    ],
    Field(discriminator="type"),
]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)
COMMAND_CLASSES: tuple[type[CommandBase], ...] = get_args(get_args(Command)[0])
COMMAND_TYPES: frozenset[str] = frozenset(cls.__name__ for cls in COMMAND_CLASSES)


def parse_command(raw: bytes | str) -> Command:
    """Validate one record value as a command; raises pydantic.ValidationError.

    JSON mode on purpose: strict Python mode would refuse the RFC 3339 string of `issued_at`.
    """
    return COMMAND_ADAPTER.validate_json(raw)


class CommandHeader(BaseModel):
    """The least a record needs to be answered rather than dead-lettered (contract, Answers).

    A record that fails this goes to `outreach.commands.dlq`; one that passes it but not
    `parse_command` is answered by `CommandRejected(invalid_command)` naming its type and id.
    """

    model_config = _strict_config()

    type: str
    command_id: WireId
    campaign_id: WireId


def parse_command_header(raw: bytes | str) -> CommandHeader:
    """Validate the header of a record; raises pydantic.ValidationError (also for invalid JSON)."""
    return CommandHeader.model_validate_json(raw)


def validation_detail(error: ValidationError, limit: int = 5) -> str:
    """A short, human-readable `detail` for `CommandRejected(invalid_command)`.

    The first location part of a command error is the union tag (the command type): dropped.
    """
    parts = []
    for item in error.errors(include_url=False)[:limit]:
        loc = list(item["loc"])
        if loc and loc[0] in COMMAND_TYPES:
            loc = loc[1:]
        where = ".".join(str(part) for part in loc)
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    more = len(error.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# --- Building commands -------------------------------------------------------------------------

def new_id() -> str:
    """A fresh random id in the contract's form (a new campaign's, a new command's)."""
    return str(uuid.uuid4())


def make_command(command_type: str, campaign_id: str, issued_by: str, *, command_id: str | None = None,
                 **payload: Any) -> dict[str, Any]:
    """A command as it goes on `outreach.commands`: the envelope (`command_id` a fresh one unless given,
    issued now by `issued_by`) and the payload fields. Not validated here: `parse_command` is the judge."""
    return {
        "type": command_type,
        "command_id": command_id or new_id(),
        "campaign_id": campaign_id,
        "issued_by": issued_by,
        "issued_at": utc_now(),
        **payload,
    }
