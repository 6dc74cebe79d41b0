"""The webhook receiver (services/webhook_receiver/) over real HTTP against the session broker.

Signature checks are tested as pure functions with published vectors: Twilio's (its helper library's
RequestValidator tests, the example of Twilio's security docs) and SendGrid's (sendgrid-python's EventWebhook
tests). The receiver tests read `outreach.internal.sender-results` and `outreach.internal.opt-outs` from the
beginning (the broker is shared), so each test uses fresh campaign ids and destinations, and waits for a
marker record published after the requests under test before asserting what is absent.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from urllib.parse import urlencode

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import MultiDict
from yarl import URL

from schemas import internal, topics
from services.common import webhook_signatures as sigs
from services.common.embedded_broker import free_port
from services.common.ids import OUTREACH_NS
from services.common.settings import Settings
from services.webhook_receiver.app import build_broker, running
from services.webhook_receiver.publishing import Outbox
from services.webhook_receiver.routes import SeenEvents, create_app
from services.webhook_receiver.signatures import CallbackSecrets
from tests.conftest import async_wait_until
from tests.e2e_support import Tail
from tests.fakes import FakePublishers

TOKEN = "test-auth-token-for-webhooks"
PRIVATE_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY_B64 = base64.b64encode(PRIVATE_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


# ------------------------------------------------------------------ pure: signature vectors

# Twilio's security docs / twilio-python tests/unit/test_request_validator.py
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
                 "From": "+14158675309", "To": "+18005551212"}


def test_twilio_signature_matches_twilios_published_example():
    assert sigs.twilio_signature("12345", TWILIO_URL, TWILIO_PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert sigs.verify_twilio_signature("12345", TWILIO_URL, TWILIO_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    # A repeated name contributes each value, sorted (twilio-python's duplicate MultiDict vector).
    repeated = MultiDict([("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234")])
    assert sigs.twilio_signature("12345", TWILIO_URL, repeated.items()) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


@pytest.mark.parametrize("token, url, params, signature", [
    ("12346", TWILIO_URL, TWILIO_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # other token
    ("12345", TWILIO_URL.replace("foo=1", "foo=2"), TWILIO_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # query
    ("12345", TWILIO_URL, {**TWILIO_PARAMS, "Digits": "1235"}, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # param
    ("12345", TWILIO_URL, TWILIO_PARAMS, None),  # header missing
    ("12345", TWILIO_URL, TWILIO_PARAMS, ""),
    ("12345", TWILIO_URL, TWILIO_PARAMS, "ünïcode"),
])
def test_twilio_signature_rejects(token, url, params, signature):
    assert not sigs.verify_twilio_signature(token, url, params, signature)


# sendgrid-python test/unit/test_eventwebhook.py
SG_PUBLIC_KEY = ("MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNN"
                 "RaINXvVpiglSI8eNEc6wEA3F+g==")
SG_SIGNATURE = ("MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM=")
SG_TIMESTAMP = "1600112502"
SG_PAYLOAD = (json.dumps([{
    "email": "hello@world.com", "event": "dropped", "reason": "Bounced Address",
    "sg_event_id": "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
    "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
    "smtp-id": "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>", "timestamp": 1600112492,
}], sort_keys=True, separators=(",", ":")) + "\r\n").encode()


def test_sendgrid_signature_matches_sendgrids_published_example():
    key = sigs.load_sendgrid_public_key(SG_PUBLIC_KEY)
    assert sigs.verify_sendgrid_signature(key, SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP)
    assert not sigs.verify_sendgrid_signature(key, SG_PAYLOAD, SG_SIGNATURE, "1600112503")
    assert not sigs.verify_sendgrid_signature(key, b"payload", SG_SIGNATURE, SG_TIMESTAMP)
    assert not sigs.verify_sendgrid_signature(key, SG_PAYLOAD, None, SG_TIMESTAMP)
    assert not sigs.verify_sendgrid_signature(key, SG_PAYLOAD, SG_SIGNATURE, None)
    assert not sigs.verify_sendgrid_signature(key, SG_PAYLOAD, "not base64!", SG_TIMESTAMP)
    bad = ("MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH3j/0=")
    assert not sigs.verify_sendgrid_signature(key, SG_PAYLOAD, bad, SG_TIMESTAMP)
    other = sigs.load_sendgrid_public_key(PUBLIC_KEY_B64)
    assert not sigs.verify_sendgrid_signature(other, SG_PAYLOAD, SG_SIGNATURE, SG_TIMESTAMP)


def test_sendgrid_key_forms_and_round_trip():
    pem = PRIVATE_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for form in (PUBLIC_KEY_B64, pem, PRIVATE_KEY.public_key()):
        key = sigs.load_sendgrid_public_key(form)
        signature = sigs.sendgrid_signature(PRIVATE_KEY, b"[]", "123")
        assert sigs.verify_sendgrid_signature(key, b"[]", signature, "123")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad in (base64.b64encode(p384).decode(), "not a key", ""):
        with pytest.raises(ValueError):
            sigs.load_sendgrid_public_key(bad)


def test_seen_events_is_bounded_lru():
    seen = SeenEvents(max_size=3)
    for event_id in "abc":
        seen.add(event_id)
    assert "a" in seen  # touched: now the most recent
    seen.add("d")
    assert len(seen) == 3 and "b" not in seen and "a" in seen and "c" in seen and "d" in seen


def test_untrusted_values_count_as_absent_when_of_the_wrong_type_and_are_clipped():
    from services.webhook_receiver.callbacks import MAX_CODE_CHARS, clipped, destination, submission_number, text

    assert [text(v) for v in ("  a ", 7, 2.5, "", " ", None, True, [1], {"a": 1})] == [
        "a", "7", "2.5", None, None, None, None, None, None]
    assert len(clipped("x" * 10_000)) == MAX_CODE_CHARS and clipped(["x"]) is None
    assert destination("+12025550100") == "+12025550100" and destination("9" * 400) is None
    assert [submission_number(v) for v in ("3", 3, "0", "9" * 5000, "1e3", True, "٣", 2**31)] == [
        3, 3, None, None, None, None, None, None]


def test_remembered_event_ids_are_namespaced_and_bounded():
    from services.webhook_receiver.routes import MAX_KEY_CHARS, event_key

    assert event_key("sendgrid", "abc") == "abc"  # as stored before inbound messages were remembered too
    assert event_key("twilio-inbound", "SM1") == "twilio-inbound:SM1"
    long_ids = [event_key("sendgrid", "x" * 1000), event_key("sendgrid", "x" * 999 + "y")]
    assert all(len(key) <= MAX_KEY_CHARS for key in long_ids) and long_ids[0] != long_ids[1]


def test_sendgrid_key_defaults_to_the_simulators():
    from services.simulator.signing import SIMULATOR_SENDGRID_PRIVATE_KEY_PEM

    key = CallbackSecrets(Settings(sendgrid_webhook_public_key=None)).sendgrid_key()
    simulator_private = serialization.load_pem_private_key(SIMULATOR_SENDGRID_PRIVATE_KEY_PEM, password=None)
    assert key.public_numbers() == simulator_private.public_key().public_numbers()


def test_the_receiver_publishes_through_faststream_publishers_of_its_two_topics():
    from faststream.specification import AsyncAPI

    document = json.loads(AsyncAPI(build_broker(Settings()), schema_version="3.0.0").to_specification().to_json())
    assert {name: (channel["address"], document["operations"][name]["action"])
            for name, channel in document["channels"].items()} == {
        "senderResults": (topics.SENDER_RESULTS, "send"), "optOuts": (topics.OPT_OUTS, "send")}


# ------------------------------------------------------------------ the receiver over HTTP

class Client:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession, tail: Tail):
        self.settings = settings
        self.session = session
        self.tail = tail
        self.base = f"http://{settings.webhook_host}:{settings.webhook_port}"

    async def twilio(self, path_qs: str, form: dict, *, signature: str | None = "valid",
                     token: str = TOKEN) -> aiohttp.ClientResponse:
        headers = {}
        if signature == "valid":
            headers[sigs.TWILIO_SIGNATURE_HEADER] = sigs.twilio_signature(token, self.settings.webhook_url + path_qs,
                                                                          form)
        elif signature is not None:
            headers[sigs.TWILIO_SIGNATURE_HEADER] = signature
        async with self.session.post(URL(self.base + path_qs, encoded=True), data=form, headers=headers) as resp:
            await resp.read()
            return resp

    async def twilio_text(self, path_qs: str, form: dict) -> tuple[int, str, str]:
        headers = {sigs.TWILIO_SIGNATURE_HEADER:
                   sigs.twilio_signature(TOKEN, self.settings.webhook_url + path_qs, form)}
        async with self.session.post(URL(self.base + path_qs, encoded=True), data=form, headers=headers) as resp:
            return resp.status, resp.content_type, await resp.text()

    async def sendgrid(self, events: list[dict] | bytes, *, key=PRIVATE_KEY, timestamp: str | None = None,
                       signed_timestamp: str | None = None) -> int:
        body = events if isinstance(events, bytes) else json.dumps(events).encode() + b"\r\n"
        timestamp = timestamp or str(int(time.time()))
        headers = {sigs.SENDGRID_SIGNATURE_HEADER: sigs.sendgrid_signature(key, body, signed_timestamp or timestamp),
                   sigs.SENDGRID_TIMESTAMP_HEADER: timestamp, "Content-Type": "application/json"}
        async with self.session.post(self.base + "/sendgrid/events", data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    # -- what reached the broker

    def result_records(self, campaign_id: str) -> list[dict]:
        return [v for v in self.tail.values(topics.SENDER_RESULTS)
                if isinstance(v, dict) and v.get("campaign_id") == campaign_id]

    def results(self, campaign_id: str) -> list[dict]:
        return [r for v in self.result_records(campaign_id) for r in v["results"]]

    def results_of(self, campaign_id: str, message_id: str) -> list[dict]:
        return [r for r in self.results(campaign_id) if r["message_id"] == message_id]

    def opt_outs(self, destination: str) -> list[dict]:
        return [v for v in self.tail.values(topics.OPT_OUTS) if isinstance(v, dict) and v["destination"] == destination]

    async def wait(self, predicate, timeout_s: float = 10, message: str = ""):
        return await async_wait_until(predicate, timeout_s, message=message or "records never arrived")


@pytest.fixture(scope="module")
async def client(kafka_bootstrap, tmp_path_factory):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, webhook_host="127.0.0.1", webhook_port=free_port(),
                        twilio_auth_token=TOKEN, sendgrid_webhook_public_key=PUBLIC_KEY_B64,
                        data_dir=tmp_path_factory.mktemp("webhooks"))
    tail = await Tail(settings, topics.SENDER_RESULTS, topics.OPT_OUTS).start()
    async with running(settings), aiohttp.ClientSession() as session:
        yield Client(settings, session, tail)
    await tail.stop()


def new_ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


def new_number() -> str:
    return "+1202" + str(uuid.uuid4().int)[:7]


def status_path(campaign_id: str, message_id: str) -> str:
    return f"/twilio/status?message_id={message_id}&campaign_id={campaign_id}"


def status_form(status: str, to: str, error_code: str | None = None, sid: str | None = None) -> dict:
    form = {"MessageSid": sid or "SM" + uuid.uuid4().hex, "MessageStatus": status, "SmsStatus": status, "To": to,
            "From": "+15005550006", "AccountSid": "AC" + "0" * 32, "ApiVersion": "2010-04-01"}
    if error_code:
        form["ErrorCode"] = error_code
    return form


def assert_valid_records(client: Client, campaign_id: str, destination: str | None = None):
    for record in client.result_records(campaign_id):
        internal.SenderResults.model_validate(record)
        assert set(record) == {"type", "result_id", "campaign_id", "results"}
    if destination and hasattr(internal, "OptOutChanged"):
        for record in client.opt_outs(destination):
            internal.OptOutChanged.model_validate(record)


async def test_wrong_twilio_signature_is_403_and_publishes_nothing(client):
    campaign_id, forged_message = new_ids()
    to = new_number()
    path = status_path(campaign_id, forged_message)
    form = status_form("failed", to, "21610")
    assert (await client.twilio(path, form, signature=None)).status == 403
    assert (await client.twilio(path, form, signature="AAAAAAAAAAAAAAAAAAAAAAAAAAA=")).status == 403
    assert (await client.twilio(path, form, token="another-token")).status == 403
    # Signed for another message, replayed with this one's query.
    other = status_path(campaign_id, str(uuid.uuid4()))
    good_for_other = sigs.twilio_signature(TOKEN, client.settings.webhook_url + other, form)
    assert (await client.twilio(path, form, signature=good_for_other)).status == 403
    assert (await client.twilio("/twilio/inbound", {"From": to, "To": "+15005550006", "Body": "STOP"},
                                signature="forged")).status == 403

    # Markers on the same keys (campaign_id, destination): once they are read, anything before them would be too.
    marker = str(uuid.uuid4())
    assert (await client.twilio(status_path(campaign_id, marker), status_form("delivered", to))).status == 200
    assert (await client.twilio("/twilio/inbound", {"From": to, "To": "+15005550006", "Body": "START",
                                                    "MessageSid": "SM" + uuid.uuid4().hex})).status == 200
    await client.wait(lambda: client.results_of(campaign_id, marker) and client.opt_outs(to))
    assert client.results_of(campaign_id, forged_message) == []
    assert [o["source"] for o in client.opt_outs(to)] == ["sms_start"]


async def test_one_valid_callback_is_one_sender_results_record(client):
    campaign_id, message_id = new_ids()
    form = status_form("delivered", new_number())
    resp = await client.twilio(status_path(campaign_id, message_id), form)
    assert resp.status == 200
    # Answered only once the broker has it: the record is there without any new publishing.
    [record] = await client.wait(lambda: client.result_records(campaign_id))
    assert record["type"] == "SenderResults" and record["campaign_id"] == campaign_id
    assert uuid.UUID(record["result_id"]).version == 4
    [result] = record["results"]
    assert result == {"message_id": message_id, "outcome": "delivered", "attempt": None, "provider_code": None,
                      "provider_message_id": form["MessageSid"], "occurred_at": result["occurred_at"],
                      "final": False}
    [(kafka_record, _)] = [(r, v) for r, v in client.tail.records[topics.SENDER_RESULTS]
                           if isinstance(v, dict) and v.get("campaign_id") == campaign_id]
    assert kafka_record.key == campaign_id.encode()
    assert_valid_records(client, campaign_id)


async def test_a_callback_says_which_submission_it_answers(client):
    """The sender puts the submission's number in the callback URL (Twilio) or a custom arg (SendGrid): the
    result carries it as `attempt`, even when the receipt comes before the sender's own result."""
    campaign_id, sms_message, email_message = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    resp = await client.twilio(status_path(campaign_id, sms_message) + "&submission=3",
                               status_form("delivered", new_number()))
    assert resp.status == 200
    event = {"email": "ann@example.com", "timestamp": 1_700_000_000, "event": "delivered",
             "sg_event_id": uuid.uuid4().hex, "message_id": email_message, "campaign_id": campaign_id,
             "submission": "2", "attempt": "5"}  # SendGrid's own `attempt` (deferrals) is not ours
    assert await client.sendgrid([event]) == 200
    await client.wait(lambda: client.results_of(campaign_id, sms_message) and
                      client.results_of(campaign_id, email_message))
    attempts = {r["message_id"]: r["attempt"] for r in client.results(campaign_id)}
    assert attempts == {sms_message: 3, email_message: 2}
    assert_valid_records(client, campaign_id)


