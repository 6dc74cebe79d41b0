"""The wire contract as models: strict commands, every event, internal records, exported JSON Schema."""
import json
from datetime import timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas import export, internal  # internal's Test* records by module: pytest would collect such names
from schemas.commands import (
    ATTACHMENTS_MAX_BYTES,
    COMMAND_ADAPTER,
    COMMAND_TYPES,
    AddContacts,
    CreateCampaign,
    EmailTemplate,
    RunCampaign,
    SmsTemplate,
    parse_command,
    parse_command_header,
    template_matches_channel,
    validation_detail,
)
from schemas.events import (
    CAMPAIGN_EVENT_ADAPTER,
    CAMPAIGN_EVENT_TYPES,
    CAMPAIGN_STATUSES,
    FAILURE_REASONS,
    FINAL_MESSAGE_STATUSES,
    INVALID_ROW_REASONS,
    MESSAGE_STATUSES,
    REJECTION_REASONS,
    Counts,
    MessageStatusChanged,
    parse_campaign_event,
    parse_message_status,
)
from schemas.internal import ClaimRequest, Expiry, SenderResults, WorkClaimed, template_digest
from schemas.times import utc_now

COMMAND_ID = "0b6f1c1e-3f8a-4c2d-9e55-1a2b3c4d5e6f"
CAMPAIGN_ID = "7d9e2f10-5a4b-4c3d-8e2f-9a8b7c6d5e4f"
MESSAGE_ID = "3c2b1a09-8f7e-5d6c-9b4a-0f1e2d3c4b5a"
EVENT_ID = "5e4d3c2b-1a09-5f8e-8d7c-6b5a4f3e2d1c"
OTHER_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"

SMS_TEMPLATE = {"body": "Hi {first_name}, reply STOP to opt out"}
EMAIL_TEMPLATE = {
    "subject": "Spring sale",
    "html": "<p>Hi {first_name}</p>",
    "from_email": "news@example.com",
    "from_name": "Example News",
    "reply_to": "help@example.com",
    "attachments": [
        {"filename": "flyer.pdf", "content_type": "application/pdf", "size_bytes": 1024, "status": "complete"}
    ],
}


def envelope(command_type: str, **payload) -> dict:
    return {
        "type": command_type,
        "command_id": COMMAND_ID,
        "campaign_id": CAMPAIGN_ID,
        "issued_by": "alice",
        "issued_at": "2024-05-01T12:00:00Z",
        **payload,
    }


def raw(value: dict) -> bytes:
    return json.dumps(value).encode()


