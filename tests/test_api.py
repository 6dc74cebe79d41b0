"""The HTTP API over real HTTP (uvicorn on a free port): every endpoint and filter against a read model filled
directly with records, the role matrix (401 / 403) on every route, and the command endpoints publishing to the
session's broker (read back from `outreach.commands`). No command handler runs here: the module's app answers
commands 202 pending at once (answer_wait_s=0); the answers a waiting app returns (202 answered, 404 / 409 / 422
rejected) are written into the read model by the tests, as the projections would."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from typer.testing import CliRunner

from outreach.cli import app as cli_app
from schemas import topics
from schemas.commands import parse_command
from services.api.app import BackgroundServer, create_app
from services.api.store import ApiStore
from services.common import ids
from services.common.settings import Settings
from services.projections.projector import ReadModel
from tests.conftest import async_wait_until
from tests.e2e_support import Tail

BASE = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
ROLES = ("org_admin", "admin", "campaigner", "operations")


# ------------------------------------------------------------------ records (as the relay publishes them)

def at(seconds: float) -> str:
    return (BASE + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def campaign_event(campaign_id: str, sequence: int, type_: str, seconds: float, causation_id: str | None = None,
                   **body) -> dict:
    return {"type": type_, "event_id": str(uuid.uuid4()), "campaign_id": campaign_id, "sequence": sequence,
            "occurred_at": at(seconds), "causation_id": causation_id or str(uuid.uuid4()), **body}


def status_record(campaign_id: str, row: int, sequence: int, status: str, seconds: float, previous: str | None,
                  *, channel: str = "sms", reason: str | None = None, provider_code: str | None = None,
                  attempt: int | None = None, **extra) -> dict:
    return {"type": "MessageStatusChanged", "event_id": str(uuid.uuid4()),
            "message_id": ids.message_id(campaign_id, row), "campaign_id": campaign_id, "channel": channel,
            "row": row, "run_no": None if status == "waiting" else 1, "status": status, "previous_status": previous,
            "reason": reason, "provider_code": provider_code, "attempt": attempt, "occurred_at": at(seconds),
            "causation_id": str(uuid.uuid4()), "sequence": sequence, **extra}


def counts(**by_status: int) -> dict:
    base = {s: 0 for s in ("waiting", "queued", "sending", "sent", "delivered", "assumed_delivered", "retrying",
                           "failed", "opted_out", "cancelled")}
    base.update(by_status)
    return {"total": sum(by_status.values()), **base}


def ready_campaign(campaign_id: str, contacts: list[tuple[int, str, dict]], *, name: str, channel: str = "sms",
                   start: float = 0) -> tuple[list[dict], list[dict]]:
    """Created, contacts added (waiting records with destination and variables), ready."""
    template = {"body": "Hi {{first_name}}"} if channel == "sms" else {
        "subject": "Hi", "html": "<p>Hi</p>", "from_email": "team@example.org", "from_name": "Team", "attachments": []}
    events = [
        campaign_event(campaign_id, 10, "CampaignCreated", start, name=name, description=None, channel=channel,
                       template=template, created_by="alice"),
        campaign_event(campaign_id, 20, "ContactsAdded", start + 1, chunk_no=0, valid=len(contacts), invalid=0,
                       invalid_rows=[]),
        campaign_event(campaign_id, 21, "CampaignReady", start + 1, message_count=len(contacts),
                       summary={"name": name, "channel": channel, "message_count": len(contacts)}),
        campaign_event(campaign_id, 22, "CampaignStatusChanged", start + 1, status="ready", previous_status="created",
                       stopped=False, counts=counts(waiting=len(contacts))),
    ]
    statuses = [status_record(campaign_id, row, 10, "waiting", start + 1, None, channel=channel,
                              destination=destination, variables=variables)
                for row, destination, variables in contacts]
    return events, statuses


SMS_ID = "0a0a0a0a-0000-4000-8000-000000000001"
EMAIL_ID = "0a0a0a0a-0000-4000-8000-000000000002"
LIVE_ID = "0a0a0a0a-0000-4000-8000-000000000003"
SMS_CONTACTS = [
    (2, "+15555550100", {"first_name": "Ada", "city": "Paris"}),
    (3, "+15555550101", {"first_name": "Bob", "city": "=HYPERLINK(\"http://evil\")"}),
    (4, "+15555550102", {"first_name": "Cy", "city": "Lyon"}),
    (5, "+15555550103", {"first_name": "-Dee", "city": "@home"}),
    (6, "+15555550104", {"first_name": "Eve"}),
]
# row -> (final status, reason) after the run (which happens at +100 s)
SMS_OUTCOMES = {2: ("delivered", None), 3: ("failed", "invalid_destination"), 4: ("failed", "undeliverable"),
                5: ("opted_out", None), 6: ("queued", None)}
RUN_AT = 100


def sms_campaign_records() -> tuple[list[dict], list[dict]]:
    events, statuses = ready_campaign(SMS_ID, SMS_CONTACTS, name="Spring SMS", start=0)
    run_command = str(uuid.uuid4())
    events += [
        campaign_event(SMS_ID, 30, "CampaignRunStarted", RUN_AT, causation_id=run_command, run_no=1,
                       accepted_by="bob", disclaimer={}, message_count=5, suppressed_count=0),
        campaign_event(SMS_ID, 31, "CampaignStatusChanged", RUN_AT, causation_id=run_command, status="in_progress",
                       previous_status="ready", stopped=False, counts=counts(queued=5)),
    ]
    for row, _, _ in SMS_CONTACTS:
        statuses.append(status_record(SMS_ID, row, 20, "queued", RUN_AT, "waiting"))
        final, reason = SMS_OUTCOMES[row]
        if final == "queued":
            continue
        statuses.append(status_record(SMS_ID, row, 30, "sending", RUN_AT + 10 + row, "queued", attempt=1))
        code = {"invalid_destination": "21211", "undeliverable": "30005"}.get(reason)
        statuses.append(status_record(SMS_ID, row, 40, final, RUN_AT + 20 + row, "sending", reason=reason,
                                      provider_code=code, attempt=1))
    return events, statuses


# Secrets of its own, not the public development values: channel settings pointing at a real provider (the SMTP
# server of test_channel_settings_are_write_only_encrypted_and_masked) are refused without them.
OWN_SECRETS = {"unsubscribe_secret": "api-test-unsubscribe-secret-0123",
               "sendgrid_webhook_public_key": "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9m"
                                              "N1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, kafka_bootstrap) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("api-data"), kafka_bootstrap_servers=kafka_bootstrap,
                    **OWN_SECRETS)


@pytest.fixture(scope="module")
def read_model(settings):
    with ReadModel.open(settings) as model:
        events, statuses = sms_campaign_records()
        model.apply_batch(events, statuses)
        model.apply_batch(*ready_campaign(EMAIL_ID, [(2, "ann@example.org", {"first_name": "Ann"}),
                                                     (3, "ben@example.org", {})], name="Autumn email",
                                          channel="email", start=500))
        yield model


@pytest.fixture(scope="module")
def tokens(settings) -> dict[str, str]:
    with ApiStore.open(settings) as store:
        return {role: store.create_token(f"{role}-user", role)[0] for role in ROLES}


@pytest.fixture(scope="module")
def server(settings, read_model, tokens):
    app = create_app(settings, answer_wait_s=0)  # nothing answers commands here: 202 pending at once
    with BackgroundServer(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def http(server, tokens):
    """A client acting as a campaigner."""
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {tokens['campaigner']}"}) as client:
        yield client


def as_role(tokens: dict, role: str) -> dict:
    return {"Authorization": f"Bearer {tokens[role]}"}


# ------------------------------------------------------------------ OpenAPI

def test_openapi_documents_every_endpoint_with_tags(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert set(spec["paths"]) == {
        "/campaigns", "/campaigns/{campaign_id}", "/campaigns/{campaign_id}/messages",
        "/campaigns/{campaign_id}/messages.csv", "/campaigns/{campaign_id}/messages/{message_id}/history",
        "/campaigns/{campaign_id}/progress", "/campaigns/{campaign_id}/history", "/campaigns/{campaign_id}/template",
        "/campaigns/{campaign_id}/run", "/campaigns/{campaign_id}/stop", "/campaigns/{campaign_id}/retry",
        "/campaigns/{campaign_id}/test-send", "/commands/{command_id}", "/settings/channels/sms", "/settings/channels/email", "/tokens", "/tokens/{token_id}", "/healthz",
        "/opt-outs", "/opt-outs/remove",
    }
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("tags"), (method, path)
            assert operation.get("summary"), (method, path)
            assert {"200", "201", "202"} & set(operation["responses"]), (method, path)
            if path != "/healthz":
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
                assert operation["security"] == [{"HTTPBearer": []}], (method, path)
    listed = spec["paths"]["/campaigns/{campaign_id}/messages"]["get"]
    assert {p["name"] for p in listed["parameters"]} >= {"status", "reason", "q", "limit", "offset", "as_of"}
    page = listed["responses"]["200"]["content"]["application/json"]["schema"]
    assert page["$ref"].endswith("/MessagePage")
    assert "text/event-stream" in spec["paths"]["/campaigns/{campaign_id}/progress"]["get"]["responses"]["200"][
        "content"]
    assert "text/csv" in spec["paths"]["/campaigns/{campaign_id}/messages.csv"]["get"]["responses"]["200"]["content"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# ------------------------------------------------------------------ the role matrix, every route

@pytest.fixture(scope="module")
def revocable_token_id(settings) -> str:
    """A campaigner token the role matrix revokes (org_admin and admin may; a repeated revocation answers 200)."""
    with ApiStore.open(settings) as store:
        return store.create_token("matrix-campaigner", "campaigner")[1].token_id


def _route_calls(token_id: str = "0123456789ab") -> list[tuple[str, str, dict]]:
    """(method, url, request kwargs) for every authenticated route of the app."""
    command_id = str(uuid.uuid4())
    message_id = ids.message_id(SMS_ID, 2)
    upload = {"files": {"contacts": ("c.csv", b"phone,first_name\n+15555550100,Ada\n", "text/csv")},
              "data": {"name": "M", "channel": "sms", "template": '{"body": "Hi"}', "consent_confirmed": "true"}}
    return [
        ("GET", "/campaigns", {}),
        ("POST", "/campaigns", upload),
        ("GET", f"/campaigns/{SMS_ID}", {}),
        ("DELETE", f"/campaigns/{str(uuid.uuid4())}", {}),
        ("GET", f"/campaigns/{SMS_ID}/messages", {}),
        ("GET", f"/campaigns/{SMS_ID}/messages.csv", {}),
        ("GET", f"/campaigns/{SMS_ID}/messages/{message_id}/history", {}),
        ("GET", f"/campaigns/{EMAIL_ID}/history", {}),
        ("GET", f"/campaigns/{SMS_ID}/progress", {}),  # not final: the stream stays open (only its head is read)
        ("PUT", f"/campaigns/{str(uuid.uuid4())}/template", {"json": {"template": {"body": "New"}}}),
        ("POST", f"/campaigns/{str(uuid.uuid4())}/run", {"json": {"disclaimer": {"consent": True}}}),
        ("POST", f"/campaigns/{str(uuid.uuid4())}/stop", {"json": {"confirmed": True}}),
        ("POST", f"/campaigns/{str(uuid.uuid4())}/retry", {"json": {}}),
        ("POST", f"/campaigns/{str(uuid.uuid4())}/test-send", {"json": {"destination": "+15555550100"}}),
        ("GET", f"/commands/{command_id}", {}),
        ("GET", "/opt-outs", {"params": {"channel": "sms"}}),
        ("POST", "/opt-outs", {"json": {"channel": "sms", "destination": "+15555550177"}}),
        # Not on the list (this server has no handler): 404 for the org admin, who alone may remove.
        ("POST", "/opt-outs/remove", {"json": {"channel": "sms", "destination": "+15555550178", "reason": "asked"}}),
        ("GET", "/settings/channels/sms", {}),
        ("GET", "/settings/channels/email", {}),
        ("PUT", "/settings/channels/sms", {"json": {"provider": "inprocess", "credentials": {}}}),
        ("PUT", "/settings/channels/email", {"json": {"provider": "inprocess", "credentials": {}}}),
        ("POST", "/tokens", {"json": {"name": "matrix-made", "role": "campaigner"}}),
        ("GET", "/tokens", {}),
        ("DELETE", f"/tokens/{token_id}", {}),
    ]


def _allowed_roles(url: str) -> set[str]:
    """Who may use a route (shared/product-reference.md, Roles): settings are org_admin's; tokens org_admin's
    and admin's (campaigner tokens: the calls above use campaigner tokens); campaigns all but operations."""
    if url.startswith("/settings"):
        return {"org_admin"}
    if url.startswith("/tokens"):
        return {"org_admin", "admin"}
    if url == "/opt-outs/remove":  # removal is the org admin's, with a reason
        return {"org_admin"}
    return {"org_admin", "admin", "campaigner"}