async def test_twilio_statuses_map_to_outcomes_and_21610_opts_out(client):
    campaign_id = str(uuid.uuid4())
    m = {name: str(uuid.uuid4()) for name in ("sent", "delivered", "undelivered", "failed", "optout", "ignored")}
    opted_out = new_number()
    calls = [
        (m["sent"], status_form("sent", new_number())),
        (m["delivered"], status_form("delivered", new_number())),
        (m["undelivered"], status_form("undelivered", new_number(), "30003")),
        (m["failed"], status_form("failed", new_number(), "30007")),
        (m["optout"], status_form("failed", opted_out, "21610")),
        (m["ignored"], status_form("queued", new_number())),
        (m["ignored"], status_form("accepted", new_number())),
        (m["ignored"], status_form("sending", new_number())),
    ]
    statuses = await asyncio.gather(*(client.twilio(status_path(campaign_id, mid), form) for mid, form in calls))
    assert [r.status for r in statuses] == [200] * len(calls)
    marker = str(uuid.uuid4())
    await client.twilio(status_path(campaign_id, marker), status_form("sent", new_number()))
    await client.wait(lambda: client.results_of(campaign_id, marker) and client.opt_outs(opted_out))
    got = {r["message_id"]: (r["outcome"], r["provider_code"]) for r in client.results(campaign_id)}
    assert got == {m["sent"]: ("sent", None), m["delivered"]: ("delivered", None),
                   m["undelivered"]: ("undelivered", "30003"), m["failed"]: ("failed", "30007"),
                   m["optout"]: ("failed", "21610"), marker: ("sent", None)}
    [optout] = client.opt_outs(opted_out)
    sid = calls[4][1]["MessageSid"]
    assert optout == {"type": "OptOutChanged", "opt_out_id": str(uuid.uuid5(
        OUTREACH_NS, f"opt-out:twilio_21610:{opted_out}:{sid}")), "channel": "sms",
        "destination": opted_out, "opted_out": True, "source": "twilio_21610", "occurred_at": optout["occurred_at"],
        "issued_by": None, "reason": None}  # (a change by hand's fields: a provider's names nobody)
    assert_valid_records(client, campaign_id, opted_out)