VALID_COMMANDS = {
    "CreateCampaign": envelope(
        "CreateCampaign", name="Spring", description="promo", channel="sms", template=SMS_TEMPLATE
    ),
    "AddContacts": envelope(
        "AddContacts",
        chunk_no=0,
        contacts=[
            {"row": 2, "destination": "+15005550006", "variables": {"first_name": "Ann"}},
            {"row": 3, "destination": "", "variables": {}},
        ],
        last_chunk=True,
    ),
    "UpdateTemplate": envelope("UpdateTemplate", template=EMAIL_TEMPLATE),
    "RunCampaign": envelope(
        "RunCampaign",
        disclaimer={"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True},
    ),
    "StopCampaign": envelope("StopCampaign", confirmed=True),
    "RetryFailedMessages": envelope("RetryFailedMessages", message_ids=[MESSAGE_ID], include_cancelled=True),
    "DeleteCampaign": envelope("DeleteCampaign"),
    "SendTestMessage": envelope("SendTestMessage", destination="+15005550006", row=2,
                                variables={"first_name": "Ann"}),
}


def rejects(value: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        parse_command(raw(value))
    return caught.value


# --- exported JSON Schema ----------------------------------------------------------------------


def test_exported_schema_files_match_the_code():
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in export.JSON_DIR.glob("*.json")}
    assert on_disk == export.generate(), "run `python -m schemas.export`"


def test_check_lists_changed_missing_and_stale_files(tmp_path: Path):
    export.write(tmp_path)
    assert export.drifted(tmp_path) == []
    (tmp_path / "commands.json").write_text("{}\n")
    (tmp_path / "message-status.json").unlink()
    (tmp_path / "old.json").write_text("{}\n")
    assert export.drifted(tmp_path) == ["commands.json", "message-status.json", "old.json"]
    export.write(tmp_path)
    assert export.drifted(tmp_path) == []


def test_check_exits_1_on_drift(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(export, "JSON_DIR", tmp_path)
    lines: list[str] = []
    assert export.main(["--check"], out=lines.append) == 1
    assert any("commands.json" in line for line in lines)
    assert export.main([], out=lines.append) == 0
    assert export.main(["--check"], out=lines.append) == 0


def test_exported_command_schema_requires_the_envelope():
    schema = json.loads(export.generate()["commands.json"])
    for name in COMMAND_TYPES:
        assert schema["$defs"][name]["required"][:5] == [
            "type", "command_id", "campaign_id", "issued_by", "issued_at"
        ]


# --- commands: valid ---------------------------------------------------------------------------


def test_every_command_type_has_an_example():
    assert set(VALID_COMMANDS) == COMMAND_TYPES


@pytest.mark.parametrize("command_type", sorted(VALID_COMMANDS))
def test_valid_command_parses(command_type: str):
    command = parse_command(raw(VALID_COMMANDS[command_type]))
    assert type(command).__name__ == command_type
    assert command.command_id == COMMAND_ID and command.campaign_id == CAMPAIGN_ID
    assert command.issued_at.tzinfo is not None


@pytest.mark.parametrize("command_type", sorted(VALID_COMMANDS))
def test_command_round_trips_through_json(command_type: str):
    command = parse_command(raw(VALID_COMMANDS[command_type]))
    assert parse_command(COMMAND_ADAPTER.dump_json(command)) == command


def test_command_built_in_python_serializes_for_the_wire():
    command = RunCampaign(
        command_id=COMMAND_ID, campaign_id=CAMPAIGN_ID, issued_by="cli", issued_at=parse_command(
            raw(VALID_COMMANDS["DeleteCampaign"])).issued_at,
    )
    assert json.loads(command.model_dump_json())["type"] == "RunCampaign"
    assert parse_command(command.model_dump_json()) == command


def test_issued_at_is_held_in_utc():
    command = parse_command(raw({**VALID_COMMANDS["DeleteCampaign"], "issued_at": "2024-05-01T14:00:00+02:00"}))
    assert command.issued_at.tzinfo == timezone.utc and command.issued_at.hour == 12


def test_unknown_fields_are_ignored():
    value = {**VALID_COMMANDS["StopCampaign"], "reason_text": "storm", "priority": 3}
    assert parse_command(raw(value)).confirmed is True


def test_optional_payloads_default_to_false_or_absent():
    run = parse_command(raw(envelope("RunCampaign")))
    assert run.disclaimer.accepted is False and not run.disclaimer.consent
    assert parse_command(raw(envelope("RunCampaign", disclaimer=None))).disclaimer.accepted is False
    partly = parse_command(raw(envelope("RunCampaign", disclaimer={"consent": True})))
    assert partly.disclaimer.consent and not partly.disclaimer.accepted
    assert parse_command(raw(VALID_COMMANDS["RunCampaign"])).disclaimer.accepted is True
    assert parse_command(raw(envelope("StopCampaign"))).confirmed is False
    retry = parse_command(raw(envelope("RetryFailedMessages")))
    assert retry.message_ids is None and retry.include_cancelled is False


def test_contacts_keep_destination_as_given():
    command = parse_command(raw(envelope(
        "AddContacts", chunk_no=1, last_chunk=False,
        contacts=[{"row": 5, "destination": " +15005550006 ", "variables": {}}, {"row": 6}],
    )))
    assert isinstance(command, AddContacts)
    assert [c.destination for c in command.contacts] == [" +15005550006 ", ""]


def test_add_contacts_size_limits():
    contacts = [{"row": row, "destination": "+15005550006", "variables": {}} for row in range(1, 1002)]
    assert len(parse_command(raw(envelope("AddContacts", chunk_no=0, contacts=contacts[:1000], last_chunk=True))).contacts) == 1000
    rejects(envelope("AddContacts", chunk_no=0, contacts=contacts, last_chunk=True))


# --- commands: strictness ----------------------------------------------------------------------

WRONG_TYPES = [
    pytest.param("AddContacts", "last_chunk", "yes", id="last_chunk-yes"),
    pytest.param("AddContacts", "last_chunk", 1, id="last_chunk-1"),
    pytest.param("AddContacts", "chunk_no", "3", id="chunk_no-str"),
    pytest.param("AddContacts", "chunk_no", 3.0, id="chunk_no-float"),
    pytest.param("AddContacts", "chunk_no", -1, id="chunk_no-negative"),
    pytest.param("StopCampaign", "confirmed", "yes", id="confirmed-yes"),
    pytest.param("StopCampaign", "confirmed", 1, id="confirmed-1"),
    pytest.param("StopCampaign", "confirmed", None, id="confirmed-null"),
    pytest.param("RetryFailedMessages", "include_cancelled", 1, id="include_cancelled-1"),
    pytest.param("RetryFailedMessages", "message_ids", [MESSAGE_ID.upper()], id="message_ids-uppercase"),
    pytest.param("RetryFailedMessages", "message_ids", MESSAGE_ID, id="message_ids-not-a-list"),
    pytest.param("RunCampaign", "disclaimer", {"consent": "yes"}, id="disclaimer-yes"),
    pytest.param("RunCampaign", "disclaimer", {"opt_out": 1}, id="disclaimer-1"),
    pytest.param("RunCampaign", "disclaimer", True, id="disclaimer-not-an-object"),
    pytest.param("CreateCampaign", "channel", "SMS", id="channel-uppercase"),
    pytest.param("CreateCampaign", "name", 7, id="name-int"),
    pytest.param("DeleteCampaign", "command_id", COMMAND_ID.upper(), id="command_id-uppercase"),
    pytest.param("DeleteCampaign", "campaign_id", CAMPAIGN_ID.upper(), id="campaign_id-uppercase"),
    pytest.param("DeleteCampaign", "campaign_id", CAMPAIGN_ID.replace("-", ""), id="campaign_id-no-dashes"),
    pytest.param("DeleteCampaign", "campaign_id", "{" + CAMPAIGN_ID + "}", id="campaign_id-braces"),
    pytest.param("DeleteCampaign", "command_id", COMMAND_ID + "\n", id="command_id-newline"),
    pytest.param("DeleteCampaign", "issued_by", None, id="issued_by-null"),
    pytest.param("DeleteCampaign", "issued_at", 1714564800, id="issued_at-epoch"),
    pytest.param("DeleteCampaign", "issued_at", "2024-05-01T12:00:00", id="issued_at-naive"),
    pytest.param("DeleteCampaign", "issued_at", "yesterday", id="issued_at-garbage"),
]


@pytest.mark.parametrize(("command_type", "field", "value"), WRONG_TYPES)
def test_wrongly_typed_field_is_rejected(command_type: str, field: str, value):
    error = rejects({**VALID_COMMANDS[command_type], field: value})
    assert field in validation_detail(error)


def test_contact_fields_are_strict():
    for contact in (
        {"row": "2", "destination": "+15005550006", "variables": {}},
        {"row": 0, "destination": "+15005550006", "variables": {}},
        {"row": 2, "destination": 15005550006, "variables": {}},
        {"row": 2, "destination": "+15005550006", "variables": {"age": 42}},
    ):
        rejects(envelope("AddContacts", chunk_no=0, contacts=[contact], last_chunk=True))


@pytest.mark.parametrize("field", ["type", "command_id", "campaign_id", "issued_by", "issued_at"])
def test_missing_envelope_field_is_rejected(field: str):
    value = dict(VALID_COMMANDS["DeleteCampaign"])
    del value[field]
    rejects(value)


@pytest.mark.parametrize("command_type", ["NoSuchCommand", "deletecampaign", ""])
def test_unknown_command_type_is_rejected(command_type: str):
    rejects({**VALID_COMMANDS["DeleteCampaign"], "type": command_type})


def test_missing_payload_fields_are_rejected():
    rejects(envelope("AddContacts", chunk_no=0, contacts=[]))
    rejects(envelope("CreateCampaign", name="x", channel="sms"))
    rejects(envelope("UpdateTemplate"))


def test_header_separates_dead_letters_from_invalid_commands():
    # Answerable (invalid_command): a string type and well-formed ids, whatever else is wrong.
    header = parse_command_header(raw({"type": "NoSuchCommand", "command_id": COMMAND_ID, "campaign_id": CAMPAIGN_ID}))
    assert (header.type, header.command_id, header.campaign_id) == ("NoSuchCommand", COMMAND_ID, CAMPAIGN_ID)
    # Dead letters.
    for value in (
        b"not json",
        b"[1, 2]",
        b'"DeleteCampaign"',
        raw({"type": 5, "command_id": COMMAND_ID, "campaign_id": CAMPAIGN_ID}),
        raw({"type": "DeleteCampaign", "command_id": COMMAND_ID.upper(), "campaign_id": CAMPAIGN_ID}),
        raw({"type": "DeleteCampaign", "campaign_id": CAMPAIGN_ID}),
    ):
        with pytest.raises(ValidationError):
            parse_command_header(value)


def test_validation_detail_names_the_field_without_the_union_tag():
    detail = validation_detail(rejects(envelope("CreateCampaign", name="x", channel="sms", template={"body": ""})))
    assert detail.startswith("template.sms.body: ")


# --- templates ---------------------------------------------------------------------------------


def create(channel: str, template) -> dict:
    return envelope("CreateCampaign", name="Spring", channel=channel, template=template)


@pytest.mark.parametrize(("length", "valid"), [(0, False), (1, True), (1600, True), (1601, False)])
def test_sms_body_length(length: int, valid: bool):
    value = create("sms", {"body": "x" * length})
    if valid:
        assert parse_command(raw(value)).template.body == "x" * length
    else:
        rejects(value)


def test_sms_body_length_counts_characters_not_bytes():
    assert parse_command(raw(create("sms", {"body": "é" * 1600}))).template.body == "é" * 1600


def test_minimal_email_template_is_valid():
    command = parse_command(raw(create("email", {"subject": "s", "html": "<p>h</p>", "from_email": "a@example.com"})))
    assert command.template.attachments == [] and command.template.reply_to is None


@pytest.mark.parametrize("from_email", ["not-an-email", "a@", "@example.com", "a b@example.com", "", 5])
def test_email_with_bad_from_email_is_rejected(from_email):
    rejects(create("email", {**EMAIL_TEMPLATE, "from_email": from_email}))


@pytest.mark.parametrize("field", ["subject", "html"])
def test_email_needs_non_empty_subject_and_html(field: str):
    rejects(create("email", {**EMAIL_TEMPLATE, field: ""}))
    rejects(create("email", {k: v for k, v in EMAIL_TEMPLATE.items() if k != field}))


def test_email_with_bad_reply_to_is_rejected():
    rejects(create("email", {**EMAIL_TEMPLATE, "reply_to": "nobody"}))


def attachment(size: int, status: str = "complete", name: str = "a.pdf") -> dict:
    return {"filename": name, "content_type": "application/pdf", "size_bytes": size, "status": status}


def test_attachments_up_to_20_mb_in_all():
    half = ATTACHMENTS_MAX_BYTES // 2
    at_limit = {**EMAIL_TEMPLATE, "attachments": [attachment(half), attachment(ATTACHMENTS_MAX_BYTES - half)]}
    assert parse_command(raw(create("email", at_limit))).template.attachments_bytes == 20 * 1024 * 1024
    over = {**EMAIL_TEMPLATE, "attachments": [attachment(half), attachment(half + 1)]}
    rejects(create("email", over))
    rejects(create("email", {**EMAIL_TEMPLATE, "attachments": [attachment(21 * 1024 * 1024)]}))
    rejects(create("email", {**EMAIL_TEMPLATE, "attachments": [attachment(-1)]}))
    rejects(create("email", {**EMAIL_TEMPLATE, "attachments": [attachment("10")]}))


def test_only_complete_attachments_count_as_uploaded():
    template = EmailTemplate.model_validate_json(
        raw({**EMAIL_TEMPLATE, "attachments": [attachment(1), attachment(1, "uploading", "b.pdf")]})
    )
    assert [a.uploaded for a in template.attachments] == [True, False]
    assert template.attachments_uploaded is False


def test_create_campaign_template_must_match_its_channel():
    assert isinstance(parse_command(raw(create("email", EMAIL_TEMPLATE))).template, EmailTemplate)
    assert isinstance(parse_command(raw(create("sms", SMS_TEMPLATE))).template, SmsTemplate)
    rejects(create("sms", EMAIL_TEMPLATE))
    rejects(create("email", SMS_TEMPLATE))
    rejects(create("sms", {}))
    rejects(create("sms", "hello"))
    rejects(create("whatsapp", SMS_TEMPLATE))


def test_update_template_accepts_either_shape_and_the_handler_checks_the_channel():
    sms = parse_command(raw(envelope("UpdateTemplate", template=SMS_TEMPLATE))).template
    email = parse_command(raw(envelope("UpdateTemplate", template=EMAIL_TEMPLATE))).template
    assert template_matches_channel(sms, "sms") and not template_matches_channel(sms, "email")
    assert template_matches_channel(email, "email") and not template_matches_channel(email, "sms")
    assert not template_matches_channel(sms, "fax")


def test_command_models_are_immutable():
    command = parse_command(raw(VALID_COMMANDS["CreateCampaign"]))
    assert isinstance(command, CreateCampaign)
    with pytest.raises(ValidationError):
        command.name = "other"


# --- events ------------------------------------------------------------------------------------


def event(event_type: str, sequence: int = 10, **payload) -> dict:
    return {
        "type": event_type,
        "event_id": EVENT_ID,
        "campaign_id": CAMPAIGN_ID,
        "sequence": sequence,
        "occurred_at": "2024-05-01T12:00:01.250000Z",
        "causation_id": COMMAND_ID,
        **payload,
    }


COUNTS = {"total": 5, "waiting": 0, "queued": 1, "sending": 1, "sent": 0, "delivered": 1,
          "assumed_delivered": 0, "retrying": 0, "failed": 1, "opted_out": 1, "cancelled": 0}
SUMMARY = {
    "name": "Spring", "channel": "sms", "message_count": 3, "preview": "Hi {first_name}",
    "from_email": None, "from_name": None, "attachments": [], "encoding": "GSM-7",
    "segments": 1, "segments_total": 3, "rows_missing_variables": [4], "missing_variables_count": 1,
    "missing_variables": [{"variable": "first_name", "count": 1, "first_rows": [4]}],
}

VALID_EVENTS = {
    "CampaignCreated": event("CampaignCreated", name="Spring", description=None, channel="email",
                             template=EMAIL_TEMPLATE, created_by="alice"),
    "ContactsAdded": event("ContactsAdded", chunk_no=0, valid=3, invalid=2, invalid_rows=[
        {"row": 5, "reason": "invalid_e164"}, {"row": 6, "reason": "duplicate_destination"}]),
    "CampaignReady": event("CampaignReady", message_count=3, summary=SUMMARY),
    "TemplateUpdated": event("TemplateUpdated", template=SMS_TEMPLATE, summary=None),
    "CampaignRunStarted": event("CampaignRunStarted", run_no=1, accepted_by="alice",
                                disclaimer=VALID_COMMANDS["RunCampaign"]["disclaimer"],
                                message_count=3, suppressed_count=1),
    "CampaignStopped": event("CampaignStopped", stopped_by="bob", cancelled_count=2),
    "RetryStarted": event("RetryStarted", run_no=2, message_count=1),
    "CampaignDeleted": event("CampaignDeleted"),
    "CampaignStatusChanged": event("CampaignStatusChanged", status="in_progress", previous_status="ready",
                                   stopped=False, counts=COUNTS),
    "CommandRejected": event("CommandRejected", sequence=0, command_id=COMMAND_ID, command_type="Frobnicate",
                             reason="invalid_command", detail="unknown command type"),
    "CampaignSendingHeld": event("CampaignSendingHeld", provider="twilio", reason="10 submissions failed in a row"),
    "CampaignSendingResumed": event("CampaignSendingResumed", provider="twilio"),
    "TestMessageQueued": event("TestMessageQueued", message_id=MESSAGE_ID, destination="+15005550006",
                               requested_by="user:alice", row=2, variables={"first_name": "Ann"},
                               preview="Hi Ann, reply STOP to opt out"),
    "TestMessageCompleted": event("TestMessageCompleted", message_id=MESSAGE_ID, destination="+15005550006",
                                  requested_by="user:alice", outcome="refused", reason="invalid_destination",
                                  provider_code="21211", provider_message_id=None),
}


def test_every_event_type_has_an_example():
    assert set(VALID_EVENTS) == CAMPAIGN_EVENT_TYPES


@pytest.mark.parametrize("event_type", sorted(VALID_EVENTS))
def test_event_example_validates_and_round_trips(event_type: str):
    parsed = parse_campaign_event(raw(VALID_EVENTS[event_type]))
    assert parsed.type == event_type
    written = CAMPAIGN_EVENT_ADAPTER.dump_json(parsed)
    assert parse_campaign_event(written) == parsed
    # Every field the example gave is written back with the same value (times as RFC 3339 UTC).
    assert json.loads(written) == VALID_EVENTS[event_type] | {"occurred_at": "2024-05-01T12:00:01.250000Z"}


def test_events_ignore_unknown_fields_and_types_are_closed():
    assert parse_campaign_event(raw({**VALID_EVENTS["CampaignDeleted"], "new_field": 1})).type == "CampaignDeleted"
    with pytest.raises(ValidationError):
        parse_campaign_event(raw(event("CampaignExploded")))


def test_event_enums_are_closed():
    with pytest.raises(ValidationError):
        parse_campaign_event(raw({**VALID_EVENTS["CommandRejected"], "reason": "because"}))
    with pytest.raises(ValidationError):
        parse_campaign_event(raw({**VALID_EVENTS["CampaignStatusChanged"], "status": "running"}))
    with pytest.raises(ValidationError):
        parse_campaign_event(raw(event("ContactsAdded", chunk_no=0, valid=0, invalid=1,
                                       invalid_rows=[{"row": 1, "reason": "bad"}])))


def test_counts_cover_every_status_and_add_up():
    assert tuple(Counts.model_fields) == ("total", *MESSAGE_STATUSES)
    assert Counts.from_statuses({"queued": 2, "failed": 1}).total == 3
    assert set(Counts().model_dump()) == {"total", *MESSAGE_STATUSES}
    with pytest.raises(ValidationError):
        Counts(total=2, queued=1)


def test_run_summary_keeps_at_most_100_rows_missing_variables():
    too_many = {**SUMMARY, "rows_missing_variables": list(range(1, 102))}
    with pytest.raises(ValidationError):
        parse_campaign_event(raw(event("CampaignReady", message_count=3, summary=too_many)))


def message_status(**changes) -> dict:
    value = {
        "type": "MessageStatusChanged", "event_id": EVENT_ID, "message_id": MESSAGE_ID, "campaign_id": CAMPAIGN_ID,
        "channel": "sms", "row": 2, "run_no": 1, "status": "failed", "previous_status": "sending",
        "reason": "invalid_destination", "provider_code": "21211", "attempt": 1,
        "occurred_at": "2024-05-01T12:00:02.000000Z", "causation_id": OTHER_ID, "sequence": 3,
    }
    return value | changes


@pytest.mark.parametrize("value", [
    message_status(),
    message_status(status="waiting", previous_status=None, run_no=None, reason=None, provider_code=None,
                   attempt=None, sequence=1),
    message_status(status="sending", previous_status="sending", reason=None, provider_code="503", attempt=2),
    message_status(channel="email", status="retrying", previous_status="retrying", reason=None, provider_code="451"),
    message_status(status="waiting", previous_status=None, run_no=None, reason=None, provider_code=None,
                   attempt=None, sequence=1, destination="+15005550006", variables={"first_name": "Ann"}),
], ids=["failed", "waiting", "presend-error", "smtp-resubmission", "waiting-with-contact"])
def test_message_status_example_validates_and_round_trips(value: dict):
    parsed = parse_message_status(raw(value))
    assert parse_message_status(parsed.model_dump_json()) == parsed
    assert json.loads(parsed.model_dump_json()) == value


def test_message_status_reason_only_on_failed():
    with pytest.raises(ValidationError):
        parse_message_status(raw(message_status(reason=None)))
    with pytest.raises(ValidationError):
        parse_message_status(raw(message_status(status="delivered")))
    with pytest.raises(ValidationError):
        parse_message_status(raw(message_status(reason="lost")))


def test_message_status_requires_every_contract_field():
    for field in MessageStatusChanged.model_fields:
        if field in ("type", "destination", "variables"):  # the latter two: optional, on `waiting` records only
            continue
        value = message_status()
        del value[field]
        with pytest.raises(ValidationError):
            parse_message_status(raw(value))


def test_value_sets_are_those_of_the_contract():
    assert CAMPAIGN_STATUSES == ("created", "ready", "in_progress", "active_retries", "complete",
                                 "complete_with_errors", "failed", "deleted")
    assert set(FINAL_MESSAGE_STATUSES) <= set(MESSAGE_STATUSES)
    assert len(FAILURE_REASONS) == 10 and "setup_error" in FAILURE_REASONS
    assert len(REJECTION_REASONS) == 17 and REJECTION_REASONS[-2:] == ("test_send_limit", "channel_busy")
    assert INVALID_ROW_REASONS == ("missing_destination", "invalid_e164", "invalid_email", "duplicate_destination")


# --- internal records --------------------------------------------------------------------------

INTERNAL_EXAMPLES = [
    (ClaimRequest, {"type": "ClaimRequest", "claim_id": OTHER_ID, "campaign_id": CAMPAIGN_ID,
                    "max_messages": 200, "requested_at": "2024-05-01T12:00:00.000000Z"}),
    (WorkClaimed, {"type": "WorkClaimed", "event_id": EVENT_ID, "claim_id": OTHER_ID, "campaign_id": CAMPAIGN_ID,
                   "channel": "sms", "run_no": 1, "template_digest": template_digest(SMS_TEMPLATE),
                   "items": [{"message_id": MESSAGE_ID, "row": 2, "destination": "+15005550006",
                              "variables": {"first_name": "Ann"}, "attempt": 0}],
                   "remaining_queued": 10, "holds_channel": True}),
    (WorkClaimed, {"type": "WorkClaimed", "event_id": EVENT_ID, "claim_id": OTHER_ID, "campaign_id": CAMPAIGN_ID,
                   "channel": "email", "run_no": 2, "template_digest": template_digest(EMAIL_TEMPLATE), "items": [],
                   "remaining_queued": 0, "holds_channel": False}),
    (SenderResults, {"type": "SenderResults", "result_id": OTHER_ID, "campaign_id": CAMPAIGN_ID, "results": [
        {"message_id": MESSAGE_ID, "outcome": "presend_error", "attempt": 4, "provider_code": "503",
         "provider_message_id": None, "occurred_at": "2024-05-01T12:00:00.000000Z", "final": True},
        {"message_id": MESSAGE_ID, "outcome": "accepted", "attempt": 1, "provider_code": None,
         "provider_message_id": "SM123", "occurred_at": "2024-05-01T12:00:00.000000Z", "final": False},
    ]}),
    (Expiry, {"type": "Expiry", "expiry_id": OTHER_ID, "campaign_id": CAMPAIGN_ID, "message_id": MESSAGE_ID,
              "kind": "retry_window", "since_sequence": 4}),
    (internal.TestMessageWork, {"type": "TestMessageWork", "event_id": EVENT_ID, "command_id": COMMAND_ID,
                       "campaign_id": CAMPAIGN_ID, "channel": "sms", "template_digest": template_digest(SMS_TEMPLATE),
                       "message_id": MESSAGE_ID, "destination": "+15005550006", "variables": {"first_name": "Ann"}}),
    (internal.TestMessageResult, {"type": "TestMessageResult", "result_id": OTHER_ID, "campaign_id": CAMPAIGN_ID,
                         "command_id": COMMAND_ID, "message_id": MESSAGE_ID, "outcome": "held",
                         "provider_code": None, "provider_message_id": None,
                         "occurred_at": "2024-05-01T12:00:00.000000Z"}),
]


@pytest.mark.parametrize(("model", "value"), INTERNAL_EXAMPLES, ids=lambda p: getattr(p, "__name__", ""))
def test_internal_record_validates_and_round_trips(model, value: dict):
    parsed = model.model_validate_json(raw(value))
    assert json.loads(parsed.model_dump_json()) == value


def test_internal_records_reject_unknown_enums_and_bad_digests():
    claimed = dict(INTERNAL_EXAMPLES[1][1])
    with pytest.raises(ValidationError):
        WorkClaimed.model_validate_json(raw({**claimed, "channel": "fax"}))
    with pytest.raises(ValidationError):  # work records name a template by digest; they never carry one
        WorkClaimed.model_validate_json(raw({**claimed, "template_digest": "body"}))
    results = dict(INTERNAL_EXAMPLES[3][1])
    with pytest.raises(ValidationError):
        SenderResults.model_validate_json(raw({**results, "results": [{**results["results"][0], "outcome": "exploded"}]}))
    with pytest.raises(ValidationError):
        Expiry.model_validate_json(raw({**INTERNAL_EXAMPLES[4][1], "kind": "forever"}))


@pytest.mark.parametrize("text", [
    "2024-05-01T12:00:00Z",  # no microseconds: not fixed width, would sort wrongly
    "2024-05-01T12:00:00.000000+00:00",  # an offset, even a zero one: internal times are written in one form
    "2024-05-01 12:00:00.000000Z",
    "2024-13-01T12:00:00.000000Z",
    "2024-05-01T24:00:00.000000Z",
    "٢٠٢٤-05-01T12:00:00.000000Z",  # other scripts' digits
    "2024-05-01T12:00:00.000000Z\n",
])
def test_internal_record_times_are_the_wire_text_only(text: str):
    with pytest.raises(ValidationError, match="requested_at"):
        ClaimRequest.model_validate_json(raw({**INTERNAL_EXAMPLES[0][1], "requested_at": text}))


def test_internal_record_times_take_what_utc_now_writes():
    now = utc_now()
    request = ClaimRequest(claim_id=OTHER_ID, campaign_id=CAMPAIGN_ID, max_messages=1, requested_at=now)
    assert request.requested_at == now and json.loads(request.model_dump_json())["requested_at"] == now


def test_an_email_text_over_512_kib_of_utf8_is_invalid():
    """v1.1: counted in bytes of UTF-8, not characters, so every record carrying a template fits in 1 MiB."""
    fits = {**EMAIL_TEMPLATE, "html": "é" * (256 * 1024)}  # 262,144 characters, 524,288 bytes
    EmailTemplate.model_validate(fits)
    for field in ("html", "subject"):
        with pytest.raises(ValidationError, match=f"{field} is 524290 bytes"):
            EmailTemplate.model_validate({**fits, field: "é" * (256 * 1024 + 1)})


def test_the_template_digest_ignores_key_order():
    assert template_digest({"a": 1, "b": "é"}) == template_digest({"b": "é", "a": 1})
    assert template_digest({"body": "a"}) != template_digest({"body": "b"})


def test_a_test_message_has_a_reason_exactly_when_it_was_refused_or_failed():
    completed = VALID_EVENTS["TestMessageCompleted"]
    parse_campaign_event(raw({**completed, "outcome": "failed", "reason": "provider_held", "provider_code": None}))
    for wrong in ({"outcome": "accepted"}, {"outcome": "refused", "reason": None},
                  {"outcome": "refused", "reason": "exploded"}, {"outcome": "bounced"}):
        with pytest.raises(ValidationError):
            parse_campaign_event(raw({**completed, **wrong}))