def _status_of(client: httpx.Client, method: str, url: str, headers: dict, kwargs: dict) -> httpx.Response:
    with client.stream(method, url, headers=headers, **kwargs) as response:
        return response  # the head is enough (a progress stream would not end)


def test_a_channel_without_stored_settings_shows_the_environments_masked(server, tokens, settings):
    # First in the module: the role tests below store settings for both channels.
    with httpx.Client(base_url=server.url, timeout=30, headers=as_role(tokens, "org_admin")) as client:
        default = client.get("/settings/channels/sms").json()
    assert default["source"] == "environment" and default["provider"] == settings.sms_provider
    assert "simulator-auth-token" not in json.dumps(default)


def test_role_matrix_covers_every_route(server):
    # From the OpenAPI document: FastAPI keeps an included router's routes inside it, not in app.routes.
    spec = httpx.get(f"{server.url}/openapi.json").json()
    routes = {(method.upper(), path) for path, operations in spec["paths"].items() for method in operations
              if path != "/healthz"}
    called = set()
    for method, url, _ in _route_calls():
        for route_method, path in routes:
            if route_method == method and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", path), url):
                called.add((method, path))
    assert len(routes) == 25 and called == routes


def test_no_or_unknown_token_is_401_everywhere(server, revocable_token_id):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, url, kwargs in _route_calls(revocable_token_id):
            for headers in ({}, {"Authorization": "Bearer otk_not-a-token"}, {"Authorization": "Basic eDp5"}):
                response = _status_of(client, method, url, headers, kwargs)
                assert response.status_code == 401, (method, url, headers, response.status_code)
                assert response.headers["www-authenticate"] == "Bearer"


def test_roles_get_403_where_they_have_no_access(server, tokens, revocable_token_id):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, url, kwargs in _route_calls(revocable_token_id):
            for role in ROLES:
                response = _status_of(client, method, url, as_role(tokens, role), kwargs)
                if role in _allowed_roles(url):
                    allowed = (200, 201, 202, 404) if url == "/opt-outs/remove" else (200, 201, 202)
                    assert response.status_code in allowed, (role, method, url, response.status_code)
                else:
                    assert response.status_code == 403, (role, method, url, response.status_code)


def test_revoked_token_is_refused_at_once(server, settings):
    with ApiStore.open(settings) as store:
        token, info = store.create_token("temp", "admin")
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{server.url}/campaigns", headers=headers).status_code == 200
        assert store.revoke(info.token_id) == 1
    assert httpx.get(f"{server.url}/campaigns", headers=headers).status_code == 401


