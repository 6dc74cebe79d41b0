"""SendGridAdapter against a real HTTP server (aiohttp, in the test) answering each Mail Send status."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiohttp import web
from pydantic import SecretStr

from services.common.embedded_broker import free_port
from services.common.settings import Settings
from services.common.templating import render_email
from services.common.unsubscribe import unsubscribe_url, verify_unsubscribe
from services.sender.sendgrid import SendGridAdapter
from tests.fakes import serving

API_KEY = "SG.api-key-SECRET-9d41e"
UNSUB_SECRET = "unsub-secret-SECRET-1c"
HOOKS = "https://hooks.example.com/outreach"
TEMPLATE = {"subject": "Hello {{name}} & co", "html": "<p>Hi {{ name }} from {{city}}, {{name}}! {{ missing }}</p>",
            "from_email": "team@example.com", "from_name": "The Team", "reply_to": "help@example.com",
            "attachments": []}


class FakeSendGrid:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.release = asyncio.Event()
        self.app = web.Application(client_max_size=32 * 1024 ** 2)
        self.app.router.add_post("/v3/mail/send", self.send)
        self.app.router.add_get("/v3/user/account", self.account)

    @staticmethod
    def authorized(request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {API_KEY}"

    async def account(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.json_response({"errors": [{"message": "authorization required"}]}, status=401)
        return web.json_response({"type": "free", "reputation": 100})

    async def send(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"body": body, "authorization": request.headers.get("Authorization"),
                              "content_type": request.content_type})
        if not self.authorized(request):
            return web.json_response({"errors": [{"message": "The provided authorization grant is invalid"}]},
                                     status=401)
        local = body["personalizations"][0]["to"][0]["email"].split("@")[0]
        status = {"forbidden": 403, "throttle": 429, "unavailable": 503, "bad": 400}.get(local)
        if status:
            return web.json_response({"errors": [{"message": local}]}, status=status)
        if local == "hang":
            await self.release.wait()
        if local == "drop":
            request.transport.close()
            await self.release.wait()
        return web.Response(status=202, headers={"X-Message-Id": "xmsg-" + uuid.uuid4().hex[:16]})


@pytest.fixture
async def sendgrid_server():
    fake = FakeSendGrid()
    async with serving(fake.app, fake.release) as url:
        yield fake, url


def settings_for(url: str, tmp_path, key: str = API_KEY, batch: int = 1000) -> Settings:
    return Settings(sendgrid_base_url=url, sendgrid_api_key=SecretStr(key), webhook_public_url=HOOKS,
                    unsubscribe_secret=SecretStr(UNSUB_SECRET), email_batch=batch, provider_concurrency=8,
                    data_dir=tmp_path)


def item(destination: str, campaign_id: str, n: int = 1, attempt: int = 0, **variables: str) -> dict:
    return {"message_id": str(uuid.uuid4()), "row": n + 1, "destination": destination, "campaign_id": campaign_id,
            "variables": variables or {"name": f"Ada <{n}>", "city": "Zürich"}, "attempt": attempt}


def assert_no_secret(text: str) -> None:
    assert API_KEY not in text
    assert UNSUB_SECRET not in text


def substitute(text: str, substitutions: dict[str, str]) -> str:
    """What SendGrid does with classic substitution tags (each tag replaced by its value)."""
    for tag, value in substitutions.items():
        text = text.replace(tag, value)
    return text


async def test_one_call_carries_1000_personalizations(sendgrid_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake, url = sendgrid_server
    settings = settings_for(url, tmp_path)
    campaign_id = str(uuid.uuid4())
    items = [item(f"user{n}@example.com", campaign_id, n) for n in range(1000)]
    adapter = SendGridAdapter(settings, unsubscribe_mailto="unsubscribe@example.com")
    try:
        assert adapter.batch_size("email") == 1000
        results = await adapter.submit("email", items, TEMPLATE)
    finally:
        await adapter.close()

    (request,) = fake.requests  # one provider call
    assert request["authorization"] == f"Bearer {API_KEY}"
    assert request["content_type"] == "application/json"
    body = request["body"]
    assert body["from"] == {"email": "team@example.com", "name": "The Team"}
    assert body["reply_to"] == {"email": "help@example.com"}
    assert [c["type"] for c in body["content"]] == ["text/html"]
    assert len(body["personalizations"]) == 1000
    for sent, personalization in zip(items, body["personalizations"]):
        assert personalization["to"] == [{"email": sent["destination"]}]
        assert personalization["custom_args"] == {"message_id": sent["message_id"], "campaign_id": campaign_id,
                                                  "submission": str(sent["attempt"] + 1)}  # this submission's number
        subject, html = render_email(TEMPLATE["subject"], TEMPLATE["html"], sent["variables"])
        # what the recipient gets is exactly render_email's (subject per personalization, HTML by substitution)
        assert personalization["subject"] == subject
        assert substitute(body["content"][0]["value"], personalization["substitutions"]) == html
        headers = personalization["headers"]
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        link, mailto = [part.strip().strip("<>") for part in headers["List-Unsubscribe"].split(",")]
        assert mailto == "mailto:unsubscribe@example.com"
        assert link == unsubscribe_url(settings, campaign_id, sent["message_id"], sent["destination"])
        parts = urlsplit(link)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{HOOKS}/unsubscribe"
        assert verify_unsubscribe(settings, dict(parse_qsl(parts.query))) == (
            campaign_id, sent["message_id"], sent["destination"])
    first = body["personalizations"][0]
    assert first["subject"] == "Hello Ada <0> & co"
    assert substitute(body["content"][0]["value"], first["substitutions"]) == (
        "<p>Hi Ada &lt;0&gt; from Zürich, Ada &lt;0&gt;! {{ missing }}</p>")

    assert len(results) == 1000
    x_message_id = results[0]["provider_message_id"]
    assert x_message_id.startswith("xmsg-")
    for sent, result in zip(items, results):
        assert (result["message_id"], result["outcome"], result["attempt"], result["provider_code"],
                result["provider_message_id"]) == (sent["message_id"], "accepted", 1, None, x_message_id)
        assert result["occurred_at"].endswith("Z")
    assert_no_secret(repr(results) + caplog.text + repr(adapter))


async def test_batch_size_follows_email_batch(tmp_path):
    adapter = SendGridAdapter(settings_for("http://127.0.0.1:9", tmp_path, batch=250))
    assert adapter.batch_size("email") == 250
    await adapter.close()


async def test_unsubscribe_links_refuse_tampering(tmp_path):
    settings = settings_for("http://127.0.0.1:9", tmp_path)
    campaign_id, message_id = str(uuid.uuid4()), str(uuid.uuid4())
    params = dict(parse_qsl(urlsplit(unsubscribe_url(settings, campaign_id, message_id, "a@example.com")).query))
    assert verify_unsubscribe(settings, params) == (campaign_id, message_id, "a@example.com")
    assert UNSUB_SECRET not in json.dumps(params)
    for name, value in [("destination", "b@example.com"), ("message_id", str(uuid.uuid4())),
                        ("campaign_id", str(uuid.uuid4())), ("sig", "0" * 64), ("v", "2")]:
        assert verify_unsubscribe(settings, {**params, name: value}) is None, name
    assert verify_unsubscribe(settings, {k: v for k, v in params.items() if k != "sig"}) is None
    assert verify_unsubscribe(settings, {}) is None
    other = Settings(webhook_public_url=HOOKS, unsubscribe_secret=SecretStr("another"), data_dir=tmp_path)
    assert verify_unsubscribe(other, params) is None


async def test_each_status_maps_to_its_outcome_for_every_message(sendgrid_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake, url = sendgrid_server
    campaign_id = str(uuid.uuid4())
    adapter = SendGridAdapter(settings_for(url, tmp_path))
    cases = {"forbidden": ("refused", "403"), "throttle": ("presend_error", "429"),
             "unavailable": ("presend_error", "503"), "bad": ("refused", "http_400")}
    all_results = []
    try:
        for local, expected in cases.items():
            items = [item(f"{local}@example.com", campaign_id, 0)] + [
                item(f"other{n}@example.com", campaign_id, n, attempt=1) for n in range(1, 4)]
            results = await adapter.submit("email", items, TEMPLATE)
            all_results += results
            assert [r["message_id"] for r in results] == [i["message_id"] for i in items]
            assert {(r["outcome"], r["provider_code"]) for r in results} == {expected}, local
            assert [r["attempt"] for r in results] == [1, 2, 2, 2]
            assert all(r["provider_message_id"] is None for r in results)
    finally:
        await adapter.close()
    assert len(fake.requests) == len(cases)
    assert_no_secret(repr(all_results) + caplog.text)


async def test_wrong_key_is_refused_401_and_probe(sendgrid_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    _fake, url = sendgrid_server
    wrong = "SG.WRONG-key-SECRET-00"
    campaign_id = str(uuid.uuid4())
    bad = SendGridAdapter(settings_for(url, tmp_path, key=wrong))
    good = SendGridAdapter(settings_for(url, tmp_path))
    try:
        results = await bad.submit("email", [item(f"u{n}@example.com", campaign_id, n) for n in range(3)],
                                   TEMPLATE)
        assert {(r["outcome"], r["provider_code"]) for r in results} == {("refused", "401")}
        assert await bad.probe() is False
        assert await good.probe() is True
    finally:
        await bad.close()
        await good.close()
    assert wrong not in repr(results) + caplog.text


async def test_no_answer_and_connection_refused(sendgrid_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake, url = sendgrid_server
    campaign_id = str(uuid.uuid4())
    adapter = SendGridAdapter(settings_for(url, tmp_path), read_timeout_s=0.3)
    closed = SendGridAdapter(settings_for(f"http://127.0.0.1:{free_port()}", tmp_path), connect_timeout_s=1)
    try:
        hung = await adapter.submit("email", [item("hang@example.com", campaign_id),
                                              item("x@example.com", campaign_id, 2)], TEMPLATE)
        dropped = await adapter.submit("email", [item("drop@example.com", campaign_id)], TEMPLATE)
        ok = await adapter.submit("email", [item("fine@example.com", campaign_id)], TEMPLATE)
        refused = await closed.submit("email", [item("a@example.com", campaign_id),
                                                item("b@example.com", campaign_id, 2)], TEMPLATE)
        assert await closed.probe() is False
    finally:
        await adapter.close()
        await closed.close()
    assert [(r["outcome"], r["provider_code"]) for r in hung] == [("no_answer", None)] * 2
    assert [(r["outcome"], r["provider_code"]) for r in dropped] == [("no_answer", None)]
    assert ok[0]["outcome"] == "accepted"
    assert [(r["outcome"], r["provider_code"]) for r in refused] == [("presend_error", "connect")] * 2
    assert len(fake.requests) == 3
    assert_no_secret(repr(hung + dropped + ok + refused) + caplog.text)


async def test_a_value_that_looks_like_a_tag_is_not_expanded(tmp_path):
    adapter = SendGridAdapter(settings_for("http://127.0.0.1:9", tmp_path))
    template = {**TEMPLATE, "html": "<p>-outreach-0- {{name}}</p>", "subject": "{{name}}"}
    campaign_id = str(uuid.uuid4())
    sent = item("a@example.com", campaign_id, name="{{city}} -outreach-0-", city="X")
    body = adapter.request_body([sent], template)
    await adapter.close()
    personalization = body["personalizations"][0]
    subject, html = render_email(template["subject"], template["html"], sent["variables"])
    assert personalization["subject"] == subject == "{{city}} -outreach-0-"
    content = body["content"][0]["value"]
    assert "-outreach-0-" in content  # the template's own text: the tags moved to another prefix
    (tag,) = personalization["substitutions"]
    assert content.replace(tag, personalization["substitutions"][tag]) == html