async def test_a_burst_of_callbacks_becomes_few_records(client):
    campaign_id = str(uuid.uuid4())
    message_ids = [str(uuid.uuid4()) for _ in range(200)]
    responses = await asyncio.gather(*(client.twilio(status_path(campaign_id, mid), status_form("sent", new_number()))
                                       for mid in message_ids))
    assert {r.status for r in responses} == {200}
    await client.wait(lambda: len(client.results(campaign_id)) >= len(message_ids))
    assert sorted(r["message_id"] for r in client.results(campaign_id)) == sorted(message_ids)
    assert len(client.result_records(campaign_id)) <= 20  # batched per campaign, not one record per callback


async def test_inbound_stop_start_help_and_other(client):
    number = new_number()

    async def inbound(body: str) -> tuple[int, str, str]:
        return await client.twilio_text("/twilio/inbound", {"From": number, "To": "+15005550006", "Body": body,
                                                            "MessageSid": "SM" + uuid.uuid4().hex,
                                                            "AccountSid": "AC" + "0" * 32})

    status, content_type, text = await inbound("  stop ")
    assert (status, content_type) == (200, "text/xml")
    assert "<Response><Message>" in text and "unsubscribed" in text
    await client.wait(lambda: len(client.opt_outs(number)) == 1)

    status, _, text = await inbound("Start")
    assert status == 200 and "resubscribed" in text
    await client.wait(lambda: len(client.opt_outs(number)) == 2)

    status, _, text = await inbound("HELP")
    assert status == 200 and "<Message>" in text and "STOP" in text and "&amp;" in text  # XML-escaped

    for body in ("hello", "stop please", ""):
        status, content_type, text = await inbound(body)
        assert (status, content_type) == (200, "text/xml") and text.endswith("<Response/>")

    status, _, _ = await inbound("UNSUBSCRIBE")  # marker: another opt-out after HELP and the others
    await client.wait(lambda: len(client.opt_outs(number)) == 3)
    assert [(o["channel"], o["opted_out"], o["source"]) for o in client.opt_outs(number)] == [
        ("sms", True, "sms_stop"), ("sms", False, "sms_start"), ("sms", True, "sms_stop")]
    assert len({o["opt_out_id"] for o in client.opt_outs(number)}) == 3
    assert_valid_records(client, "none", number)