def test_token_cli_creates_a_working_token_lists_and_revokes_it(server, settings, monkeypatch):
    monkeypatch.setenv("OUTREACH_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    created = runner.invoke(cli_app, ["token", "create", "carol", "--role", "admin", "--json"])
    assert created.exit_code == 0, created.output
    token = json.loads(created.output)
    response = httpx.get(f"{server.url}/campaigns", headers={"Authorization": f"Bearer {token['token']}"})
    assert response.status_code == 200
    listed = runner.invoke(cli_app, ["token", "list", "--json"])
    assert any(t["principal"] == "carol" and t["role"] == "admin" for t in json.loads(listed.output))
    assert token["token"] not in listed.output
    assert runner.invoke(cli_app, ["token", "revoke", "carol"]).exit_code == 0
    response = httpx.get(f"{server.url}/campaigns", headers={"Authorization": f"Bearer {token['token']}"})
    assert response.status_code == 401
    assert runner.invoke(cli_app, ["token", "create", "x", "--role", "superuser"]).exit_code != 0


def test_tokens_are_stored_only_as_hashes(settings, tokens):
    from services.api.store import hash_token

    database = settings.data_dir / "api.db"
    assert database.stat().st_mode & 0o777 == 0o600
    wal = database.with_name("api.db-wal")
    raw = database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    for token in tokens.values():
        assert token.encode() not in raw
        assert hash_token(token).encode() in raw  # what is stored (so `raw` holds the rows)


# ------------------------------------------------------------------ campaigns

def test_campaigns_list_newest_first_with_counts_filter_and_pagination(http):
    page = http.get("/campaigns").json()
    ours = [c for c in page["items"] if c["campaign_id"] in (SMS_ID, EMAIL_ID)]
    assert [c["campaign_id"] for c in ours] == [EMAIL_ID, SMS_ID]  # the email campaign was created later
    sms = ours[1]
    assert sms["status"] == "in_progress" and sms["name"] == "Spring SMS" and sms["channel"] == "sms"
    assert sms["counts"]["total"] == 5 and sms["counts"]["failed"] == 2 and sms["counts"]["queued"] == 1
    ready = http.get("/campaigns", params={"status": "ready"}).json()
    assert EMAIL_ID in [c["campaign_id"] for c in ready["items"]]
    assert all(c["status"] == "ready" for c in ready["items"]) and ready["total"] == len(ready["items"])
    first = http.get("/campaigns", params={"limit": 1}).json()
    second = http.get("/campaigns", params={"limit": 1, "offset": 1}).json()
    assert first["total"] == second["total"] >= 2 and len(first["items"]) == len(second["items"]) == 1
    assert first["items"][0]["campaign_id"] != second["items"][0]["campaign_id"]
    assert http.get("/campaigns", params={"status": "nonsense"}).status_code == 422
    assert http.get("/campaigns", params={"limit": 1001}).status_code == 422


def test_limit_and_offset_have_documented_maxima_that_no_database_overflows_on(http):
    from services.api.reads import MAX_LIMIT, MAX_OFFSET

    spec = http.get("/openapi.json").json()
    for path in ("/campaigns", "/campaigns/{campaign_id}/messages", "/campaigns/{campaign_id}/history"):
        parameters = {p["name"]: p["schema"] for p in spec["paths"][path]["get"]["parameters"]}
        limit = parameters["limit"].get("anyOf", [parameters["limit"]])[0]
        assert limit["maximum"] == MAX_LIMIT and parameters["offset"]["maximum"] == MAX_OFFSET, path
    for url in ("/campaigns", f"/campaigns/{SMS_ID}/messages", f"/campaigns/{SMS_ID}/history"):
        last = http.get(url, params={"offset": MAX_OFFSET, "limit": MAX_LIMIT})
        assert last.status_code == 200, (url, last.text)  # an empty page, not a 500 from the database
        assert (last.json() if url.endswith("history") else last.json()["items"]) == []
        for params in ({"offset": MAX_OFFSET + 1}, {"offset": 10**30}, {"offset": -1}, {"limit": MAX_LIMIT + 1}):
            assert http.get(url, params=params).status_code == 422, (url, params)


def test_campaign_detail_unknown_and_malformed_ids(http):
    campaign = http.get(f"/campaigns/{SMS_ID}").json()
    assert campaign["counts"] == {**counts(delivered=1, failed=2, opted_out=1, queued=1)}
    assert campaign["summary"]["message_count"] == 5 and campaign["template"] == {"body": "Hi {{first_name}}"}
    assert http.get(f"/campaigns/{uuid.uuid4()}").status_code == 404
    assert http.get("/campaigns/NOT-A-UUID").status_code == 422


# ------------------------------------------------------------------ messages: filters, search, pagination

def rows_of(page: dict) -> list[int]:
    return [m["row"] for m in page["items"]]


def test_messages_filters_search_and_pagination(http):
    url = f"/campaigns/{SMS_ID}/messages"
    everything = http.get(url).json()
    assert rows_of(everything) == [2, 3, 4, 5, 6] and everything["total"] == 5
    first = everything["items"][0]
    assert first["destination"] == "+15555550100" and first["variables"] == {"first_name": "Ada", "city": "Paris"}
    assert first["status"] == "delivered" and first["message_id"] == ids.message_id(SMS_ID, 2)
    assert rows_of(http.get(url, params={"status": "failed"}).json()) == [3, 4]
    assert rows_of(http.get(url, params={"reason": "undeliverable"}).json()) == [4]
    assert rows_of(http.get(url, params={"status": "failed", "reason": "invalid_destination"}).json()) == [3]
    assert rows_of(http.get(url, params={"status": "sending"}).json()) == []
    assert rows_of(http.get(url, params={"q": "lyon"}).json()) == [4]  # a variable, any case
    assert rows_of(http.get(url, params={"q": "5550103"}).json()) == [5]  # part of the destination
    assert rows_of(http.get(url, params={"q": "6"}).json()) == [6]  # the row number
    assert rows_of(http.get(url, params={"q": ids.message_id(SMS_ID, 3)}).json()) == [3]
    assert rows_of(http.get(url, params={"q": "a", "status": "delivered"}).json()) == [2]
    assert rows_of(http.get(url, params={"q": "  LYON "}).json()) == [4]  # trimmed
    assert rows_of(http.get(url, params={"q": "   "}).json()) == [2, 3, 4, 5, 6]  # blank: no search
    page = http.get(url, params={"limit": 2, "offset": 2}).json()
    assert rows_of(page) == [4, 5] and page["total"] == 5 and page["limit"] == 2 and page["offset"] == 2
    filtered_page = http.get(url, params={"status": "failed", "limit": 1, "offset": 1}).json()
    assert rows_of(filtered_page) == [4] and filtered_page["total"] == 2
    assert http.get(url, params={"status": "lost"}).status_code == 422
    assert http.get(url, params={"reason": "bad_luck"}).status_code == 422
    assert http.get(url, params={"limit": 0}).status_code == 422
    for unicode_digits in ("²", "٣", "३"):  # digits to str.isdigit(), not to int()
        assert rows_of(http.get(url, params={"q": unicode_digits}).json()) == []
    assert http.get(f"/campaigns/{uuid.uuid4()}/messages").status_code == 404


def test_as_of_shows_the_campaign_and_messages_as_they_stood(http):
    before_run = at(RUN_AT - 1)
    campaign = http.get(f"/campaigns/{SMS_ID}", params={"as_of": before_run}).json()
    assert campaign["status"] == "ready" and campaign["counts"]["waiting"] == 5
    page = http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": before_run}).json()
    assert page["as_of"] == before_run and {m["status"] for m in page["items"]} == {"waiting"}
    assert page["items"][0]["destination"] == "+15555550100"
    mid_run = at(RUN_AT + 24)  # rows 2..4 have reached their outcome (at RUN_AT + 20 + row), row 5 is sending
    page = http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": mid_run}).json()
    assert [m["status"] for m in page["items"]] == ["delivered", "failed", "failed", "sending", "queued"]
    failed = http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": mid_run, "status": "failed",
                                                               "limit": 1, "offset": 1}).json()
    assert rows_of(failed) == [4] and failed["total"] == 2
    for q, rows in (("LYON", [4]), ("5550103", [5]), ("6", [6]), (ids.message_id(SMS_ID, 3), [3]), (" ", None)):
        live = rows_of(http.get(f"/campaigns/{SMS_ID}/messages", params={"q": q}).json())
        then = rows_of(http.get(f"/campaigns/{SMS_ID}/messages", params={"q": q, "as_of": mid_run}).json())
        assert then == live == (rows or [2, 3, 4, 5, 6]), q  # the same search as of a time as live
    assert rows_of(http.get(f"/campaigns/{SMS_ID}/messages", params={"q": "²", "as_of": mid_run}).json()) == []
    assert http.get(f"/campaigns/{SMS_ID}", params={"as_of": at(-10)}).status_code == 404  # not created yet
    for ancient in ("0999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"):  # zero-padded: before 2026, not after
        assert http.get(f"/campaigns/{SMS_ID}", params={"as_of": ancient}).status_code == 404
        assert http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": ancient}).status_code == 404
        assert http.get(f"/campaigns/{SMS_ID}/history", params={"as_of": ancient}).json() == []
    # Before 0001-01-01 in UTC (or after 9999): valid RFC 3339 times, before (after) everything.
    before_year_1, after_9999 = "0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-02:00"
    assert http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": before_year_1}).status_code == 404
    assert http.get(f"/campaigns/{SMS_ID}/history", params={"as_of": before_year_1}).json() == []
    late = http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": after_9999})
    assert late.status_code == 200 and rows_of(late.json()) == [2, 3, 4, 5, 6], late.text
    assert http.get(f"/campaigns/{SMS_ID}", params={"as_of": after_9999}).json()["counts"] == \
        http.get(f"/campaigns/{SMS_ID}").json()["counts"]


