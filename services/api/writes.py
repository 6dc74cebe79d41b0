"""Command endpoints: each publishes to `outreach.commands` and answers 202 with the command_id once the broker
acknowledged it; `GET /commands/{command_id}` gives (or waits for) the answer.

`issued_by` is always the token's principal: request bodies have no such field (one sent is ignored).
With an `Idempotency-Key` header the ids are derived from it (services/api/idempotency.py), so a retried request
publishes the same command_id and the handler answers it with its stored answer instead of acting twice.
The handler is the judge of every domain rule (state, confirmation, disclaimer, channel busy): its answer,
accepted or `CommandRejected`, is what `GET /commands/{command_id}` returns. The API refuses (422, nothing
published) only what the contract's schema refuses, and a create without the consent confirmation.
"""
from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, Request, UploadFile, status
from fastapi.responses import JSONResponse

from schemas.commands import Channel, make_command, new_id
from services.api import idempotency
from services.api.auth import CAMPAIGN_RESPONSES, CampaignUser
from services.api.commands import CommandPublisher, answer_state, build_command, wait_for_answer
from services.api.contacts_upload import MAX_UPLOAD_BYTES, MappingError, StreamedCsv, parse_variable_mapping, \
    upload_size
from services.api.idempotency import IdempotencyKey
from services.api.models import (
    CampaignCreateAccepted,
    CommandAccepted,
    CommandAnswer,
    RetryBody,
    RunBody,
    StopBody,
    UpdateTemplateBody,
)
from services.api.reads import CampaignId
from services.api.store import Principal
from services.common.contacts_csv import CsvError, add_contacts_envelope_bytes
from services.common.ids import UUID_PATTERN

UPLOAD_FORM_OVERHEAD_BYTES = 1024 * 1024  # the template and the other form fields beside the CSV
router = APIRouter(tags=["commands"], responses=CAMPAIGN_RESPONSES)

MAX_WAIT_S = 60.0
ACCEPTED = {202: {"description": "Published to outreach.commands and acknowledged by the broker."},
            422: {"description": "Refused by the contract's schema, or an invalid Idempotency-Key: nothing "
                                 "published."},
            503: {"description": "The broker did not acknowledge the command (it may or may not have been "
                                 "published). Send the request again with the same Idempotency-Key: it publishes "
                                 "the same command_id, which the handler acts on at most once. Without the header "
                                 "the request makes a new command, judged on the campaign's state then."}}


def _publisher(request: Request) -> CommandPublisher:
    return request.app.state.publisher


async def _publish_one(request: Request, principal: Principal, command_type: str, campaign_id: str,
                       idempotency_key: str | None, **payload: Any) -> dict[str, Any]:
    command = build_command(command_type, campaign_id, principal.name, **payload,
                            command_id=idempotency.command_id(principal.name, command_type, campaign_id,
                                                              idempotency_key))
    await _publisher(request).publish([command])
    return {"command_id": command["command_id"], "campaign_id": campaign_id, "command_type": command_type}


def _unprocessable(detail: Any) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


# ------------------------------------------------------------------ create from a CSV upload

@router.post(
    "/campaigns", status_code=status.HTTP_202_ACCEPTED, response_model=CampaignCreateAccepted,
    max_body_size=MAX_UPLOAD_BYTES + UPLOAD_FORM_OVERHEAD_BYTES,
    summary="Create a campaign from a CSV upload",
    description="Publishes CreateCampaign, then the contacts as AddContacts chunks of at most 1,000 (row = the "
                "physical line number in the CSV; the header, when present, is line 1). CSV rules: UTF-8, comma-"
                "separated, header optional, at most 50 MB and 300,000 contacts. The campaign becomes Ready when "
                "the last chunk is answered (CampaignReady): wait on the last of `contacts_command_ids`.",
    responses={**ACCEPTED, 413: {"description": "The CSV is over 50 MB."}},
)
async def create_campaign(
    request: Request, principal: CampaignUser,
    contacts: Annotated[UploadFile, File(description="The contacts CSV.")],
    name: Annotated[str, Form(min_length=1, description="Campaign name.")],
    channel: Annotated[Channel, Form(description="Fixed at creation.")],
    template: Annotated[str, Form(description='JSON: SMS {"body": ...}; email {"subject", "html", "from_email", '
                                              '"from_name", "reply_to"?, "attachments": [...]}.')],
    consent_confirmed: Annotated[bool, Form(description="Required true: the contacts consented to be contacted.")],
    description: Annotated[str | None, Form(description="Free text.")] = None,
    destination_column: Annotated[str | None, Form(description="Header name or 1-based number of the destination "
                                                               "column (default: found as the CLI does).")] = None,
    variables: Annotated[str | None, Form(description="JSON: {column: variable name} or [column, ...]: only these "
                                                      "columns become template variables (default: every other "
                                                      "column, named by its header).")] = None,
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

    envelope = add_contacts_envelope_bytes(campaign_id, principal.name)
    upload = StreamedCsv(contacts.file, destination_column, mapping)
    try:
        layout = await asyncio.to_thread(upload.inspect, envelope)  # every line read before anything is published
    except (CsvError, MappingError) as exc:
        raise _unprocessable(f"cannot import the CSV: {exc}") from None
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
                                   chunk_no=chunk_no, contacts=chunk or [], last_chunk=chunk_no == layout.chunks - 1)
            await publisher.publish([command])
            chunk_ids.append(command["command_id"])
    finally:
        chunks.close()
    return {"command_id": create["command_id"], "campaign_id": campaign_id, "command_type": "CreateCampaign",
            "contacts": layout.contacts, "has_header": layout.has_header,
            "destination_column": layout.destination_column, "variables": layout.variables,
            "contacts_command_ids": chunk_ids}


# ------------------------------------------------------------------ the other commands

@router.put("/campaigns/{campaign_id}/template", status_code=status.HTTP_202_ACCEPTED,
            response_model=CommandAccepted, responses=ACCEPTED, summary="Update the template (created or ready)")
async def update_template(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                          body: UpdateTemplateBody, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    return await _publish_one(request, principal, "UpdateTemplate", campaign_id, idempotency_key,
                              template=body.template.model_dump(mode="json"))


@router.post("/campaigns/{campaign_id}/run", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted,
             responses=ACCEPTED, summary="Run the campaign, with the run disclaimer",
             description="Show the run summary first (`GET /campaigns/{id}`: `summary`). The disclaimer must be "
                         "accepted on every run (all four flags true), else the handler answers "
                         "CommandRejected(disclaimer_not_accepted) and nothing is queued or sent.")
async def run_campaign(request: Request, principal: CampaignUser, campaign_id: CampaignId,
                       body: RunBody, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    return await _publish_one(request, principal, "RunCampaign", campaign_id, idempotency_key,
                              disclaimer=body.disclaimer.model_dump(mode="json"))


@router.post("/campaigns/{campaign_id}/stop", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted,
             responses=ACCEPTED, summary="Stop a running campaign (confirmed: true)",
             description="Queued messages are cancelled; messages in flight carry on. Without `confirmed: true` "
                         "the handler answers CommandRejected(stop_not_confirmed).")
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