def sendgrid_batch(campaign_id: str, m: dict[str, str], email: str) -> list[dict]:
    ts = 1_700_000_000

    def ev(name: str, event: str, message: str | None = None, **extra) -> dict:
        body = {"email": email, "timestamp": ts, "event": event, "sg_event_id": f"{name}-{uuid.uuid4().hex}",
                "sg_message_id": f"sg-{name}.filter", "smtp-id": "<x@sendgrid.net>"}
        if message is not None:
            body.update(message_id=m[message], campaign_id=campaign_id)
        return {**body, **extra}

    return [
        ev("processed", "processed", "delivered"),
        ev("deferred", "deferred", "deferred", response="451 4.3.5 try later", attempt="1"),
        ev("delivered", "delivered", "delivered", response="250 OK"),
        ev("bounce", "bounce", "bounced", type="bounce", status="5.1.1", reason="550 5.1.1 no such user"),
        ev("blocked", "bounce", "blocked", type="blocked", status="5.7.1", reason="550 blocked"),
        ev("dropped", "dropped", "dropped", reason="Bounced Address"),
        ev("spamreport", "spamreport", "spamreport"),
        ev("unsubscribe", "unsubscribe", "unsubscribe"),
        ev("group_unsubscribe", "group_unsubscribe", "group_unsubscribe", asm_group_id=1),
        ev("open", "open", "delivered"),
        ev("notours", "delivered"),  # no custom args: not ours
        {**ev("badids", "delivered"), "message_id": "nope", "campaign_id": campaign_id},
    ]