def test_as_of_is_an_rfc3339_date_time_with_its_offset(http):
    mid_run = at(RUN_AT + 24)  # ...Z
    expected = rows_of(http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": mid_run, "status": "failed"}).json())
    same_moment = ["2026-01-05T10:02:04+01:00", "2026-01-05t09:02:04z", "2026-01-05T09:02:04.000000000Z",
                   "2026-01-05T04:02:04-05:00"]
    assert mid_run == "2026-01-05T09:02:04.000000Z"
    for text in same_moment:
        response = http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": text, "status": "failed"})
        assert response.status_code == 200 and rows_of(response.json()) == expected == [3, 4], (text, response.text)
        assert response.json()["as_of"] == mid_run
    leap = http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": "2026-01-05T09:02:60Z"})
    assert leap.json()["as_of"] == "2026-01-05T09:02:59.999999Z"  # the last moment of its minute
    not_date_times = ["0.5", "1767600000", "2026-01-05", "2026-01-05T09:02:04", "2026-01-05 09:02:04Z",
                      "2026-02-30T00:00:00Z", "2026-01-05T24:00:00Z", "2026-01-05T09:02:04+24:00", "yesterday", ""]
    for text in not_date_times:
        for path in (f"/campaigns/{SMS_ID}", f"/campaigns/{SMS_ID}/messages", f"/campaigns/{SMS_ID}/history",
                     f"/campaigns/{uuid.uuid4()}/history"):  # a malformed as_of is 422 before the campaign is looked up
            response = http.get(path, params={"as_of": text})
            assert response.status_code == 422 and "as_of" in response.text, (text, path, response.text)


def test_as_of_endpoints_never_load_every_message(server, http, monkeypatch):
    # The whole as-of view (one dict per message: ~0.5 GB for 300,000 messages) is the CLI's; the API asks the
    # read model for the counts, or for one filtered page and its total.
    def whole_view(*args, **kwargs):
        raise AssertionError("the API loaded the whole as-of view")

    monkeypatch.setattr(server.app.state.read_model, "as_of", whole_view)
    mid_run = at(RUN_AT + 24)
    campaign = http.get(f"/campaigns/{SMS_ID}", params={"as_of": mid_run})
    assert campaign.status_code == 200 and campaign.json()["counts"] == counts(delivered=1, failed=2, sending=1,
                                                                              queued=1)
    page = http.get(f"/campaigns/{SMS_ID}/messages", params={"as_of": mid_run, "status": "failed"})
    assert page.status_code == 200 and rows_of(page.json()) == [3, 4] and page.json()["total"] == 2


# ------------------------------------------------------------------ export

def parse_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_csv_export_all_and_filtered_with_neutralised_cells(http):
    response = http.get(f"/campaigns/{SMS_ID}/messages.csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert f"campaign-{SMS_ID}-messages.csv" in response.headers["content-disposition"]
    table = parse_csv(response.text)
    assert table[0] == ["row", "message_id", "destination", "status", "reason", "provider_code", "attempt", "run_no",
                        "updated_at", "first_name", "city"]
    assert [r[0] for r in table[1:]] == ["2", "3", "4", "5", "6"]
    row3 = dict(zip(table[0], table[2]))
    assert row3["destination"] == "'+15555550101"  # begins with +: neutralised, as the issue asks
    assert row3["city"] == "'=HYPERLINK(\"http://evil\")"
    assert row3["status"] == "failed" and row3["reason"] == "invalid_destination" and row3["provider_code"] == "21211"
    row5 = dict(zip(table[0], table[4]))
    assert row5["first_name"] == "'-Dee" and row5["city"] == "'@home"
    assert dict(zip(table[0], table[5]))["city"] == ""  # Eve has no city
    failed = parse_csv(http.get(f"/campaigns/{SMS_ID}/messages.csv", params={"status": "failed"}).text)
    assert [r[0] for r in failed[1:]] == ["3", "4"]
    searched = parse_csv(http.get(f"/campaigns/{SMS_ID}/messages.csv",
                                  params={"reason": "undeliverable", "q": "cy"}).text)
    assert [r[0] for r in searched[1:]] == ["4"]
    assert http.get(f"/campaigns/{uuid.uuid4()}/messages.csv").status_code == 404


# ------------------------------------------------------------------ history

def test_history_is_the_full_ordered_record_and_honours_as_of_and_paging(http):
    records = http.get(f"/campaigns/{SMS_ID}/history").json()
    events, statuses = sms_campaign_records()
    assert len(records) == len(events) + len(statuses)
    times = [r["occurred_at"] for r in records]
    assert times == sorted(times)
    assert records[0]["type"] == "CampaignCreated"
    waiting = [r for r in records if r.get("status") == "waiting"]
    assert waiting[0]["destination"] == "+15555550100"  # each record as published
    only_events = http.get(f"/campaigns/{SMS_ID}/history", params={"include_messages": "false"}).json()
    assert [e["type"] for e in only_events] == [e["type"] for e in events]
    before_run = http.get(f"/campaigns/{SMS_ID}/history", params={"as_of": at(RUN_AT - 1)}).json()
    assert all(r["occurred_at"] <= at(RUN_AT - 1) for r in before_run)
    assert {r["type"] for r in before_run} >= {"CampaignReady", "MessageStatusChanged"}
    assert "CampaignRunStarted" not in {r["type"] for r in before_run}
    page = http.get(f"/campaigns/{SMS_ID}/history", params={"limit": 3, "offset": 2}).json()
    assert page == records[2:5]
    assert http.get(f"/campaigns/{uuid.uuid4()}/history").status_code == 404


def test_message_history(http):
    message_id = ids.message_id(SMS_ID, 3)
    records = http.get(f"/campaigns/{SMS_ID}/messages/{message_id}/history").json()
    assert [r["status"] for r in records] == ["waiting", "queued", "sending", "failed"]
    assert records[-1]["reason"] == "invalid_destination"
    assert http.get(f"/campaigns/{EMAIL_ID}/messages/{message_id}/history").status_code == 404


# ------------------------------------------------------------------ live progress (SSE)

def sse_events(lines):
    """(event, data) pairs of an SSE stream (comments and pings skipped)."""
    event, data = None, []
    for line in lines:
        if line == "":
            if data:
                yield event or "message", json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_progress_stream_emits_changes_and_ends_when_final(http, read_model):
    contacts = [(2, "+15555550200", {}), (3, "+15555550201", {})]
    events, statuses = ready_campaign(LIVE_ID, contacts, name="Live", start=1000)
    events.append(campaign_event(LIVE_ID, 30, "CampaignStatusChanged", 1100, status="in_progress",
                                 previous_status="ready", stopped=False, counts=counts(queued=2)))
    statuses += [status_record(LIVE_ID, row, 20, "queued", 1100, "waiting") for row in (2, 3)]
    read_model.apply_batch(events, statuses)
    seen = []
    with http.stream("GET", f"/campaigns/{LIVE_ID}/progress") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        stream = sse_events(response.iter_lines())
        kind, first = next(stream)
        assert kind == "progress" and first["status"] == "in_progress" and first["counts"]["queued"] == 2
        seen.append(first)
        read_model.apply_batch([], [status_record(LIVE_ID, 2, 30, "delivered", 1110, "queued", attempt=1)])
        _, second = next(stream)
        assert second["counts"]["delivered"] == 1 and second["counts"]["queued"] == 1 and not second["final"]
        seen.append(second)
        # The final status is read before its last message's change (two topics): not the end yet.
        read_model.apply_batch(
            [campaign_event(LIVE_ID, 40, "CampaignStatusChanged", 1120, status="complete_with_errors",
                            previous_status="in_progress", stopped=False, counts=counts(delivered=1, failed=1))], [])
        _, third = next(stream)
        assert third["status"] == "complete_with_errors" and not third["final"] and third["counts"]["queued"] == 1
        seen.append(third)
        read_model.apply_batch([], [status_record(LIVE_ID, 3, 30, "failed", 1120, "queued", reason="blocked",
                                                  attempt=1)])
        rest = list(stream)  # the stream ends by itself once the counts have caught up
    assert rest[-1][1]["final"] is True and rest[-1][1]["status"] == "complete_with_errors"
    assert rest[-1][1]["counts"]["failed"] == 1
    assert all(kind == "progress" for kind, _ in rest)
    snapshots = seen + [data for _, data in rest]
    assert all(a != b for a, b in zip(snapshots, snapshots[1:]))  # an event only when something changed
    assert http.get(f"/campaigns/{uuid.uuid4()}/progress").status_code == 404


# ------------------------------------------------------------------ commands

@pytest.fixture(scope="module")
async def commands_tail(settings):
    tail = await Tail(settings, topics.COMMANDS).start()
    yield tail
    await tail.stop()


async def published(tail: Tail, command_ids: list[str], timeout_s: float = 20) -> list[dict]:
    wanted = set(command_ids)

    def found():
        records = [v for v in tail.values(topics.COMMANDS) if isinstance(v, dict) and v.get("command_id") in wanted]
        return records if {r["command_id"] for r in records} == wanted else None

    records = await async_wait_until(found, timeout_s, message=f"commands {wanted} not on {topics.COMMANDS}")
    by_id = {r["command_id"]: r for r in records}
    return [by_id[c] for c in command_ids]


@pytest.fixture
async def api(server, tokens):
    async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=as_role(tokens, "admin")) as client:
        yield client


def _keyed_records(tail: Tail, command_id: str):
    return [r for r, v in tail.records[topics.COMMANDS] if isinstance(v, dict) and v.get("command_id") == command_id]


async def test_each_command_endpoint_publishes_its_command_as_the_token_principal(api, commands_tail):
    campaign_id = str(uuid.uuid4())
    calls = [
        ("PUT", f"/campaigns/{campaign_id}/template",
         {"template": {"body": "Hello {{first_name}}"}, "issued_by": "mallory"}, "UpdateTemplate"),
        ("POST", f"/campaigns/{campaign_id}/run",
         {"disclaimer": {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True},
          "issued_by": "mallory"}, "RunCampaign"),
        ("POST", f"/campaigns/{campaign_id}/stop", {"confirmed": True}, "StopCampaign"),
        ("POST", f"/campaigns/{campaign_id}/retry",
         {"message_ids": [ids.message_id(campaign_id, 2)], "include_cancelled": True}, "RetryFailedMessages"),
        ("DELETE", f"/campaigns/{campaign_id}", None, "DeleteCampaign"),
    ]
    accepted = []
    for method, url, body, command_type in calls:
        response = await api.request(method, url, json=body)
        assert response.status_code == 202, response.text
        answer = response.json()
        assert answer["campaign_id"] == campaign_id and answer["command_type"] == command_type
        accepted.append(answer["command_id"])
    records = await published(commands_tail, accepted)
    for record, (_, _, body, command_type) in zip(records, calls):
        parse_command(json.dumps(record))  # valid by the contract
        assert record["type"] == command_type and record["campaign_id"] == campaign_id
        assert record["issued_by"] == "admin-user"  # from the token, never from the body
        assert record["issued_via"] == "api"  # authenticated: not a producer's assertion
    assert records[0]["template"] == {"body": "Hello {{first_name}}"}
    assert records[1]["disclaimer"] == calls[1][2]["disclaimer"]
    assert records[2]["confirmed"] is True
    assert records[3]["message_ids"] == [ids.message_id(campaign_id, 2)] and records[3]["include_cancelled"] is True
    for command_id in accepted:  # keyed by campaign_id
        assert {r.key for r in _keyed_records(commands_tail, command_id)} == {campaign_id.encode()}


async def test_commands_pass_confirmations_through_and_refuse_what_the_schema_refuses(api, commands_tail):
    campaign_id = str(uuid.uuid4())
    # false confirmations are published: the handler answers stop_not_confirmed / disclaimer_not_accepted
    stop = await api.post(f"/campaigns/{campaign_id}/stop", json={"confirmed": False})
    run = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": {"consent": True}})
    assert stop.status_code == run.status_code == 202
    stop_record, run_record = await published(commands_tail, [stop.json()["command_id"], run.json()["command_id"]])
    assert stop_record["confirmed"] is False and run_record["disclaimer"]["opt_out"] is False
    refused = [
        await api.post(f"/campaigns/{campaign_id}/stop", json={}),  # confirmation must be stated
        await api.post(f"/campaigns/{campaign_id}/stop", json={"confirmed": "yes"}),  # no coercion
        await api.post(f"/campaigns/{campaign_id}/run", json={}),
        await api.put(f"/campaigns/{campaign_id}/template", json={"template": {"body": ""}}),
        await api.put(f"/campaigns/{campaign_id}/template", json={"template": {"subject": "x"}}),
        await api.post(f"/campaigns/{campaign_id}/retry", json={"message_ids": ["NOT-AN-ID"]}),
        await api.post("/campaigns/not-an-id/run", json={"disclaimer": {}}),
    ]
    assert [r.status_code for r in refused] == [422] * len(refused)


CSV_HEADER = "first_name,phone,city,ignored\n"


def contacts_csv(n: int) -> bytes:
    lines = [CSV_HEADER]
    for i in range(n):
        lines.append(f"P{i},+1{200 + i % 800}{555 + i // 800:03d}{i % 10000:04d},C{i},x\n")
        if i == 2:
            lines.append("\n")  # a blank line: skipped, but it counts in the physical line numbers
    return "".join(lines).encode()


async def test_create_from_csv_publishes_create_then_chunks_with_mapping_and_line_numbers(api, commands_tail):
    response = await api.post("/campaigns", files={"contacts": ("people.csv", contacts_csv(1500), "text/csv")}, data={
        "name": "Upload", "channel": "sms", "template": json.dumps({"body": "Hi {{name}}"}), "description": "d",
        "destination_column": "phone", "variables": json.dumps({"first_name": "name", "city": "town"}),
        "consent_confirmed": "true", "issued_by": "mallory"})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["contacts"] == 1500 and accepted["has_header"] is True
    assert accepted["destination_column"] == "phone" and accepted["variables"] == {"first_name": "name",
                                                                                    "city": "town"}
    assert len(accepted["contacts_command_ids"]) == 2
    create, *chunks = await published(commands_tail, [accepted["command_id"], *accepted["contacts_command_ids"]])
    assert create["type"] == "CreateCampaign" and create["name"] == "Upload" and create["description"] == "d"
    assert create["campaign_id"] == accepted["campaign_id"] and create["template"] == {"body": "Hi {{name}}"}
    assert {c["issued_by"] for c in (create, *chunks)} == {"admin-user"}
    assert {c["issued_via"] for c in (create, *chunks)} == {"api"}
    assert [c["chunk_no"] for c in chunks] == [0, 1] and [c["last_chunk"] for c in chunks] == [False, True]
    contacts = [contact for chunk in chunks for contact in chunk["contacts"]]
    assert len(contacts) == 1500 and len(chunks[0]["contacts"]) == 1000
    assert contacts[0] == {"row": 2, "destination": "+12005550000", "variables": {"name": "P0", "town": "C0"}}
    assert contacts[3]["row"] == 6  # after the blank line 5
    # the records were published in order on one partition: create, chunk 0, chunk 1
    offsets = [_keyed_records(commands_tail, c)[0].offset for c in [accepted["command_id"],
                                                                    *accepted["contacts_command_ids"]]]
    assert offsets == sorted(offsets)


async def test_create_refuses_without_consent_or_with_bad_input_and_publishes_nothing(api, commands_tail):
    good = {"name": "N", "channel": "sms", "template": json.dumps({"body": "Hi"}), "consent_confirmed": "true"}
    csv_file = {"contacts": ("c.csv", b"phone\n+15555550100\n", "text/csv")}
    before = len(commands_tail.values(topics.COMMANDS))
    cases = [
        ({**good, "consent_confirmed": "false"}, csv_file, "consent_confirmed"),
        ({k: v for k, v in good.items() if k != "consent_confirmed"}, csv_file, "consent_confirmed"),
        ({**good, "template": "{not json"}, csv_file, "template"),
        ({**good, "template": json.dumps({"subject": "email template on sms"})}, csv_file, "template"),
        ({**good, "channel": "fax"}, csv_file, "channel"),
        ({**good, "destination_column": "mobile"}, csv_file, "mobile"),
        ({**good, "variables": json.dumps({"nope": "x"})}, csv_file, "nope"),
        ({**good, "variables": "[1, 2]"}, csv_file, "variables"),
        (good, {"contacts": ("c.csv", "phone\n+1555\u00e9\n".encode("latin-1"), "text/csv")}, "UTF-8"),
        (good, None, "contacts"),
    ]
    for data, files, mentioned in cases:
        response = await api.post("/campaigns", data=data, files=files)
        assert response.status_code == 422, (data, response.text)
        assert mentioned in response.text, response.text
    await asyncio.sleep(1)  # anything wrongly published would have reached the tail by now
    assert len(commands_tail.values(topics.COMMANDS)) == before


STREAMED_CSV_CASES = [
    ("name,phone\nAnn,+15555550100\nBob,+15555550101\n", None),
    ("+15555550100,Ann\n+15555550101,Bob,extra\n", None),
    ("Ann,ann@example.com\n", None),
    ("5555550100,Ann\n+15555550101,Bob\n", None),
    ("First Name,Mobile,Email\nAnn,+15555550100,ann@example.com\n", "Email"),
    ("First Name,Mobile,Email\nAnn,+15555550100,ann@example.com\n", "email"),
    ("Ann,+15555550100\n", "2"),
    ('name,phone,note\r\nAnn,+15555550100,hi\r\n\r\nBob,+15555550101,"two\r\nlines"\r\nCy,,\r\n'
     'Di,+15555550103\r\n', None),
    ("\ufeffphone,name\n+15555550100,Ann\rold,mac\r\n,\n+15555550102,Cy,x,y\n", None),
    ("phone, ,name\n+15555550100,a,b\n", None),
    ("", None),
    ("\n\n", None),
]


@pytest.mark.parametrize("text,destination_column", STREAMED_CSV_CASES)
def test_streamed_upload_reads_the_same_contacts_as_the_cli(text, destination_column):
    from services.common.contacts_csv import parse_contacts_csv
    from services.api.contacts_upload import StreamedCsv

    expected = parse_contacts_csv(text, destination_column)
    streamed = StreamedCsv(io.BytesIO(text.encode()), destination_column)
    layout = streamed.inspect(envelope_bytes=300)
    chunks = list(streamed.chunks(envelope_bytes=300))
    assert [c for chunk in chunks for c in chunk] == expected.contacts
    assert layout.contacts == len(expected.contacts) and layout.chunks == len(chunks) == 1
    assert layout.has_header == expected.has_header and layout.destination_index == expected.destination_index
    assert list(layout.variables) == [c for i, c in enumerate(expected.columns) if i != expected.destination_index]


def test_streamed_upload_mapping_limits_and_chunks():
    from services.common.contacts_csv import CsvError
    from services.api.contacts_upload import MappingError, StreamedCsv

    text = "phone,first,last\n" + "".join(f"+1555{i:07d},F{i},L{i}\n" for i in range(2500)) + "+15559999999,a,b,c\n"
    streamed = StreamedCsv(io.BytesIO(text.encode()), None, {"first": " name ", "column_4": "extra"})
    layout = streamed.inspect(envelope_bytes=300)
    chunks = list(streamed.chunks(envelope_bytes=300))
    assert layout.contacts == 2501 and layout.chunks == 3 and [len(c) for c in chunks] == [1000, 1000, 501]
    assert chunks[0][0] == {"row": 2, "destination": "+15550000000", "variables": {"name": "F0"}}
    assert chunks[-1][-1]["variables"] == {"name": "a", "extra": "c"}  # a column beyond the header
    with pytest.raises(MappingError, match="nope"):
        StreamedCsv(io.BytesIO(text.encode()), None, {"nope": "x"}).inspect(300)
    with pytest.raises(MappingError, match="distinct"):
        StreamedCsv(io.BytesIO(text.encode()), None, {"first": "x", "last": "x"}).inspect(300)
    with pytest.raises(CsvError, match="UTF-8"):
        StreamedCsv(io.BytesIO(b"phone\n+1555\xe9\n"), None).inspect(300)
    with pytest.raises(CsvError, match="too large"):
        StreamedCsv(io.BytesIO(("phone\n+15550000000" + ("," + "x" * 100_000) * 10 + "\n").encode()),
                    None).inspect(300)


async def test_command_answer_pending_then_answered_or_rejected_with_wait(api, read_model):
    command_id = str(uuid.uuid4())
    pending = await api.get(f"/commands/{command_id}")
    assert pending.status_code == 202 and pending.json() == {"command_id": command_id, "state": "pending",
                                                             "events": []}
    started = time.monotonic()
    assert (await api.get(f"/commands/{command_id}", params={"wait": 0.6})).status_code == 202
    assert time.monotonic() - started >= 0.5

    campaign_id = str(uuid.uuid4())
    answer = [campaign_event(campaign_id, 10, "CampaignRunStarted", 2000, causation_id=command_id, run_no=1),
              campaign_event(campaign_id, 11, "CampaignStatusChanged", 2000, causation_id=command_id,
                             status="in_progress", previous_status="ready", stopped=False, counts=counts())]
    # Applied while the request waits: the first event a little later, the trailing status change after it.
    timer = threading.Timer(0.5, read_model.apply_batch, ([answer[0]], []))
    later = threading.Timer(0.8, read_model.apply_batch, ([answer[1]], []))
    timer.start(), later.start()
    waited = await api.get(f"/commands/{command_id}", params={"wait": 20})
    assert waited.status_code == 200
    assert waited.json()["state"] == "answered"
    assert [e["type"] for e in waited.json()["events"]] == ["CampaignRunStarted", "CampaignStatusChanged"]

    rejected_id = str(uuid.uuid4())
    read_model.apply_batch([campaign_event(campaign_id, 0, "CommandRejected", 2001, causation_id=rejected_id,
                                           command_id=rejected_id, command_type="StopCampaign",
                                           reason="stop_not_confirmed", detail="")], [])
    rejected = (await api.get(f"/commands/{rejected_id}", params={"wait": 5})).json()
    assert rejected["state"] == "rejected" and rejected["events"][0]["reason"] == "stop_not_confirmed"
    assert (await api.get(f"/commands/{command_id}", params={"wait": 61})).status_code == 422
    assert (await api.get("/commands/xyz")).status_code == 422


def test_commands_answer_503_when_the_broker_does_not_acknowledge(settings, read_model, tokens):
    from services.api.commands import CommandPublisher
    from services.common.embedded_broker import free_port

    nowhere = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    app = create_app(settings, publisher=CommandPublisher(nowhere, timeout_s=1))
    with BackgroundServer(app) as down, httpx.Client(base_url=down.url, timeout=30,
                                                      headers=as_role(tokens, "admin")) as client:
        response = client.post(f"/campaigns/{uuid.uuid4()}/stop", json={"confirmed": True})
        assert response.status_code == 503 and "did not acknowledge" in response.json()["detail"]
        assert client.get(f"/campaigns/{SMS_ID}").status_code == 200  # reads carry on without the broker


# ------------------------------------------------------------------ commands answered by the handler's answer

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}


