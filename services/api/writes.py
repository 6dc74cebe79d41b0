"""Command endpoints: each publishes to `outreach.commands`, waits (up to the app's `answer_wait_s`, by default
the contract's 5-second promise) for the command handler's answer, and answers with it:

- rejected (a `CommandRejected`): 404, 409 or 422 by its reason (`commands.REJECTION_STATUS`), with `reason`
  and `detail` in the body (CommandRefused);
- accepted: 202 with `state: answered` and the answer events;
- no answer within the wait: 202 with `state: pending`; `GET /commands/{command_id}` gives (or waits for) it.

`issued_by` is always the token's principal: request bodies have no such field (one sent is ignored).
With an `Idempotency-Key` header the ids are derived from it (services/api/idempotency.py), so a retried request
publishes the same command_id and the handler answers it with its stored answer instead of acting twice.
The handler is the judge of every domain rule (state, confirmation, disclaimer, channel busy): every command the
schema lets through goes through Kafka to it, so the audit trail keeps each rejection and the contract's order of
reasons holds (an unknown campaign is 404 whatever the disclaimer says). The API refuses (422 at once, nothing
published) only a malformed body, id or header (what the contract's schema refuses), a create without the
consent confirmation, and (contract v1.1) a CSV without a valid contact: every row is first judged with the
handler's own rules (services/common/import_check.py), so an empty or all-invalid file never makes a campaign.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, Request, UploadFile, status
from fastapi.responses import JSONResponse

from schemas.commands import Channel, make_command, new_id
from schemas.phone import supported_regions
from services.api import idempotency
from services.api.auth import CAMPAIGN_RESPONSES, CampaignUser
from services.api.commands import ANSWER_POLL_S, ISSUED_VIA, CommandPublisher, answer_state, build_command, \
    rejection_of, rejection_status, wait_for_answer
from services.api.contacts_upload import MAX_UPLOAD_BYTES, MappingError, StreamedCsv, parse_variable_mapping, \
    upload_size
from services.api.idempotency import IdempotencyKey
from services.api.models import (
    CampaignCreateAccepted,
    CommandAccepted,
    CommandAnswer,
    CommandRefused,
    ImportRefused,
    Problem,
    RetryBody,
    RunBody,
    StopBody,
    TEMPLATE_SCHEMA,
    TemplateUpdateAccepted,
    TestSendAccepted,
    TestSendBody,
    UpdateTemplateBody,
)
from services.api.reads import CampaignId
from services.api.store import Principal
from services.common import logs
from services.common.contacts_csv import CsvError, add_contacts_envelope_bytes
from services.common.import_check import ImportCheck, import_region
from services.common.ids import UUID_PATTERN

log = logging.getLogger("outreach.api.writes")

# The regions phonenumbers knows, as the contract's AddContacts.default_region takes them (upper case).
Region = Literal[tuple(sorted(supported_regions()))]  # type: ignore[valid-type]
VARIABLES_SCHEMA = {"oneOf": [{"type": "object", "additionalProperties": {"type": "string"}},
                              {"type": "array", "items": {"type": "string"}}]}

UPLOAD_FORM_OVERHEAD_BYTES = 1024 * 1024  # the template and the other form fields beside the CSV
router = APIRouter(tags=["commands"], responses=CAMPAIGN_RESPONSES)

MAX_WAIT_S = 60.0
DEFAULT_ANSWER_WAIT_S = 5.0  # the contract: a command is answered within 5 seconds in steady state

_ANSWERED_LATER = ("the command handler's answer is at `GET /commands/{command_id}`")
ACCEPTED = {
    202: {"description": "Published to outreach.commands, acknowledged by the broker, and accepted by the command "
                         "handler within the wait (`state: answered`, with its answer events), or not answered yet "
                         f"(`state: pending`: {_ANSWERED_LATER})."},
    404: {"model": CommandRefused, "description": "Rejected by the command handler: unknown_campaign."},
    409: {"model": CommandRefused, "description": "Rejected by the command handler because of the campaign's state: "
                                                  "campaign_exists, campaign_not_ready, campaign_not_running, "
                                                  "not_editable, not_deletable, not_retryable, contacts_closed, "
                                                  "too_many_contacts, channel_busy."},
    422: {"model": CommandRefused | Problem,
          "description": "Refused at once, nothing published: a malformed body (not UTF-8, not JSON, not the "
                         "schema), id or Idempotency-Key (Problem). Or rejected by the command handler "
                         "(CommandRefused): invalid_command, disclaimer_not_accepted, stop_not_confirmed, "
                         "no_valid_contacts, attachments_not_ready, nothing_to_retry."},
    413: {"model": Problem, "description": "The body is over the size limit (1 MiB; a CSV upload 50 MB)."},
    503: {"model": Problem,
          "description": "The broker did not acknowledge the command (it may or may not have been "
                         "published). Send the request again with the same Idempotency-Key: it publishes "
                         "the same command_id, which the handler acts on at most once. Without the header "
                         "the request makes a new command, judged on the campaign's state then."}}


def _publisher(request: Request) -> CommandPublisher:
    return request.app.state.publisher


async def _answer(request: Request, command_id: str, deadline: float) -> list[dict[str, Any]]:
    """The command's answer events, waited for until the monotonic `deadline`; none (pending) if the read model
    cannot be read: the command is published whatever happens here, so the request must not fail now."""
    try:
        return await wait_for_answer(request.app.state.read_model.answers, command_id, 0, deadline=deadline,
                                     poll_s=ANSWER_POLL_S)
    except Exception as exc:
        with logs.context(command_id=command_id):
            log.warning("cannot read the answer of %s: %s", command_id, exc)
        return []


def _refused(accepted: dict[str, Any], events: list[dict[str, Any]], rejected: dict[str, Any]) -> JSONResponse:
    status_code, body = _refusal(accepted, events, rejected)
    return JSONResponse(body, status_code=status_code)


def _refusal(accepted: dict[str, Any], events: list[dict[str, Any]], rejected: dict[str, Any]) -> tuple[int, dict]:
    """The HTTP status and body (CommandRefused) of a command the handler rejected."""
    reason = rejected.get("reason", "invalid_command")
    body = {"detail": rejected.get("detail") or reason, "reason": reason,
            "command_id": rejected.get("command_id", accepted["command_id"]), "campaign_id": accepted["campaign_id"],
            "command_type": rejected.get("command_type", accepted["command_type"]), "state": "rejected",
            "events": events}
    return rejection_status(reason), body


async def _publish_one(request: Request, principal: Principal, command_type: str, campaign_id: str,
                       idempotency_key: str | None, **payload: Any) -> dict[str, Any] | JSONResponse:
    command = build_command(command_type, campaign_id, principal.name, **payload,
                            command_id=idempotency.command_id(principal.name, command_type, campaign_id,
                                                              idempotency_key))
    await _publisher(request).publish([command])
    accepted = {"command_id": command["command_id"], "campaign_id": campaign_id, "command_type": command_type}
    events = await _answer(request, command["command_id"], time.monotonic() + request.app.state.answer_wait_s)
    rejected = rejection_of(events)
    if rejected is not None:
        return _refused(accepted, events, rejected)
    return {**accepted, "state": answer_state(events), "events": events}


def _unprocessable(detail: Any) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


# ------------------------------------------------------------------ create from a CSV upload

CREATE_RESPONSES = {
    **ACCEPTED,
    422: {"model": CommandRefused | ImportRefused | Problem,
          "description": ACCEPTED[422]["description"] + " Or (ImportRefused, nothing published) a CSV without a "
                                                        "valid contact: empty, or every row invalid."},
}


@router.post(
    "/campaigns", status_code=status.HTTP_202_ACCEPTED, response_model=CampaignCreateAccepted,
    max_body_size=MAX_UPLOAD_BYTES + UPLOAD_FORM_OVERHEAD_BYTES,
    summary="Create a campaign from a CSV upload",
    description="Publishes CreateCampaign, then the contacts as AddContacts chunks of at most 1,000 (row = the "
                "physical line number in the CSV; the header, when present, is line 1). CSV rules: UTF-8, comma-"
                "separated, header optional, at most 50 MB and 300,000 contacts; a cell's leading apostrophe "
                "before = + - @ (the export's formula guard) is dropped and a CSV exported by the API imports "
                "unchanged. Before publishing, every row is judged with the command handler's rules (the "
                "default region's normalisation included): a CSV without a valid contact is refused (422 "
                "`no_valid_contacts`, nothing published); `check` reports the valid and invalid rows and the "
                "template's missing variables. The campaign becomes Ready when "
                "the last chunk is answered (CampaignReady). The answer waits for the CreateCampaign's and the last "
                "chunk's answers: 202 `answered` (the campaign is Ready), or 202 `pending` (wait on the last of "
                "`contacts_command_ids` at `GET /commands/{command_id}`), or the rejection of the create or of the "
                "first chunk rejected.",
    responses=CREATE_RESPONSES,
)
async def create_campaign(
    request: Request, principal: CampaignUser,
    contacts: Annotated[UploadFile, File(description="The contacts CSV: UTF-8, comma-separated, header optional, at "
                                                     "most 50 MB and 300,000 contacts.")],
    name: Annotated[str, Form(min_length=1, description="Campaign name.")],
    channel: Annotated[Channel, Form(description="Fixed at creation.")],
    template: Annotated[str, Form(
        min_length=1, json_schema_extra={"contentMediaType": "application/json", "contentSchema": TEMPLATE_SCHEMA},
        description='JSON: SMS {"body": ...}; email {"subject", "html", "from_email", "from_name", "reply_to"?, '
                    '"attachments": [...]}; the one of the channel.')],
    consent_confirmed: Annotated[bool, Form(json_schema_extra={"const": True},
                                            description="Must be true: the contacts consented to be contacted.")],
    # Optional, not nullable: a form field has no null (an empty one counts as left out).
    description: Annotated[str, Form(description="Free text.")] = None,
    destination_column: Annotated[str, Form(description="Header name or 1-based number of the destination "
                                                               "column; it must be one of the CSV's (default: found "
                                                               "as the CLI does).")] = None,
    variables: Annotated[str, Form(
        json_schema_extra={"contentMediaType": "application/json", "contentSchema": VARIABLES_SCHEMA},
        description="JSON: {column: variable name} or [column, ...] naming columns of the CSV (besides the "
                    "destination): only these columns become template variables, under distinct non-blank names "
                    "(default: every other column, named by its header).")] = None,
    default_region: Annotated[Region, Form(
        description="ISO 3166-1 alpha-2 region (e.g. US) that SMS destinations are read with: national and "
                    "formatted numbers become E.164 with phonenumbers (default: OUTREACH_DEFAULT_REGION; without "
                    "either, a destination must be E.164 as given). Sent in every AddContacts, so the command "
                    "handler reads them with it too.")] = None,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    if not consent_confirmed:
        raise _unprocessable("consent_confirmed must be true: confirm the contacts consented to be contacted")
    try:
        template_value = json.loads(template)
    except json.JSONDecodeError as exc:
        raise _unprocessable(f"template is not JSON: {exc}") from None
    try:
        mapping = parse_variable_mapping(json.loads(variables) if variables else None)
    except json.JSONDecodeError as exc:
        raise _unprocessable(f"variables is not JSON: {exc}") from None
    except MappingError as exc:
        raise _unprocessable(str(exc)) from None
    try:
        region = import_region(default_region, request.app.state.settings.default_region)
    except ValueError as exc:
        raise _unprocessable(f"default_region: {exc}") from None
    if upload_size(contacts.file) > MAX_UPLOAD_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the CSV is over {MAX_UPLOAD_BYTES} bytes")
    # With a key, the campaign and every chunk get ids derived from it: the same upload sent again publishes
    # the same CreateCampaign and AddContacts, and the handler repeats its stored answers (not campaign_exists).
    if idempotency_key is None:
        campaign_id = new_id()
    else:
        campaign_id = idempotency.created_campaign_id(principal.name, idempotency_key)
    payload: dict[str, Any] = {"name": name, "channel": channel, "template": template_value}
    if description is not None:
        payload["description"] = description
    create = build_command("CreateCampaign", campaign_id, principal.name, **payload,
                           command_id=idempotency.command_id(principal.name, "CreateCampaign", campaign_id,
                                                             idempotency_key))

    envelope = add_contacts_envelope_bytes(campaign_id, principal.name, region, ISSUED_VIA)
    upload = StreamedCsv(contacts.file, destination_column, mapping)
    check = ImportCheck(channel, template_value, region)  # the handler's rules, on every row
    try:
        # every line read (and judged) before anything is published
        layout = await asyncio.to_thread(upload.inspect, envelope, check)
    except (CsvError, MappingError) as exc:
        raise _unprocessable(f"cannot import the CSV: {exc}") from None
    if (refusal := check.refusal("the form field default_region")) is not None:
        return JSONResponse({"detail": f"cannot import the CSV: {refusal}", "reason": "no_valid_contacts",
                             "check": check.as_dict()}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
    region_field = {} if region is None else {"default_region": region}
    publisher = _publisher(request)
    await publisher.publish([create])
    chunk_ids = []
    chunks = upload.chunks(envelope)
    try:
        for chunk_no in range(layout.chunks):
            chunk = await asyncio.to_thread(next, chunks, None)  # one chunk in memory at a time
            command_id = None if idempotency_key is None else idempotency.contacts_command_id(
                principal.name, campaign_id, idempotency_key, chunk_no)
            command = make_command("AddContacts", campaign_id, principal.name, command_id=command_id,
                                   issued_via=ISSUED_VIA,
                                   chunk_no=chunk_no, contacts=chunk or [], last_chunk=chunk_no == layout.chunks - 1,
                                   **region_field)
            await publisher.publish([command])
            chunk_ids.append(command["command_id"])
    finally:
        chunks.close()
    accepted = {"command_id": create["command_id"], "campaign_id": campaign_id, "command_type": "CreateCampaign",
                "contacts": layout.contacts, "has_header": layout.has_header,
                "destination_column": layout.destination_column, "variables": layout.variables,
                "contacts_command_ids": chunk_ids, "check": check.as_dict(),
                "missing_variables": check.missing_variables}
    # The handler answers them in order (one key, one partition): the create, then each chunk; the last chunk's
    # answer comes last. One wait for both.
    deadline = time.monotonic() + request.app.state.answer_wait_s
    events = await _answer(request, create["command_id"], deadline)
    if (rejected := rejection_of(events)) is not None:
        return _refused(accepted, events, rejected)
    contacts_events = await _answer(request, chunk_ids[-1], deadline) if events else []
    if rejection_of(contacts_events) is not None:  # report the first chunk rejected (the others follow from it)
        for chunk_id in chunk_ids:
            chunk_events = await _answer(request, chunk_id, time.monotonic())
            if (rejected := rejection_of(chunk_events)) is not None:
                return _refused(accepted, chunk_events, rejected)
    state = "answered" if events and contacts_events else "pending"
    return {**accepted, "state": state, "events": events, "contacts_events": contacts_events}


# ------------------------------------------------------------------ the other commands

@router.put("/campaigns/{campaign_id}/template", status_code=status.HTTP_202_ACCEPTED,
            response_model=TemplateUpdateAccepted, responses=ACCEPTED, summary="Update the template (created or ready)",
            description="Once the contacts are imported, the answer names the new template's placeholders that some "
                        "contacts have no value for, with their rows (`missing_variables`, from the handler's run "
                        "summary): those messages would show the placeholder literally.")
async def update_template(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                          body: UpdateTemplateBody, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    answer = await _publish_one(request, principal, "UpdateTemplate", campaign_id, idempotency_key,
                                template=body.template.model_dump(mode="json"))
    if isinstance(answer, dict):
        updated = next((e for e in answer["events"] if e.get("type") == "TemplateUpdated"), None)
        summary = (updated or {}).get("summary")
        answer["missing_variables"] = summary.get("missing_variables", []) if isinstance(summary, dict) else None
    return answer


@router.post("/campaigns/{campaign_id}/run", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted,
             responses=ACCEPTED, summary="Run the campaign, with the run disclaimer",
             description="Show the run summary first (`GET /campaigns/{id}`: `summary`). The disclaimer must be "
                         "accepted on every run (all four flags true), else the handler answers "
                         "CommandRejected(disclaimer_not_accepted) (422) and nothing is queued or sent; an unknown "
                         "campaign (404) or its state (409) comes first.")
async def run_campaign(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                       body: RunBody, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    return await _publish_one(request, principal, "RunCampaign", campaign_id, idempotency_key,
                              disclaimer=body.disclaimer.model_dump(mode="json"))


@router.post("/campaigns/{campaign_id}/stop", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted,
             responses=ACCEPTED, summary="Stop a running campaign (confirmed: true)",
             description="Queued messages are cancelled; messages in flight carry on. With `confirmed: false` "
                         "the handler answers CommandRejected(stop_not_confirmed) (422), after an unknown campaign "
                         "(404) or a campaign that is not running (409).")
async def stop_campaign(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                        body: StopBody, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    return await _publish_one(request, principal, "StopCampaign", campaign_id, idempotency_key,
                              confirmed=body.confirmed)


@router.post("/campaigns/{campaign_id}/retry", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted,
             responses=ACCEPTED, summary="Retry failed messages (all but timed-out ones, or those named)")
async def retry_campaign(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                         body: RetryBody | None = None, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    body = body or RetryBody()
    payload: dict[str, Any] = {"include_cancelled": body.include_cancelled}
    if body.message_ids:
        payload["message_ids"] = list(body.message_ids)
    return await _publish_one(request, principal, "RetryFailedMessages", campaign_id, idempotency_key, **payload)


@router.delete("/campaigns/{campaign_id}", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted,
               responses=ACCEPTED, summary="Delete a campaign that is not running")
async def delete_campaign(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                          idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    return await _publish_one(request, principal, "DeleteCampaign", campaign_id, idempotency_key)


# ------------------------------------------------------------------ test messages

TEST_SEND_RESPONSES = {
    **{code: answer for code, answer in ACCEPTED.items() if code != 409},  # any status but deleted takes one
    202: {"description": "Published to outreach.commands, acknowledged by the broker, and accepted by the command "
                         "handler within the wait (`state: answered`): `test_message` says where it goes and, once the "
                         "sender answered (within the same wait), its `outcome`; an opted-out destination is answered "
                         "at once (outcome opted_out, nothing sent). Or not answered yet (`state: pending`: "
                         f"{_ANSWERED_LATER}, the outcome too)."},
    404: {"model": CommandRefused, "description": "Rejected by the command handler: unknown_campaign (a deleted "
                                                  "campaign too)."},
    422: {"model": CommandRefused | Problem,
          "description": "Refused at once, nothing published: a malformed body, id or Idempotency-Key (Problem). Or "
                         "rejected by the command handler (CommandRefused): invalid_command (a destination invalid for "
                         "the campaign's channel, a row that is no valid contact of the campaign)."},
    429: {"model": CommandRefused, "description": "Rejected by the command handler: test_send_limit (5 test messages "
                                                  "per user per hour, over every campaign; `detail` says when the next "
                                                  "one may go)."},
}


@router.post(
    "/campaigns/{campaign_id}/test-send", status_code=status.HTTP_202_ACCEPTED, response_model=TestSendAccepted,
    responses=TEST_SEND_RESPONSES, summary="Send a test message: the rendered message to one destination",
    description="Publishes SendTestMessage (our addition to the contract): the campaign's message, rendered with the "
                "first valid contact's variables (or `row`'s), `variables` over them, goes to `destination` through "
                "the real provider path: the channel's adapter, its rate limit and circuit breaker, and the hand-off "
                "fence, so it is sent at most once; it is never retried. Any campaign status but deleted, whatever "
                "campaign holds the channel. It is no message of the campaign: its counts, statuses and history of "
                "messages do not change, and nothing is published on outreach.message-status (analytics do not "
                "count it); its answer is on outreach.campaign-events (TestMessageQueued, TestMessageCompleted). "
                "An opted-out destination is answered opted_out and not sent. At most 5 per user (the token's "
                "principal, a console user's `user:NAME`) per hour over every campaign: the next one is rejected "
                "test_send_limit (429).")
async def send_test_message_route(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                                  body: TestSendBody, idempotency_key: IdempotencyKey = None) -> Any:
    status_code, answer = await send_test_message(request, principal, campaign_id, body.destination, row=body.row,
                                                  variables=body.variables, idempotency_key=idempotency_key)
    return answer if status_code == status.HTTP_202_ACCEPTED else JSONResponse(answer, status_code=status_code)


async def send_test_message(request: Request, principal: Principal, campaign_id: str, destination: str, *,
                            row: int | None = None, variables: dict[str, str] | None = None,
                            idempotency_key: str | None = None) -> tuple[int, dict[str, Any]]:
    """Publish a SendTestMessage as `principal` and wait (the app's answer wait) for its answer and then for the
    sender's outcome: (202, TestSendAccepted) or (the rejection's status, CommandRefused). The console's test
    send form uses it too, so its commands are the API's. Raises InvalidCommand and BrokerUnavailable as
    build_command and the publisher do."""
    payload: dict[str, Any] = {"destination": destination}
    if row is not None:
        payload["row"] = row
    if variables:
        payload["variables"] = dict(variables)
    command = build_command("SendTestMessage", campaign_id, principal.name, **payload,
                            command_id=idempotency.command_id(principal.name, "SendTestMessage", campaign_id,
                                                              idempotency_key))
    await _publisher(request).publish([command])
    command_id = command["command_id"]
    accepted = {"command_id": command_id, "campaign_id": campaign_id, "command_type": "SendTestMessage"}
    deadline = time.monotonic() + request.app.state.answer_wait_s
    events = await _answer(request, command_id, deadline)
    if (rejected := rejection_of(events)) is not None:
        return _refusal(accepted, events, rejected)
    while events and view_of_test_message(events)["outcome"] is None and time.monotonic() < deadline:
        await asyncio.sleep(ANSWER_POLL_S)  # the sender's outcome answers the same command
        events = await _answer(request, command_id, time.monotonic())
    view = view_of_test_message(events) if events else None
    return status.HTTP_202_ACCEPTED, {**accepted, "state": answer_state(events), "events": events,
                                      "test_message": view}


def view_of_test_message(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A test message as its answer events tell it (TestMessageView): where it goes, and its latest outcome."""
    queued = next((e for e in events if e.get("type") == "TestMessageQueued"), None)
    completed = [e for e in events if e.get("type") == "TestMessageCompleted"]
    latest = completed[-1] if completed else None
    first = queued or latest
    if first is None:
        return None
    return {"message_id": first.get("message_id"), "destination": first.get("destination"),
            "preview": queued.get("preview") if queued else None,
            "outcome": latest.get("outcome") if latest else None, "reason": latest.get("reason") if latest else None,
            "provider_code": latest.get("provider_code") if latest else None,
            "provider_message_id": latest.get("provider_message_id") if latest else None}


# ------------------------------------------------------------------ answers

@router.get("/commands/{command_id}", response_model=CommandAnswer,
            responses={202: {"model": CommandAnswer, "description": "No answer yet (state: pending)."}},
            summary="A command's answer events (optionally waiting for them)",
            description="`state` is answered or rejected (a CommandRejected is among the events) with 200, or "
                        "pending with 202. With `wait`, waits up to that many seconds for the first answer event, "
                        "then briefly for trailing ones (the status change that follows a run, say). Answers are "
                        "read from the read model, so the projections must be running.")
async def command_answer(
    request: Request, _: CampaignUser,
    command_id: Annotated[str, Path(pattern=UUID_PATTERN)],
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait for the answer.")] = 0,
):
    events = await wait_for_answer(request.app.state.read_model.answers, command_id, wait)
    state = answer_state(events)
    body = {"command_id": command_id, "state": state, "events": events}
    if state == "pending":
        return JSONResponse(body, status_code=status.HTTP_202_ACCEPTED)
    return body
