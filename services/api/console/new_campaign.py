"""New campaign: CSV upload with column mapping, the import report, the template editor (variables,
SMS encoding and segments, live preview); Edit of a Ready campaign's template.

    GET|POST /console/campaigns/new                       1. name, description, channel, default region, the CSV
    GET|POST /console/campaigns/new/UPLOAD/columns        2. a select per column: Destination, variable, not imported
    GET|POST /console/campaigns/new/UPLOAD/template       3. the check's report, the editor; Create campaign
    GET      /console/campaigns/new/UPLOAD/invalid-rows.csv   the rows the check found invalid
    POST     /console/campaigns/new/UPLOAD/cancel         the upload deleted
    GET      /console/campaigns/ID/import-report          the handler's answer: counts, reasons, invalid rows
    GET      /console/campaigns/ID/invalid-rows.csv       those rows with their cells
    GET|POST /console/campaigns/ID/edit                   a Ready campaign's template and sender, same editor

The upload waits between the steps in the API's data folder (upload_store.py), known to the browser by a random
id only. Step 2 reads the whole file once with the command handler's rules (csv_mapping.check_import), so step 3
shows the import's valid and invalid rows before anything is published, and the editor knows which variables
each contact has: a placeholder that would stay literal in some messages is flagged, and Create campaign asks
for an explicit "create anyway". Create campaign is the API's `POST /campaigns` itself (writes.create_campaign,
as the signed-in `user:NAME`, with an Idempotency-Key of the upload: a second click publishes the same
commands); Save template is its `PUT /campaigns/ID/template`. The handler's ContactsAdded answers make the
import report.
"""
from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from schemas.events import INVALID_ROW_REASONS
from schemas.ids import is_wire_uuid
from services.api import export, writes
from services.api.commands import BrokerUnavailable, InvalidCommand
from services.api.console import policy
from services.api.console.csv_mapping import (DESTINATION, ROLES, VARIABLE, ColumnMapping, CsvSample,
                                              ImportPreview, MappingProblems, VariableProfile, check_import,
                                              import_report, joined_invalid_rows, read_mapping, resolve, sample_csv)
from services.api.console.routes import PREFIX, ConsoleRefused, ConsoleSession, SignedIn, console_router, page
from services.api.console.template_form import (ATTACHMENT_FIELDS, ATTACHMENT_STATUSES, TemplateForm,
                                                attachment_rows, form_of_template, preview_html, read_template_form,
                                                sms_rules)
from services.api.console.upload_store import Upload, UploadStore
from services.api.contacts_upload import MAX_CONTACTS, MAX_UPLOAD_BYTES
from services.api.models import UpdateTemplateBody
from services.common.contacts_csv import CsvError, unneutralise
from services.common.import_check import import_region

router = console_router()

CHANNELS = {"sms": "SMS", "email": "Email"}
NAME_MAX = 200
REASON_WORDS = {
    "missing_destination": "No destination: the cell is empty",
    "invalid_e164": "Not a phone number in E.164 form (+, country code, up to 15 digits)",
    "invalid_email": "Not a valid email address",
    "duplicate_destination": "Duplicate: the same destination is on an earlier row",
}
assert set(REASON_WORDS) == set(INVALID_ROW_REASONS)
REJECTION_WORDS = {
    "not_editable": "The campaign is no longer Ready (it was run or deleted meanwhile): its template cannot change.",
    "unknown_campaign": "The campaign does not exist (any more).",
}
REPORT_ROWS = 100  # invalid rows listed on the report page (the download has them all)


def _see_other(path: str) -> RedirectResponse:
    return RedirectResponse(PREFIX + path, status_code=303, headers={"Cache-Control": "no-store"})


def _uploads(request: Request) -> UploadStore:
    return UploadStore(request.app.state.settings.data_dir)


def _may_create(session: ConsoleSession) -> None:
    if not policy.may_see(session.info.role, "campaigns"):
        raise ConsoleRefused(403, "Your role has no access to campaigns.")


def _upload(request: Request, session: ConsoleSession, upload_id: str) -> Upload:
    _may_create(session)
    upload = _uploads(request).get(upload_id, session.info.username)
    if upload is None:
        raise ConsoleRefused(404, "This upload is unknown or was deleted (it is kept a day): start again from "
                                  "New campaign.")
    return upload