def test_every_rejection_reason_has_its_status():
    from schemas.events import REJECTION_REASONS
    from services.api.commands import REJECTION_STATUS

    assert set(REJECTION_STATUS) == set(REJECTION_REASONS)
    assert {reason for reason, code in REJECTION_STATUS.items() if code == 404} == {"unknown_campaign"}
    assert {reason for reason, code in REJECTION_STATUS.items() if code == 409} == {
        "campaign_exists", "campaign_not_ready", "campaign_not_running", "not_editable", "not_deletable",
        "not_retryable", "contacts_closed", "too_many_contacts", "channel_busy"}
    assert {reason for reason, code in REJECTION_STATUS.items() if code == 422} == {
        "invalid_command", "disclaimer_not_accepted", "stop_not_confirmed", "no_valid_contacts",
        "attachments_not_ready", "nothing_to_retry"}


WAIT_S = 3


@pytest.fixture(scope="module")
def waiting_server(settings, read_model, tokens):
    """An app that waits for its commands' answers, which the tests write into the read model as the projections
    would (the ids are known beforehand: an Idempotency-Key fixes them)."""
    with BackgroundServer(create_app(settings, answer_wait_s=WAIT_S)) as running:
        yield running


@pytest.fixture
async def waiting_api(waiting_server, tokens):
    async with httpx.AsyncClient(base_url=waiting_server.url, timeout=60, headers=as_role(tokens, "admin")) as client:
        yield client


