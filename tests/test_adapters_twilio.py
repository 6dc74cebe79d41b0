"""TwilioAdapter against a real HTTP server (aiohttp, in the test) answering each Twilio status."""
from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from pydantic import SecretStr

from services.common.embedded_broker import free_port
from services.common.settings import Settings
from services.sender.twilio import TwilioAdapter
from tests.fakes import full_backlog, serving

SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "tw-auth-token-SECRET-5f2e"
MG = "MG0123456789abcdef0123456789abcdef"
HOOKS = "https://hooks.example.com/outreach"
TEMPLATE = {"body": "Hi {{name}}, see {{ missing }}"}

# destination -> what the server does
ACCEPT, REFUSE_21211, REFUSE_21610, THROTTLE, UNAVAILABLE, HANG, DROP = (
    "+15551230201", "+15005550001", "+15005550004", "+15551230429", "+15551230503", "+15551230000",
    "+15551230999")


class FakeTwilio:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self.messages)
        self.app.router.add_get("/2010-04-01/Accounts/{sid}.json", self.account)

    def authorized(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
        return request.match_info["sid"] == SID and request.headers.get("Authorization") == expected

    async def account(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.json_response({"code": 20003, "message": "Authenticate", "status": 401}, status=401)
        return web.json_response({"sid": SID, "status": "active"})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post())
        self.requests.append({"form": form, "authorization": request.headers.get("Authorization"),
                              "path": request.path, "content_type": request.content_type})
        if not self.authorized(request):
            return web.json_response({"code": 20003, "message": "Authenticate", "status": 401}, status=401)
        to = form["To"]
        if to == REFUSE_21211:
            return web.json_response({"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400},
                                     status=400)
        if to == REFUSE_21610:
            return web.json_response({"code": 21610, "message": "Attempt to send to unsubscribed recipient",
                                      "status": 400}, status=400)
        if to == THROTTLE:
            return web.json_response({"code": 20429, "message": "Too Many Requests", "status": 429}, status=429)
        if to == UNAVAILABLE:
            return web.Response(status=503, text="Service Unavailable")
        if to == HANG:
            await self.release.wait()
            return web.json_response({}, status=201)
        if to == DROP:
            request.transport.close()  # read the request, then hang up without an answer
            await self.release.wait()
            return web.Response(status=500)
        return web.json_response({"sid": "SM" + uuid.uuid4().hex, "status": "queued", "to": to}, status=201)


@pytest.fixture
async def twilio_server():
    fake = FakeTwilio()
    async with serving(fake.app, fake.release) as url:
        yield fake, url


def settings_for(url: str, tmp_path, token: str = TOKEN) -> Settings:
    return Settings(twilio_base_url=url, twilio_account_sid=SID, twilio_auth_token=SecretStr(token),
                    twilio_messaging_service_sid=MG, webhook_public_url=HOOKS, provider_concurrency=8,
                    data_dir=tmp_path)


def item(destination: str, attempt: int = 0, campaign_id: str | None = None) -> dict:
    value = {"message_id": str(uuid.uuid4()), "row": 2, "destination": destination,
             "variables": {"name": "Ada"}, "attempt": attempt}
    if campaign_id:
        value["campaign_id"] = campaign_id
    return value


def assert_no_secret(text: str) -> None:
    assert TOKEN not in text
    assert base64.b64encode(f"{SID}:{TOKEN}".encode()).decode() not in text


async def test_accepted_and_the_exact_request(twilio_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake, url = twilio_server
    campaign_id = str(uuid.uuid4())
    adapter = TwilioAdapter(settings_for(url, tmp_path))
    try:
        assert adapter.batch_size("sms") == 1
        sent = item(ACCEPT, attempt=2, campaign_id=campaign_id)
        results = await adapter.submit("sms", [sent], TEMPLATE)
    finally:
        await adapter.close()
    assert len(results) == 1
    result = results[0]
    assert set(result) >= {"message_id", "outcome", "attempt", "provider_code", "provider_message_id",
                           "occurred_at"}
    assert (result["message_id"], result["outcome"], result["attempt"], result["provider_code"]) == (
        sent["message_id"], "accepted", 3, None)
    assert result["provider_message_id"].startswith("SM") and len(result["provider_message_id"]) == 34
    (request,) = fake.requests
    assert request["path"] == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request["content_type"] == "application/x-www-form-urlencoded"
    assert request["authorization"] == "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    form = request["form"]
    assert set(form) == {"To", "Body", "MessagingServiceSid", "StatusCallback"}
    assert form["To"] == ACCEPT
    assert form["Body"] == "Hi Ada, see {{ missing }}"  # templating.render: no value stays literal
    assert form["MessagingServiceSid"] == MG
    callback = urlsplit(form["StatusCallback"])
    assert f"{callback.scheme}://{callback.netloc}{callback.path}" == f"{HOOKS}/twilio/status"
    assert parse_qs(callback.query) == {"message_id": [sent["message_id"]], "campaign_id": [campaign_id],
                                        "submission": ["3"]}  # the submission the status callbacks answer
    assert_no_secret(repr(results) + caplog.text)


async def test_each_status_maps_to_its_outcome(twilio_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake, url = twilio_server
    adapter = TwilioAdapter(settings_for(url, tmp_path))
    try:
        cases = {REFUSE_21211: ("refused", "21211"), REFUSE_21610: ("refused", "21610"),
                 THROTTLE: ("presend_error", "429"), UNAVAILABLE: ("presend_error", "503")}
        for destination, expected in cases.items():
            (result,) = await adapter.submit("sms", [item(destination)], TEMPLATE)
            assert (result["outcome"], result["provider_code"]) == expected, destination
            assert result["attempt"] == 1
            assert result["provider_message_id"] is None
            if result["outcome"] == "presend_error":
                assert result["final"] is False  # the dispatcher marks the last one
        all_results = []
        for destination in cases:  # one session, keep-alive: every request went on the same few connections
            all_results += await adapter.submit("sms", [item(destination)], TEMPLATE)
    finally:
        await adapter.close()
    assert len(fake.requests) == 2 * len(cases)
    assert_no_secret(repr(all_results) + caplog.text)


async def test_wrong_credentials_are_refused_20003_and_probe_fails(twilio_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    _fake, url = twilio_server
    wrong = "tw-WRONG-token-SECRET-77"
    adapter = TwilioAdapter(settings_for(url, tmp_path, token=wrong))
    try:
        (result,) = await adapter.submit("sms", [item(ACCEPT)], TEMPLATE)
        assert (result["outcome"], result["provider_code"]) == ("refused", "20003")
        assert await adapter.probe() is False
    finally:
        await adapter.close()
    assert wrong not in repr(result) + caplog.text + repr(adapter)


async def test_probe_is_an_account_lookup(twilio_server, tmp_path):
    fake, url = twilio_server
    adapter = TwilioAdapter(settings_for(url, tmp_path))
    try:
        assert await adapter.probe() is True
    finally:
        await adapter.close()
    assert fake.requests == []  # no message was sent


async def test_no_answer_after_the_request_was_sent(twilio_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake, url = twilio_server
    adapter = TwilioAdapter(settings_for(url, tmp_path), read_timeout_s=0.3)
    try:
        # Bounded: the 0.3 s read timeout ends it (how long it takes: bench/sender_timings.py).
        (hung,) = await asyncio.wait_for(adapter.submit("sms", [item(HANG)], TEMPLATE), 10)
        (dropped,) = await adapter.submit("sms", [item(DROP)], TEMPLATE)
        # the adapter is still usable afterwards
        (ok,) = await adapter.submit("sms", [item(ACCEPT)], TEMPLATE)
    finally:
        await adapter.close()
    assert (hung["outcome"], hung["provider_code"], hung["attempt"]) == ("no_answer", None, 1)
    assert (dropped["outcome"], dropped["provider_code"]) == ("no_answer", None)
    assert ok["outcome"] == "accepted"
    assert [r["form"]["To"] for r in fake.requests] == [HANG, DROP, ACCEPT]  # both reached the server
    assert_no_secret(repr([hung, dropped, ok]) + caplog.text)


async def test_connection_refused_is_presend(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    closed = f"http://127.0.0.1:{free_port()}"
    adapter = TwilioAdapter(settings_for(closed, tmp_path), connect_timeout_s=1)
    try:
        (result,) = await adapter.submit("sms", [item(ACCEPT, attempt=1)], TEMPLATE)
        assert await adapter.probe() is False
    finally:
        await adapter.close()
    assert (result["outcome"], result["provider_code"], result["attempt"]) == ("presend_error", "connect", 2)
    assert_no_secret(repr(result) + caplog.text)


async def test_dns_failure_is_presend(tmp_path):
    adapter = TwilioAdapter(settings_for("http://no-such-host.invalid", tmp_path), connect_timeout_s=2)
    try:
        (result,) = await adapter.submit("sms", [item(ACCEPT)], TEMPLATE)
    finally:
        await adapter.close()
    assert (result["outcome"], result["provider_code"]) == ("presend_error", "connect")


async def test_connect_timeout_is_presend_not_no_answer(tmp_path):
    """A listener whose accept backlog is full: the TCP handshake does not complete, so the connect
    timeout (not the read timeout) fires: nothing was sent, a pre-send error."""
    with full_backlog() as port:
        adapter = TwilioAdapter(settings_for(f"http://127.0.0.1:{port}", tmp_path), connect_timeout_s=0.3,
                                read_timeout_s=30)
        try:
            # Bounded well below the 30 s read timeout; how long it takes: bench/sender_timings.py.
            (result,) = await asyncio.wait_for(adapter.submit("sms", [item(ACCEPT)], TEMPLATE), 10)
        finally:
            await adapter.close()
    assert (result["outcome"], result["provider_code"]) == ("presend_error", "connect")