async def test_sendgrid_batch_posted_three_times_publishes_each_event_once(client):
    campaign_id = str(uuid.uuid4())
    email = f"person-{uuid.uuid4().hex[:8]}@Example.COM"  # stored normalized: domain lowercased
    normalized = email.rsplit("@", 1)[0] + "@example.com"
    m = {k: str(uuid.uuid4()) for k in ("deferred", "delivered", "bounced", "blocked", "dropped", "spamreport",
                                        "unsubscribe", "group_unsubscribe")}
    batch = sendgrid_batch(campaign_id, m, email)
    body = json.dumps(batch).encode()
    assert [await client.sendgrid(body) for _ in range(3)] == [200, 200, 200]

    marker_id = str(uuid.uuid4())
    marker = {"email": email, "timestamp": 1_700_000_100, "event": "spamreport", "sg_event_id": uuid.uuid4().hex,
              "message_id": marker_id, "campaign_id": campaign_id}
    assert await client.sendgrid([marker]) == 200
    await client.wait(lambda: client.results_of(campaign_id, marker_id) and
                      any(o["occurred_at"].startswith("2023-11-14T22:15") for o in client.opt_outs(normalized)))

    got = sorted((r["message_id"], r["outcome"], r["provider_code"]) for r in client.results(campaign_id)
                 if r["message_id"] != marker_id)
    assert got == sorted([
        (m["deferred"], "deferred", "451"),
        (m["delivered"], "delivered", None),
        (m["bounced"], "bounced", "5.1.1"),
        (m["blocked"], "blocked", "5.7.1"),
        (m["dropped"], "dropped", "Bounced Address"),
        (m["spamreport"], "spamreport", None),
        (m["unsubscribe"], "unsubscribe", None),
        (m["group_unsubscribe"], "unsubscribe", None),
    ])
    delivered = client.results_of(campaign_id, m["delivered"])[0]
    assert delivered["occurred_at"] == "2023-11-14T22:13:20.000000Z" and delivered["attempt"] is None
    assert delivered["provider_message_id"].startswith("sg-delivered")
    opt_outs = [o for o in client.opt_outs(normalized) if o["occurred_at"].startswith("2023-11-14T22:13")]
    assert sorted(o["source"] for o in opt_outs) == ["email_spamreport", "email_unsubscribe", "email_unsubscribe"]
    assert {o["channel"] for o in opt_outs} == {"email"} and all(o["opted_out"] for o in opt_outs)
    assert client.opt_outs(email) == []
    assert_valid_records(client, campaign_id, normalized)