def rejected(campaign_id: str, command_id: str, command_type: str, reason: str, detail: str = "") -> dict:
    return campaign_event(campaign_id, 0, "CommandRejected", 3000, causation_id=command_id, command_id=command_id,
                          command_type=command_type, reason=reason, detail=detail)


async def test_a_rejected_command_is_answered_with_its_reason_and_status(waiting_api, read_model, commands_tail):
    from services.api import idempotency

    cases = [("POST", "run", {"disclaimer": ALL_TRUE}, "RunCampaign", "unknown_campaign", 404),
             ("POST", "run", {"disclaimer": {**ALL_TRUE, "opt_out": False}}, "RunCampaign",
              "disclaimer_not_accepted", 422),
             ("POST", "stop", {"confirmed": True}, "StopCampaign", "campaign_not_running", 409),
             ("POST", "retry", {}, "RetryFailedMessages", "nothing_to_retry", 422),
             ("PUT", "template", {"template": {"body": "Hi"}}, "UpdateTemplate", "not_editable", 409),
             ("DELETE", "", None, "DeleteCampaign", "not_deletable", 409),
             ("POST", "run", {"disclaimer": ALL_TRUE}, "RunCampaign", "channel_busy", 409)]
    for method, action, body, command_type, reason, code in cases:
        campaign_id, key = str(uuid.uuid4()), str(uuid.uuid4())
        command_id = idempotency.command_id("admin-user", command_type, campaign_id, key)
        read_model.apply_batch([rejected(campaign_id, command_id, command_type, reason, f"why: {reason}")], [])
        url = f"/campaigns/{campaign_id}" + (f"/{action}" if action else "")
        response = await waiting_api.request(method, url, json=body, headers={"Idempotency-Key": key})
        assert response.status_code == code, (reason, response.text)
        answer = response.json()
        assert answer["reason"] == reason and answer["detail"] == f"why: {reason}" and answer["state"] == "rejected"
        assert answer["command_id"] == command_id and answer["campaign_id"] == campaign_id
        assert answer["command_type"] == command_type and answer["events"][0]["type"] == "CommandRejected"
    # the command went to the handler all the same (the audit trail keeps the rejection)
    (record,) = await published(commands_tail, [command_id])
    assert record["type"] == "RunCampaign" and record["disclaimer"] == ALL_TRUE