def _sample(upload: Upload) -> CsvSample:
    with open(upload.contacts_path, "rb") as file:
        return sample_csv(file)


# ------------------------------------------------------------------ 1. details and the file

def _details_page(request: Request, status_code: int = 200, form: dict[str, str] | None = None,
                  problems: list[str] | None = None) -> HTMLResponse:
    return page(request, "new_campaign.html", status_code, form=form or {"channel": "sms"}, problems=problems or [],
                channels=CHANNELS, max_bytes=MAX_UPLOAD_BYTES, max_contacts=MAX_CONTACTS,
                default_region=request.app.state.settings.default_region)


@router.get("/campaigns/new")
async def new_campaign(request: Request, session: SignedIn) -> Response:
    _may_create(session)
    return _details_page(request)


@router.post("/campaigns/new", max_body_size=MAX_UPLOAD_BYTES + writes.UPLOAD_FORM_OVERHEAD_BYTES)
async def upload_contacts(request: Request, session: SignedIn) -> Response:
    _may_create(session)
    form = await request.form()
    fields = {name: str(form.get(name) or "").strip() for name in ("name", "description", "channel", "default_region")}
    contacts = form.get("contacts")
    problems = []
    if not fields["name"]:
        problems.append("Give the campaign a name.")
    elif len(fields["name"]) > NAME_MAX:
        problems.append(f"The name is longer than {NAME_MAX} characters.")
    if fields["channel"] not in CHANNELS:
        problems.append("Choose the channel: SMS or Email.")
    region = None
    try:
        region = import_region(fields["default_region"] or None, request.app.state.settings.default_region)
    except ValueError as exc:
        problems.append(f"Default region: {exc}.")
    if not isinstance(contacts, UploadFile) or not contacts.filename:
        problems.append("Choose the contacts CSV file.")
    if problems:
        return _details_page(request, 422, fields, problems)
    meta = {"name": fields["name"], "description": fields["description"], "channel": fields["channel"],
            "default_region": region, "filename": contacts.filename}
    store = _uploads(request)
    upload = await asyncio.to_thread(store.create, session.info.username, contacts.file, meta, MAX_UPLOAD_BYTES)
    if upload is None:
        return _details_page(request, 413, fields, [f"The file is over {MAX_UPLOAD_BYTES // (1024 * 1024)} MB, the "
                                                    "most a campaign's contacts may be."])
    try:
        await asyncio.to_thread(_sample, upload)
    except CsvError as exc:
        store.discard(upload)
        return _details_page(request, 422, fields, [f"The file cannot be read as a CSV: {exc}."])
    return _see_other(f"/campaigns/new/{upload.upload_id}/columns")


# ------------------------------------------------------------------ 2. columns