async def test_sendgrid_bad_signatures_are_403(client):
    campaign_id, message_id = new_ids()
    events = [{"email": "x@example.com", "timestamp": 1, "event": "delivered", "sg_event_id": uuid.uuid4().hex,
               "message_id": message_id, "campaign_id": campaign_id}]
    other_key = ec.generate_private_key(ec.SECP256R1())
    assert await client.sendgrid(events, key=other_key) == 403
    assert await client.sendgrid(events, timestamp="1700000000", signed_timestamp="1700000001") == 403
    async with client.session.post(client.base + "/sendgrid/events", data=json.dumps(events)) as resp:
        assert resp.status == 403  # no signature headers
    assert await client.sendgrid(b'{"not": "a list"}') == 400
    # The same events, signed: published (so nothing was remembered from the refused ones).
    assert await client.sendgrid(events) == 200
    await client.wait(lambda: client.results_of(campaign_id, message_id))
    assert len(client.results_of(campaign_id, message_id)) == 1


async def test_unsubscribe_link_get_confirms_post_unsubscribes(client):
    from services.common.unsubscribe import unsubscribe_url

    campaign_id, message_id = new_ids()
    email = f"reader-{uuid.uuid4().hex[:8]}@example.com"
    url = unsubscribe_url(client.settings, campaign_id, message_id, email)
    assert url.startswith(client.settings.webhook_url + "/unsubscribe?")
    path_qs = url[len(client.settings.webhook_url):]
    forged = client.base + "/unsubscribe?" + urlencode({"v": "1", "campaign_id": campaign_id,
                                                        "message_id": message_id, "destination": "victim@example.com",
                                                        "sig": "0" * 64})

    async with client.session.get(URL(client.base + path_qs, encoded=True)) as resp:
        page = await resp.text()
        assert resp.status == 200 and 'method="post"' in page and email in page and "List-Unsubscribe" in page
    async with client.session.get(URL(forged, encoded=True)) as resp:
        assert resp.status == 403
    async with client.session.post(URL(forged, encoded=True), data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 403
    async with client.session.post(URL(client.base + path_qs, encoded=True),
                                   data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 200 and "You are unsubscribed" in await resp.text()

    await client.wait(lambda: client.results_of(campaign_id, message_id) and client.opt_outs(email))
    [result] = client.results_of(campaign_id, message_id)
    assert result["outcome"] == "unsubscribe"
    [optout] = client.opt_outs(email)  # the GET published nothing (it came before, on the same key)
    assert (optout["channel"], optout["opted_out"], optout["source"]) == ("email", True, "email_unsubscribe")
    assert client.opt_outs("victim@example.com") == []
    assert_valid_records(client, campaign_id, email)


# ------------------------------------------------------------------ a broker that fails: 503, nothing remembered

async def test_publishing_failure_answers_503_and_the_retry_publishes():
    from aiohttp import web

    producer = FakePublishers(topics.SENDER_RESULTS, topics.OPT_OUTS)  # checks each record with its model
    producer.fail = True
    settings = Settings(webhook_host="127.0.0.1", webhook_port=free_port(), twilio_auth_token=TOKEN,
                        sendgrid_webhook_public_key=PUBLIC_KEY_B64)
    outbox = Outbox(producer)
    outbox.start()
    runner = web.AppRunner(create_app(settings, outbox))
    await runner.setup()
    await web.TCPSite(runner, settings.webhook_host, settings.webhook_port).start()
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(settings, session, tail=None)
            campaign_id, message_id = new_ids()
            events = [{"email": "a@example.com", "timestamp": 1, "event": "spamreport", "sg_event_id": "e1",
                       "message_id": message_id, "campaign_id": campaign_id}]
            assert await client.sendgrid(events) == 503
            assert (await client.twilio(status_path(campaign_id, message_id),
                                        status_form("delivered", new_number()))).status == 503
            producer.fail = False
            assert await client.sendgrid(events) == 200  # the failed batch was not remembered as seen
            assert sorted(topic for topic, _, _ in producer.sent) == [topics.OPT_OUTS, topics.SENDER_RESULTS]
            assert await client.sendgrid(events) == 200  # now it is: nothing more published
            assert len(producer.sent) == 2
    finally:
        await runner.cleanup()
        await outbox.close()


async def test_a_sendgrid_retry_reaching_another_receiver_instance_is_not_published_again(client):
    """Receiver instances share the published event ids (in the store's database): a batch one of them
    published is skipped by another when SendGrid retries it there. Instances may share one port (reuse_port)."""
    campaign_id, message_id = new_ids()
    batch = [{"email": "twice@example.com", "timestamp": 1_700_000_000, "event": "deferred", "attempt": "1",
              "response": "451 later", "sg_event_id": uuid.uuid4().hex, "message_id": message_id,
              "campaign_id": campaign_id}]
    assert await client.sendgrid(batch) == 200
    await client.wait(lambda: client.results_of(campaign_id, message_id))

    async with running(client.settings):  # a second process on the first one's port starts (reuse_port)
        pass
    elsewhere = client.settings.model_copy(update={"webhook_port": free_port()})
    async with running(elsewhere), aiohttp.ClientSession() as session:  # another instance, reached directly
        other = Client(elsewhere, session, client.tail)
        assert await other.sendgrid(batch) == 200  # SendGrid's retry of the batch, on that instance
    marker_id = str(uuid.uuid4())
    assert await client.sendgrid([{**batch[0], "sg_event_id": uuid.uuid4().hex, "message_id": marker_id}]) == 200
    await client.wait(lambda: client.results_of(campaign_id, marker_id))
    assert len(client.results_of(campaign_id, message_id)) == 1  # published once, by the first instance