async def test_a_command_answered_while_the_request_waits_is_202_with_its_answer(waiting_api, read_model):
    from services.api import idempotency

    campaign_id, key = str(uuid.uuid4()), str(uuid.uuid4())
    command_id = idempotency.command_id("admin-user", "RunCampaign", campaign_id, key)
    answer = [campaign_event(campaign_id, 10, "CampaignRunStarted", 3000, causation_id=command_id, run_no=1,
                             accepted_by="admin-user", disclaimer=ALL_TRUE, message_count=1, suppressed_count=0),
              campaign_event(campaign_id, 11, "CampaignStatusChanged", 3000, causation_id=command_id,
                             status="in_progress", previous_status="ready", stopped=False, counts=counts(queued=1))]
    first, later = (threading.Timer(0.5, read_model.apply_batch, ([answer[0]], [])),
                    threading.Timer(0.8, read_model.apply_batch, ([answer[1]], [])))
    first.start(), later.start()
    started = time.monotonic()
    response = await waiting_api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": ALL_TRUE},
                                      headers={"Idempotency-Key": key})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "answered" and body["command_id"] == command_id and body["command_type"] == "RunCampaign"
    assert [e["type"] for e in body["events"]] == ["CampaignRunStarted", "CampaignStatusChanged"]
    assert time.monotonic() - started < WAIT_S  # answered when the answer came, not at the end of the wait
    # the same request again (a retry): the stored answer at once
    again = await waiting_api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": ALL_TRUE},
                                   headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json() == body


async def test_a_command_not_answered_within_the_wait_is_202_pending(waiting_api):
    campaign_id = str(uuid.uuid4())
    started = time.monotonic()
    response = await waiting_api.post(f"/campaigns/{campaign_id}/stop", json={"confirmed": True})
    waited = time.monotonic() - started
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "pending" and body["events"] == [] and body["campaign_id"] == campaign_id
    assert WAIT_S - 0.1 <= waited < WAIT_S + 5, waited
    assert (await waiting_api.get(f"/commands/{body['command_id']}")).json()["state"] == "pending"