def _column_rows(sample: CsvSample, chosen: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each column with its current choice: the form's as sent, the saved mapping, or the proposal."""
    rows = []
    for column in sample.columns():
        role, variable = column.role, column.variable
        if chosen is not None:
            role = str(chosen.get(f"role_{column.index}") or role)
            variable = str(chosen.get(f"variable_{column.index}", variable))
        values = [cells[column.index] for _, cells in sample.preview(3) if cells[column.index]]
        rows.append({"column": column, "role": role, "variable": variable, "values": values})
    return rows


def _saved_choices(upload: Upload) -> dict[str, Any] | None:
    saved = upload.meta.get("mapping")
    if saved is None:
        return None
    mapping = ColumnMapping.from_json(saved)
    choices: dict[str, Any] = {}
    for index in range(int(upload.meta.get("width", 0)) or 0):
        choices[f"role_{index}"] = "skip"
    choices[f"role_{mapping.destination_index}"] = DESTINATION
    for index, name in mapping.variables.items():
        choices[f"role_{index}"], choices[f"variable_{index}"] = VARIABLE, name
    return choices


def _columns_page(request: Request, upload: Upload, sample: CsvSample, chosen: dict[str, Any] | None,
                  status_code: int = 200, problems: list[str] | None = None,
                  reasons: dict[str, Any] | None = None) -> HTMLResponse:
    return page(request, "new_campaign_columns.html", status_code, upload=upload, meta=upload.meta, sample=sample,
                rows=_column_rows(sample, chosen), roles=ROLES, preview_rows=sample.preview(),
                problems=problems or [], reasons=reasons, reason_words=REASON_WORDS, channels=CHANNELS)


@router.get("/campaigns/new/{upload_id}/columns")
async def columns_form(request: Request, session: SignedIn, upload_id: str) -> Response:
    upload = _upload(request, session, upload_id)
    sample = await asyncio.to_thread(_sample, upload)
    return _columns_page(request, upload, sample, _saved_choices(upload))


def _check(upload: Upload, sample: CsvSample, mapping: ColumnMapping) -> ImportPreview:
    resolved = resolve(sample, mapping)
    partial = upload.invalid_rows_path.with_suffix(".partial")
    with open(upload.contacts_path, "rb") as file, open(partial, "w", encoding="utf-8", newline="") as invalid:
        preview = check_import(file, resolved, upload.meta["channel"], upload.meta.get("default_region"), invalid,
                               width=sample.width)
    partial.replace(upload.invalid_rows_path)
    upload.meta.update(mapping=mapping.to_json(), resolved=resolved.to_json(), preview=preview.to_json(),
                       width=sample.width)
    upload.save()
    return preview


@router.post("/campaigns/new/{upload_id}/columns")
async def choose_columns(request: Request, session: SignedIn, upload_id: str) -> Response:
    upload = _upload(request, session, upload_id)
    sample = await asyncio.to_thread(_sample, upload)
    form = dict(await request.form())
    try:
        mapping = read_mapping(form, sample.columns())
    except MappingProblems as exc:
        return _columns_page(request, upload, sample, form, 422, exc.problems)
    try:
        preview = await asyncio.to_thread(_check, upload, sample, mapping)
    except CsvError as exc:
        return _columns_page(request, upload, sample, form, 422, [f"The file cannot be imported: {exc}."])
    if preview.valid == 0:
        problem = (f"No valid contact among the file's {preview.contacts} rows with this Destination column: a "
                   "campaign needs at least one. Choose another column, or fix the file and start again.")
        if upload.meta["channel"] == "sms" and "invalid_e164" in preview.invalid_reasons \
                and not upload.meta.get("default_region"):
            problem += " National numbers (without +) need a default region on the first step."
        return _columns_page(request, upload, sample, form, 422, [problem], preview.invalid_reasons)
    return _see_other(f"/campaigns/new/{upload.upload_id}/template")


@router.post("/campaigns/new/{upload_id}/cancel")
async def cancel(request: Request, session: SignedIn, upload_id: str) -> Response:
    _uploads(request).discard(_upload(request, session, upload_id))
    return _see_other("/campaigns")


@router.get("/campaigns/new/{upload_id}/invalid-rows.csv")
async def checked_invalid_rows(request: Request, session: SignedIn, upload_id: str) -> Response:
    upload = _upload(request, session, upload_id)
    if not upload.invalid_rows_path.exists():
        raise ConsoleRefused(404, "Choose the columns first: the file is checked then.")
    return _csv_download(_file_blocks(upload.invalid_rows_path), f"invalid-rows-{_slug(upload.meta['name'])}.csv")


# ------------------------------------------------------------------ 3. template, and create

def _editor(channel: str, form: TemplateForm, profile: VariableProfile, **extra: Any) -> dict[str, Any]:
    """What edit_template_editor.html needs: the fields, the variables, the rules and the first contact for the
    live parts (editor.js), and the server's own preview and missing variables for a page without script."""
    attachments = list(form.attachments) + [dict.fromkeys(ATTACHMENT_FIELDS, "")]  # one empty row to fill
    return {"channel": channel, "form": form, "variables": list(profile.present), "profile": profile.to_json(),
            "rules": sms_rules(), "preview": form.preview(profile.sample), "missing": profile.missing(form.text),
            "attachments": attachments, "attachment_statuses": ATTACHMENT_STATUSES, **extra}


def _draft(upload: Upload) -> TemplateForm:
    draft = upload.meta.get("draft")
    if draft is None:
        return form_of_template(upload.meta["channel"], None)
    return TemplateForm(upload.meta["channel"], dict(draft["fields"]), list(draft["attachments"]))


def _template_page(request: Request, upload: Upload, form: TemplateForm, status_code: int = 200,
                   problems: list[str] | None = None, confirm_missing: bool = False,
                   consent: bool = False) -> HTMLResponse:
    preview = ImportPreview.from_json(upload.meta["preview"])
    editor = _editor(upload.meta["channel"], form, preview.profile, confirm_missing=confirm_missing,
                     submit_label="Create campaign",
                     action=f"{PREFIX}/campaigns/new/{upload.upload_id}/template")
    return page(request, "new_campaign_template.html", status_code, upload=upload, meta=upload.meta,
                check=preview, reason_words=REASON_WORDS, channels=CHANNELS, editor=editor,
                problems=problems or [], consent=consent)


@router.get("/campaigns/new/{upload_id}/template")
async def template_form(request: Request, session: SignedIn, upload_id: str) -> Response:
    upload = _upload(request, session, upload_id)
    if "preview" not in upload.meta:
        return _see_other(f"/campaigns/new/{upload.upload_id}/columns")
    return _template_page(request, upload, _draft(upload))


async def _template_of(request: Request, channel: str) -> tuple[TemplateForm, Any]:
    form = await request.form()
    lists = {f"attachment_{name}": [str(v) for v in form.getlist(f"attachment_{name}")] for name in ATTACHMENT_FIELDS}
    return read_template_form(channel, form, attachment_rows(lists)), form


def _missing_problem(missing: list[dict[str, Any]], verb: str) -> str:
    names = ", ".join("{{" + m["variable"] + "}}" for m in missing)
    return (f"Some placeholders have no value for some contacts ({names}): those messages would show them as "
            f"written. Change the text, or tick “{verb} anyway”.")


@router.post("/campaigns/new/{upload_id}/template")
async def create_campaign(request: Request, session: SignedIn, upload_id: str) -> Response:
    upload = _upload(request, session, upload_id)
    if "preview" not in upload.meta:
        return _see_other(f"/campaigns/new/{upload.upload_id}/columns")
    template, form = await _template_of(request, upload.meta["channel"])
    upload.meta["draft"] = {"fields": template.fields, "attachments": template.attachments}
    upload.save()
    consent = bool(form.get("consent_confirmed"))
    if form.get("action") == "preview":
        return _template_page(request, upload, template, consent=consent)
    problems = list(template.problems)
    if not consent:
        problems.append("Confirm that the contacts consented to be contacted.")
    if problems:
        return _template_page(request, upload, template, 422, problems, consent=consent)
    missing = ImportPreview.from_json(upload.meta["preview"]).profile.missing(template.text)
    if missing and not form.get("accept_missing"):
        return _template_page(request, upload, template, 422, [_missing_problem(missing, 'Create')],
                              confirm_missing=True, consent=consent)
    campaign_id, refusal = await _create(request, session, upload, template.template or {})
    if refusal is not None:
        return _template_page(request, upload, template, 409, [refusal], consent=consent)
    return _see_other(f"/campaigns/{campaign_id}/import-report")


def _refusal_words(body: dict[str, Any]) -> str:
    reason = body.get("reason")
    detail = body.get("detail") or reason or "refused"
    if isinstance(detail, list):  # a FastAPI validation error
        detail = "; ".join(str(item.get("msg", item)) for item in detail)
    return REJECTION_WORDS.get(reason, f"The campaign was not created: {detail}")


async def _create(request: Request, session: ConsoleSession, upload: Upload,
                  template: dict[str, Any]) -> tuple[str | None, str | None]:
    """The API's create with this upload, as the signed-in person: (the campaign's id, None), or (None, why not
    in words)."""
    meta, resolved = upload.meta, upload.meta["resolved"]
    # The key is the upload's with what it creates: a double click or a retry after a broker failure publishes
    # the same commands (the handler acts once); other columns or another template, or an attempt after a
    # rejection, make new ones (the first command of a key wins, whatever it carried).
    content = hashlib.sha256(json.dumps([template, resolved], sort_keys=True).encode()).hexdigest()[:16]
    key = f"console-upload:{upload.upload_id}:{content}:{meta.get('attempt', 0)}"
    try:
        with open(upload.contacts_path, "rb") as file:
            answer = await writes.create_campaign(
                request, session.principal, UploadFile(file, filename=meta["filename"]), name=meta["name"],
                channel=meta["channel"], template=json.dumps(template), consent_confirmed=True,
                description=meta.get("description") or None, destination_column=resolved["destination_column"],
                variables=json.dumps(resolved["variables"]), default_region=meta.get("default_region"),
                idempotency_key=key)
    except FileNotFoundError:
        return None, "This upload was used already (the campaign was created): see the campaigns list."
    except HTTPException as exc:
        return None, _refusal_words({"detail": exc.detail})
    except BrokerUnavailable:
        return None, ("The message broker did not take the campaign. Try again: the same upload sends the same "
                      "commands, so nothing is created twice.")
    except InvalidCommand as exc:
        return None, f"The campaign was not created: {exc}"
    if isinstance(answer, JSONResponse):
        body = json.loads(answer.body)
        if body.get("state") == "rejected":
            meta["attempt"] = int(meta.get("attempt", 0)) + 1
            upload.save()
        return None, _refusal_words(body)
    campaign_id = answer["campaign_id"]
    record = {"name": meta["name"], "channel": meta["channel"], "filename": meta["filename"],
              "created_by": session.principal.name, "mapping": meta["mapping"], "resolved": resolved,
              "preview": meta["preview"], "profile": meta["preview"]["profile"],
              "chunks": len(answer.get("contacts_command_ids") or [])}
    await asyncio.to_thread(_uploads(request).keep_import, upload, campaign_id, record)
    return campaign_id, None


@router.post("/email-preview")
async def email_preview(request: Request, session: SignedIn) -> Response:
    """A rendered email body as the editor's preview frame shows it (template_form.preview_html)."""
    _may_create(session)
    html = str((await request.form()).get("html") or "")
    return HTMLResponse(preview_html(html), headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# ------------------------------------------------------------------ the import report

async def _read(request: Request, method: str, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(getattr(request.app.state.read_model, method), *args, **kwargs)


def _campaign_id(campaign_id: str) -> str:
    if not is_wire_uuid(campaign_id):
        raise ConsoleRefused(404, "No such campaign.")
    return campaign_id


@router.get("/campaigns/{campaign_id}/import-report")
async def import_report_page(request: Request, session: SignedIn, campaign_id: str) -> Response:
    _may_create(session)
    _campaign_id(campaign_id)
    campaign = await _read(request, "campaign", campaign_id)
    record = _uploads(request).campaign_import(campaign_id)
    if campaign is None and record is None:
        raise ConsoleRefused(404, "No such campaign.")
    report = import_report(await _read(request, "events", campaign_id), expected_chunks=(record or {}).get("chunks"))
    path = _uploads(request).invalid_rows_path(campaign_id)
    rows, header = await asyncio.to_thread(_first_invalid_rows, report.invalid_rows[:REPORT_ROWS], path)
    return page(request, "new_campaign_report.html", campaign=campaign, record=record, report=report,
                campaign_id=campaign_id, rows=rows, header=header, reason_words=REASON_WORDS, channels=CHANNELS,
                shown=REPORT_ROWS, may_edit=campaign is not None and "edit" in policy.campaign_actions(
                    campaign.get("status", ""), session.info.role))


def _first_invalid_rows(rows: list[tuple[int, str]], path) -> tuple[list[list[str]], list[str]]:
    if path is None:
        return [[str(row), reason] for row, reason in rows], ["row", "reason"]
    with open(path, encoding="utf-8", newline="") as stored:
        joined = list(joined_invalid_rows(rows, stored))
    # On the page the cells read as in the file (the download keeps the export's formula guard).
    return [[unneutralise(cell) for cell in cells] for cells in joined[1:]], [unneutralise(c) for c in joined[0]]


@router.get("/campaigns/{campaign_id}/invalid-rows.csv")
async def invalid_rows(request: Request, session: SignedIn, campaign_id: str) -> Response:
    _may_create(session)
    _campaign_id(campaign_id)
    report = import_report(await _read(request, "events", campaign_id))
    record = _uploads(request).campaign_import(campaign_id) or {}
    path = _uploads(request).invalid_rows_path(campaign_id)

    def blocks() -> Iterator[str]:
        stored = open(path, encoding="utf-8", newline="") if path is not None else None
        try:
            yield from _csv_blocks(joined_invalid_rows(report.invalid_rows, stored))
        finally:
            if stored is not None:
                stored.close()

    return _csv_download(blocks(), f"invalid-rows-{_slug(record.get('name') or campaign_id)}.csv")


def _csv_blocks(rows: Iterable[list[str]], block_rows: int = 1000) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for count, row in enumerate(rows, start=1):
        writer.writerow(row)
        if count % block_rows == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _file_blocks(path, block: int = 64 * 1024) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as file:
        while text := file.read(block):
            yield text


def _slug(name: str) -> str:
    kept = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in name.strip().lower())
    return "-".join(part for part in kept.split("-") if part)[:60] or "campaign"


def _csv_download(blocks: Iterable[str], filename: str) -> StreamingResponse:
    return StreamingResponse(blocks, media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# ------------------------------------------------------------------ edit a Ready campaign

def _profile_of_messages(read_model, campaign_id: str) -> VariableProfile:
    """The variables of a campaign made elsewhere (the API, the CLI), from its messages (two passes, bounded)."""
    names = export.variable_columns(read_model.iter_messages(campaign_id))
    profile = VariableProfile.of(names)
    for message in read_model.iter_messages(campaign_id):
        profile.add(message)
    return profile


async def _editable(request: Request, session: ConsoleSession, campaign_id: str) -> tuple[dict, VariableProfile]:
    _may_create(session)
    _campaign_id(campaign_id)
    campaign = await _read(request, "campaign", campaign_id)
    if campaign is None or campaign.get("status") == "deleted":
        raise ConsoleRefused(404, "No such campaign.")
    if "edit" not in policy.campaign_actions(campaign["status"], session.info.role):
        raise ConsoleRefused(409, f"Only a Ready campaign can be edited: “{campaign.get('name')}” is "
                                  f"{campaign['status'].replace('_', ' ')}.")
    store = _uploads(request)
    record = store.campaign_import(campaign_id) or {}
    if "profile" in record:
        return campaign, VariableProfile.from_json(record["profile"])
    # Contacts never change after the import: the profile is worked out once and kept.
    profile = await asyncio.to_thread(_profile_of_messages, request.app.state.read_model, campaign_id)
    await asyncio.to_thread(store.save_campaign_import, campaign_id, {**record, "profile": profile.to_json()})
    return campaign, profile


def _edit_page(request: Request, campaign: dict[str, Any], profile: VariableProfile, form: TemplateForm,
               status_code: int = 200, problems: list[str] | None = None,
               confirm_missing: bool = False) -> HTMLResponse:
    campaign_id = campaign["campaign_id"]
    editor = _editor(campaign["channel"], form, profile, confirm_missing=confirm_missing,
                     submit_label="Save template", action=f"{PREFIX}/campaigns/{campaign_id}/edit")
    return page(request, "edit_template.html", status_code, campaign=campaign, channels=CHANNELS, editor=editor,
                problems=problems or [], contacts=profile.contacts)


@router.get("/campaigns/{campaign_id}/edit")
async def edit_form(request: Request, session: SignedIn, campaign_id: str) -> Response:
    campaign, profile = await _editable(request, session, campaign_id)
    return _edit_page(request, campaign, profile, form_of_template(campaign["channel"], campaign.get("template")))


@router.post("/campaigns/{campaign_id}/edit")
async def save_template(request: Request, session: SignedIn, campaign_id: str) -> Response:
    campaign, profile = await _editable(request, session, campaign_id)
    template, form = await _template_of(request, campaign["channel"])
    if form.get("action") == "preview":
        return _edit_page(request, campaign, profile, template)
    if template.problems:
        return _edit_page(request, campaign, profile, template, 422, template.problems)
    missing = profile.missing(template.text)
    if missing and not form.get("accept_missing"):
        return _edit_page(request, campaign, profile, template, 422, [_missing_problem(missing, 'Save')],
                          confirm_missing=True)
    try:
        answer = await writes.update_template(request, session.principal, campaign_id,
                                              UpdateTemplateBody.model_validate({"template": template.template}))
    except BrokerUnavailable:
        return _edit_page(request, campaign, profile, template, 503,
                          ["The message broker did not take the change: try again."])
    if isinstance(answer, JSONResponse):
        return _edit_page(request, campaign, profile, template, answer.status_code,
                          [_refusal_words(json.loads(answer.body)).replace("was not created", "was not changed")])
    return _see_other(f"/campaigns/{campaign_id}")