async def test_a_malformed_command_is_422_at_once_and_never_published(waiting_api, commands_tail, settings):
    campaign_id = str(uuid.uuid4())
    before = len(commands_tail.values(topics.COMMANDS))
    started = time.monotonic()
    malformed = [
        ("POST", f"/campaigns/{campaign_id}/run", {"json": {"disclaimer": {"consent": "yes"}}}),
        ("POST", f"/campaigns/{campaign_id}/run", {"content": b'{"disclaimer": {"consent": tr',
                                                   "headers": {"Content-Type": "application/json"}}),
        ("POST", f"/campaigns/{campaign_id}/stop", {"content": b'{"confirmed": "\xe9"}',  # not UTF-8
                                                    "headers": {"Content-Type": "application/json"}}),
        ("POST", "/campaigns/NOT-AN-ID/stop", {"json": {"confirmed": True}}),
        ("POST", f"/campaigns/{campaign_id}/retry", {"json": {"message_ids": ["x"]}}),
        ("PUT", f"/campaigns/{campaign_id}/template", {"json": {"template": {"body": "x" * 1601}}}),
        ("PUT", f"/campaigns/{campaign_id}/template", {"json": {"template": {"body": "Hi"}},
                                                       "headers": {"Idempotency-Key": "a\tb"}}),
        ("POST", "/campaigns", {"content": b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--\r\n",
                                "headers": {"Content-Type": "multipart/form-data; boundary=B"}}),
        ("POST", "/campaigns", {"content": b"x", "headers": {"Content-Type": "multipart/form-data"}}),
    ]
    for method, url, kwargs in malformed:
        response = await waiting_api.request(method, url, **kwargs)
        assert response.status_code == 422, (url, kwargs, response.text)
        assert "detail" in response.json()
    assert time.monotonic() - started < WAIT_S  # none waited for an answer
    await asyncio.sleep(1)  # anything wrongly published would have reached the tail by now
    assert len(commands_tail.values(topics.COMMANDS)) == before


async def test_a_csv_create_waits_for_the_create_and_the_last_chunk(waiting_api, read_model):
    from services.api import idempotency

    upload = {"files": {"contacts": ("c.csv", b"phone\n+15555550100\n+15555550101\n", "text/csv")},
              "data": {"name": "Waited", "channel": "sms", "template": '{"body": "Hi"}', "consent_confirmed": "true"}}
    key = str(uuid.uuid4())
    campaign_id = idempotency.created_campaign_id("admin-user", key)
    create_id = idempotency.command_id("admin-user", "CreateCampaign", campaign_id, key)
    chunk_id = idempotency.contacts_command_id("admin-user", campaign_id, key, 0)
    read_model.apply_batch([campaign_event(campaign_id, 10, "CampaignCreated", 4000, causation_id=create_id,
                                           name="Waited", description=None, channel="sms", template={"body": "Hi"},
                                           created_by="admin-user")], [])
    threading.Timer(0.5, read_model.apply_batch, ([
        campaign_event(campaign_id, 20, "ContactsAdded", 4001, causation_id=chunk_id, chunk_no=0, valid=2, invalid=0,
                       invalid_rows=[]),
        campaign_event(campaign_id, 21, "CampaignReady", 4001, causation_id=chunk_id, message_count=2),
        campaign_event(campaign_id, 22, "CampaignStatusChanged", 4001, causation_id=chunk_id, status="ready",
                       previous_status="created", stopped=False, counts=counts(waiting=2))], [])).start()
    response = await waiting_api.post("/campaigns", headers={"Idempotency-Key": key}, **upload)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "answered" and body["campaign_id"] == campaign_id and body["command_id"] == create_id
    assert [e["type"] for e in body["events"]] == ["CampaignCreated"]
    assert body["contacts_command_ids"] == [chunk_id]
    assert [e["type"] for e in body["contacts_events"]] == ["ContactsAdded", "CampaignReady", "CampaignStatusChanged"]

    # the same key with a bigger file: its new chunk is refused, and the create answers that rejection
    bigger = {**upload, "files": {"contacts": ("c.csv", b"phone\n" + b"".join(
        b"+1555555%04d\n" % i for i in range(1500)), "text/csv")}}
    chunk_1 = idempotency.contacts_command_id("admin-user", campaign_id, key, 1)
    read_model.apply_batch([rejected(campaign_id, chunk_1, "AddContacts", "contacts_closed", "the last chunk was "
                                                                                               "already added")], [])
    refused = await waiting_api.post("/campaigns", headers={"Idempotency-Key": key}, **bigger)
    assert refused.status_code == 409, refused.text
    assert refused.json()["reason"] == "contacts_closed" and refused.json()["command_id"] == chunk_1
    assert refused.json()["campaign_id"] == campaign_id and refused.json()["command_type"] == "AddContacts"


# ------------------------------------------------------------------ the HTTP of it

def test_a_method_not_allowed_names_every_method_of_the_path(http):
    for method, url, allowed in (("OPTIONS", f"/campaigns/{SMS_ID}", "GET, DELETE"), ("PATCH", "/campaigns", "GET, POST"),
                                 ("PUT", "/tokens", "GET, POST"), ("GET", f"/campaigns/{SMS_ID}/run", "POST"),
                                 ("POST", "/settings/channels/sms", "GET, PUT")):
        response = http.request(method, url)
        assert response.status_code == 405 and response.headers["allow"] == allowed, (method, url, response.headers)


def test_every_reference_of_the_openapi_document_resolves(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    refs = set(re.findall(r'"\$ref": ?"([^"]+)"', json.dumps(spec)))
    assert refs and all(ref.startswith("#/components/schemas/") for ref in refs), refs
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= set(spec["components"]["schemas"])
    progress = spec["paths"]["/campaigns/{campaign_id}/progress"]["get"]["responses"]["200"]["content"]
    assert progress["text/event-stream"]["schema"]["properties"]["counts"] == {"$ref": "#/components/schemas/Counts"}
    for path in ("/campaigns/{campaign_id}/run", "/campaigns/{campaign_id}/stop", "/campaigns/{campaign_id}/retry",
                 "/campaigns/{campaign_id}/template", "/campaigns/{campaign_id}", "/campaigns"):
        operation = spec["paths"][path]["delete" if path == "/campaigns/{campaign_id}" else
                                         "put" if path.endswith("template") else "post"]
        assert {"202", "404", "409", "422", "503"} <= set(operation["responses"]), path


# ------------------------------------------------------------------ channel settings

def test_channel_settings_are_write_only_encrypted_and_masked(server, tokens, settings):
    with httpx.Client(base_url=server.url, timeout=30, headers=as_role(tokens, "org_admin")) as client:
        secret = "tw-auth-token-0123456789abcdef"
        body = {"provider": "twilio", "credentials": {"account_sid": "AC1234567890abcdef1234567890abcd",
                                                      "auth_token": secret, "messaging_service_sid": "MG1"}}
        saved = client.put("/settings/channels/sms", json=body)
        assert saved.status_code == 200, saved.text
        shown = client.get("/settings/channels/sms").json()
        assert shown == saved.json()
        assert shown["source"] == "stored" and shown["provider"] == "twilio" and shown["updated_by"] == "org_admin-user"
        assert shown["credentials"] == {"account_sid": "****abcd", "auth_token": "****cdef", "messaging_service_sid":
                                        "****"}
        assert shown["applied_to_sender"] is True  # published on the broker
        assert secret not in json.dumps(shown)
        with ApiStore.open(settings) as store:
            raw = store.raw_credentials("sms")
            assert secret.encode() not in raw and b"auth_token" not in raw
            assert store.channel_settings("sms").credentials["auth_token"] == secret  # decrypts with the key
        key_file = settings.data_dir / "api-encryption.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert client.put("/settings/channels/sms", json={"provider": "sendgrid", "credentials": {}}).status_code == 422
        missing = client.put("/settings/channels/email", json={"provider": "sendgrid", "credentials": {}})
        assert missing.status_code == 422 and "api_key" in missing.text
        unexpected = client.put("/settings/channels/email", json={"provider": "sendgrid", "credentials": {
            "api_key": "SG.x", "colour": "red"}})
        assert unexpected.status_code == 422 and "colour" in unexpected.text
        assert client.get("/settings/channels/fax").status_code == 404  # a route per channel
        smtp = client.put("/settings/channels/email", json={"provider": "smtp", "credentials": {
            "host": "mail.example.org", "port": "587", "password": "correct horse battery"}}).json()
        assert smtp["provider"] == "smtp" and smtp["credentials"]["password"] == "****tery"


def test_healthz_needs_no_token(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
