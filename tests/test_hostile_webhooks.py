"""Hostile webhooks against the real receiver (services/webhook_receiver/) over HTTP, on the session broker.

Four kinds of requests, each a table of parametrized cases: MALFORMED (not a form or JSON, wrong types,
invalid UTF-8, deeply nested JSON, ...), FORGED (bad or missing signatures, the public development secrets),
REPLAYED (the same sg_event_id / MessageSid again, on this instance, another one, after a restart) and
OVERSIZED (over the route's cap, declared or not, compressed, at the cap). Each case asserts the documented
answer (routes.py, bodies.py), that the receiver still answers, and what reached the broker: a case uses its
own campaign id, message id, phone number and email address (`Probe`), then markers are published on the same
keys; once they are read, anything the case published would have been read too (same key, same partition,
and the receiver answers only after the broker's acknowledgement). Then nothing but the markers (and what the
case was meant to publish) may be there. `test_the_tables_are_large_enough` counts the cases per kind.

The handler's side (a replayed or stale status, a replayed START, feeding what the receiver published into the
command handler's application) closes the module: those change nothing.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from schemas import topics
from services.common import webhook_signatures as sigs
from services.common.embedded_broker import free_port
from services.common.settings import Settings
from services.common.unsubscribe import unsubscribe_url
from services.webhook_receiver.app import running
from services.webhook_receiver.bodies import (MAX_FORM_FIELDS, SENDGRID_MAX_BYTES, TWILIO_MAX_BYTES,
                                              UNSUBSCRIBE_MAX_BYTES)
from services.webhook_receiver.callbacks import MAX_CODE_CHARS
from tests.conftest import async_wait_until
from tests.e2e_support import Tail

TOKEN = "hostile-test-auth-token-0123456789"
UNSUBSCRIBE_SECRET = "hostile-test-unsubscribe-secret-0123456789"
PRIVATE_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY_B64 = base64.b64encode(PRIVATE_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
SIMULATOR_TOKEN = Settings.model_fields["twilio_auth_token"].default.get_secret_value()
FORM = "application/x-www-form-urlencoded"


def simulator_private_key():
    from services.simulator.signing import SIMULATOR_SENDGRID_PRIVATE_KEY_PEM

    return serialization.load_pem_private_key(SIMULATOR_SENDGRID_PRIVATE_KEY_PEM, password=None)


# ------------------------------------------------------------------ the receiver and what it published

@dataclass
class Probe:
    """A case's own keys: nothing else in the broker carries them."""
    campaign_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    phone: str = field(default_factory=lambda: "+1202" + str(uuid.uuid4().int)[:7])
    email: str = field(default_factory=lambda: f"hostile-{uuid.uuid4().hex[:12]}@example.com")

    @property
    def status_path(self) -> str:
        return f"/twilio/status?message_id={self.message_id}&campaign_id={self.campaign_id}"

    def status_form(self, status: str = "failed", error_code: str | None = "21610", sid: str | None = None) -> dict:
        form = {"MessageSid": sid or new_sid(), "MessageStatus": status, "SmsStatus": status, "To": self.phone,
                "From": "+15005550006", "AccountSid": "AC" + "0" * 32, "ApiVersion": "2010-04-01"}
        if error_code:
            form["ErrorCode"] = error_code
        return form

    def inbound_form(self, body: str = "STOP", sid: str | None = None) -> dict:
        return {"MessageSid": sid or new_sid(), "From": self.phone, "To": "+15005550006", "Body": body,
                "AccountSid": "AC" + "0" * 32}

    def event(self, kind: str = "spamreport", sg_event_id: str | None = None, **extra) -> dict:
        return {"email": self.email, "timestamp": int(time.time()), "event": kind,
                "sg_event_id": sg_event_id or uuid.uuid4().hex, "sg_message_id": "sg-hostile.filter",
                "message_id": self.message_id, "campaign_id": self.campaign_id, **extra}


def new_sid() -> str:
    return "SM" + uuid.uuid4().hex


def sendgrid_body(events) -> bytes:
    return json.dumps(events).encode()


class Hostile:
    """Posts to one receiver; reads what it published from the tail."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, tail: Tail):
        self.settings = settings
        self.session = session
        self.tail = tail
        self.host, self.port = settings.webhook_host, settings.webhook_port
        self.base = f"http://{self.host}:{self.port}"

    # -- signing

    def twilio_signature(self, path_qs: str, form, token: str = TOKEN, base: str | None = None) -> str:
        return sigs.twilio_signature(token, (base or self.settings.webhook_url) + path_qs, form)

    def sendgrid_headers(self, body: bytes, key=PRIVATE_KEY, timestamp: str | None = None) -> dict:
        timestamp = timestamp or str(int(time.time()))
        return {sigs.SENDGRID_SIGNATURE_HEADER: sigs.sendgrid_signature(key, body, timestamp),
                sigs.SENDGRID_TIMESTAMP_HEADER: timestamp, "Content-Type": "application/json"}

    # -- requests

    async def post(self, path_qs: str, body: bytes, headers: dict | None = None,
                   skip: tuple[str, ...] = ()) -> int:
        async with self.session.post(URL(self.base + path_qs, encoded=True), data=body, headers=headers or {},
                                     skip_auto_headers=skip) as response:
            await response.read()
            return response.status

    async def twilio(self, path_qs: str, form: dict, *, signature: str | None = "valid", token: str = TOKEN) -> int:
        headers = {"Content-Type": FORM}
        if signature == "valid":
            headers[sigs.TWILIO_SIGNATURE_HEADER] = self.twilio_signature(path_qs, form, token)
        elif signature is not None:
            headers[sigs.TWILIO_SIGNATURE_HEADER] = signature
        return await self.post(path_qs, urlencode(form).encode(), headers)

    async def inbound(self, form: dict) -> tuple[int, str]:
        headers = {"Content-Type": FORM,
                   sigs.TWILIO_SIGNATURE_HEADER: self.twilio_signature("/twilio/inbound", form)}
        async with self.session.post(self.base + "/twilio/inbound", data=urlencode(form).encode(),
                                     headers=headers) as response:
            return response.status, await response.text()

    async def sendgrid(self, body: bytes | list, **signing) -> int:
        body = body if isinstance(body, bytes) else sendgrid_body(body)
        return await self.post("/sendgrid/events", body, self.sendgrid_headers(body, **signing))

    async def raw(self, head: str, body_parts: list[bytes] = (), read_before_body: bool = False) -> int:
        """A hand-made HTTP/1.1 request; the status of the answer (body parts the server no longer reads may
        fail to send: the answer is read all the same)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(head.encode("latin-1"))
            await writer.drain()
            if not read_before_body:
                for part in body_parts:
                    try:
                        writer.write(part)
                        await writer.drain()
                    except (ConnectionError, OSError):
                        break
            status_line = await asyncio.wait_for(reader.readline(), 10)
            return int(status_line.split()[1])
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def alive(self) -> None:
        async with self.session.get(self.base + "/healthz") as response:
            assert response.status == 200 and await response.text() == "ok"

    # -- what reached the broker

    def results(self, probe: Probe) -> list[dict]:
        """Every published result of the probe's campaign or message."""
        return [r for v in self.tail.values(topics.SENDER_RESULTS) if isinstance(v, dict)
                for r in v.get("results", ())
                if v.get("campaign_id") == probe.campaign_id or r.get("message_id") == probe.message_id]

    def opt_outs(self, probe: Probe) -> list[dict]:
        """Every published opt-out whose destination holds the probe's phone number or address."""
        return [v for v in self.tail.values(topics.OPT_OUTS) if isinstance(v, dict)
                and (probe.phone in v.get("destination", "") or probe.email.split("@")[0] in v.get("destination", ""))]

    async def settle(self, probe: Probe) -> tuple[list[dict], list[dict]]:
        """Publish markers on the probe's keys, wait for them, and return (results, opt-outs) of the probe but
        the markers'."""
        marker_message = str(uuid.uuid4())
        marker_sid = new_sid()
        marker_event = {"email": probe.email, "timestamp": int(time.time()), "event": "unsubscribe",
                        "sg_event_id": "marker-" + uuid.uuid4().hex, "message_id": str(uuid.uuid4()),
                        "campaign_id": probe.campaign_id}
        path = f"/twilio/status?message_id={marker_message}&campaign_id={probe.campaign_id}"
        assert await self.twilio(path, {"MessageSid": marker_sid, "MessageStatus": "delivered"}) == 200
        assert (await self.inbound(probe.inbound_form("STOP", sid=marker_sid)))[0] == 200
        assert await self.sendgrid([marker_event]) == 200
        markers = {marker_message, marker_event["message_id"]}

        def arrived():
            results = {r["message_id"] for r in self.results(probe)}
            destinations = {o["destination"] for o in self.opt_outs(probe) if o["opted_out"]}
            return markers <= results and {probe.phone, probe.email} <= destinations

        await async_wait_until(arrived, 20, message="the markers never arrived")
        marker_opt_outs = {(probe.phone, "sms_stop", True), (probe.email, "email_unsubscribe", True)}
        results = [r for r in self.results(probe) if r["message_id"] not in markers]
        opt_outs = list(self.opt_outs(probe))
        for marker in marker_opt_outs:  # one of each
            found = [o for o in opt_outs if (o["destination"], o["source"], o["opted_out"]) == marker]
            assert found, marker
            opt_outs.remove(found[-1])
        return results, opt_outs

    async def nothing_published(self, probe: Probe) -> None:
        results, opt_outs = await self.settle(probe)
        assert results == [] and opt_outs == [], (results, opt_outs)


def receiver_settings(kafka_bootstrap: str, data_dir, port: int | None = None) -> Settings:
    return Settings(kafka_bootstrap_servers=kafka_bootstrap, webhook_host="127.0.0.1", webhook_port=port or free_port(),
                    twilio_auth_token=TOKEN, sendgrid_webhook_public_key=PUBLIC_KEY_B64,
                    unsubscribe_secret=UNSUBSCRIBE_SECRET, data_dir=data_dir)


@pytest.fixture(scope="module")
async def tail(kafka_bootstrap):
    tail = await Tail(Settings(kafka_bootstrap_servers=kafka_bootstrap), topics.SENDER_RESULTS,
                      topics.OPT_OUTS).start()
    yield tail
    await tail.stop()


@pytest.fixture(scope="module")
async def hostile(kafka_bootstrap, tail, tmp_path_factory):
    settings = receiver_settings(kafka_bootstrap, tmp_path_factory.mktemp("hostile-webhooks"))
    async with running(settings), aiohttp.ClientSession() as session:
        yield Hostile(settings, session, tail)


# ------------------------------------------------------------------ the tables

Run = Callable[[Hostile, Probe], Awaitable[int]]


@dataclass(frozen=True)
class Case:
    run: Run
    status: int
    # What the case may publish, checked on (results, opt-outs) of its probe; None: nothing at all.
    publishes: Callable[[Probe, list[dict], list[dict]], None] | None = None


MALFORMED: dict[str, Case] = {}
FORGED: dict[str, Case] = {}
REPLAYED: dict[str, Case] = {}
OVERSIZED: dict[str, Case] = {}


def case(table: dict[str, Case], status: int, publishes=None):
    def register(run: Run) -> Run:
        table[run.__name__] = Case(run, status, publishes)
        return run
    return register


# -- malformed: Twilio (each validly signed where a signature can be computed: the parsing refuses it)

@case(MALFORMED, 415)
async def twilio_status_json_body(h: Hostile, p: Probe) -> int:
    form = p.status_form()
    return await h.post(p.status_path, json.dumps(form).encode(), {
        "Content-Type": "application/json", sigs.TWILIO_SIGNATURE_HEADER: h.twilio_signature(p.status_path, form)})


@case(MALFORMED, 415)
async def twilio_status_text_plain(h: Hostile, p: Probe) -> int:
    form = p.status_form()
    return await h.post(p.status_path, urlencode(form).encode(), {
        "Content-Type": "text/plain", sigs.TWILIO_SIGNATURE_HEADER: h.twilio_signature(p.status_path, form)})


@case(MALFORMED, 415)
async def twilio_status_multipart(h: Hostile, p: Probe) -> int:
    form = p.status_form()
    data = aiohttp.FormData()
    for name, value in form.items():
        data.add_field(name, value)
    data.add_field("upload", b"\x00" * 1000, filename="x.bin", content_type="application/octet-stream")
    async with h.session.post(URL(h.base + p.status_path, encoded=True), data=data, headers={
            sigs.TWILIO_SIGNATURE_HEADER: h.twilio_signature(p.status_path, form)}) as response:
        return response.status


@case(MALFORMED, 415)
async def twilio_status_no_content_type(h: Hostile, p: Probe) -> int:
    form = p.status_form()
    return await h.post(p.status_path, urlencode(form).encode(),
                        {sigs.TWILIO_SIGNATURE_HEADER: h.twilio_signature(p.status_path, form)},
                        skip=("Content-Type",))


@case(MALFORMED, 415)
async def twilio_inbound_json_body(h: Hostile, p: Probe) -> int:
    form = p.inbound_form()
    return await h.post("/twilio/inbound", json.dumps(form).encode(), {
        "Content-Type": "application/json",
        sigs.TWILIO_SIGNATURE_HEADER: h.twilio_signature("/twilio/inbound", form)})


@case(MALFORMED, 415)
async def twilio_inbound_latin1_form(h: Hostile, p: Probe) -> int:
    form = p.inbound_form("STOP")
    return await h.post("/twilio/inbound", urlencode(form).encode(), {
        "Content-Type": FORM + "; charset=latin-1",
        sigs.TWILIO_SIGNATURE_HEADER: h.twilio_signature("/twilio/inbound", form)})


@case(MALFORMED, 400)
async def twilio_inbound_raw_bytes_not_utf8(h: Hostile, p: Probe) -> int:
    body = urlencode(p.inbound_form("STOP")).encode() + b"&Note=\xff\xfe\xc3"
    return await h.post("/twilio/inbound", body, {"Content-Type": FORM,
                                                  sigs.TWILIO_SIGNATURE_HEADER: "anything"})


@case(MALFORMED, 400)
async def twilio_inbound_escape_not_utf8(h: Hostile, p: Probe) -> int:
    body = urlencode(p.inbound_form("STOP")).encode() + b"&Note=%FF%FE"
    return await h.post("/twilio/inbound", body, {"Content-Type": FORM,
                                                  sigs.TWILIO_SIGNATURE_HEADER: "anything"})


@case(MALFORMED, 400)
async def twilio_status_escape_not_utf8(h: Hostile, p: Probe) -> int:
    body = urlencode(p.status_form()).encode().replace(b"MessageStatus=failed", b"MessageStatus=fail%C0%AF")
    return await h.post(p.status_path, body, {"Content-Type": FORM, sigs.TWILIO_SIGNATURE_HEADER: "anything"})


@case(MALFORMED, 400)
async def twilio_inbound_too_many_fields(h: Hostile, p: Probe) -> int:
    form = {**p.inbound_form("STOP"), **{f"f{i}": "x" for i in range(MAX_FORM_FIELDS + 1)}}
    return await h.twilio("/twilio/inbound", form)


@case(MALFORMED, 200)
async def twilio_status_unknown_status(h: Hostile, p: Probe) -> int:
    return await h.twilio(p.status_path, p.status_form("DELIVERED\x00"))


@case(MALFORMED, 200)
async def twilio_status_empty_form(h: Hostile, p: Probe) -> int:
    return await h.twilio(p.status_path, {})


@case(MALFORMED, 200)
async def twilio_status_ids_not_uuids(h: Hostile, p: Probe) -> int:
    path = f"/twilio/status?message_id={p.message_id.upper()}&campaign_id=not-a-uuid"
    return await h.twilio(path, p.status_form("delivered", None))


@case(MALFORMED, 200)
async def twilio_status_query_not_utf8(h: Hostile, p: Probe) -> int:
    path = f"/twilio/status?message_id=%FF%FE&campaign_id={p.campaign_id}"
    return await h.twilio(path, p.status_form("delivered", None))


@case(MALFORMED, 200)
async def twilio_inbound_stop_from_too_long(h: Hostile, p: Probe) -> int:
    form = {**p.inbound_form("STOP"), "From": p.phone + "9" * 400}
    return await h.twilio("/twilio/inbound", form)


@case(MALFORMED, 200)
async def twilio_inbound_keyword_padded(h: Hostile, p: Probe) -> int:
    return await h.twilio("/twilio/inbound", p.inbound_form("STOP" + " " * 100 + "START"))


def _clipped(p: Probe, results: list[dict], opt_outs: list[dict]) -> None:
    assert [(r["outcome"], len(r["provider_code"]), len(r["provider_message_id"])) for r in results] == [
        ("failed", MAX_CODE_CHARS, MAX_CODE_CHARS)] and opt_outs == [], (results, opt_outs)


@case(MALFORMED, 200, publishes=_clipped)
async def twilio_status_huge_fields_are_clipped(h: Hostile, p: Probe) -> int:
    form = {**p.status_form("failed", "3" * 20_000), "MessageSid": "SM" + "a" * 20_000}
    return await h.twilio(p.status_path, form)


# -- malformed: SendGrid (signed with the right key: the parsing refuses it)

def signed_sendgrid(body: bytes | Callable[[Probe], bytes], status: int = 400, publishes=None):
    def run_for(name: str):
        async def run(h: Hostile, p: Probe) -> int:
            return await h.sendgrid(body(p) if callable(body) else body)
        run.__name__ = name
        case(MALFORMED, status, publishes)(run)
    return run_for


signed_sendgrid(b"hello")("sendgrid_not_json")
signed_sendgrid(lambda p: json.dumps(p.event()).encode())("sendgrid_object_not_array")
signed_sendgrid(b'"spamreport"')("sendgrid_string_not_array")
signed_sendgrid(b"42")("sendgrid_number_not_array")
signed_sendgrid(b"null")("sendgrid_null")
signed_sendgrid(b"")("sendgrid_empty_body")
signed_sendgrid(lambda p: sendgrid_body([p.event()]).replace(b'"spamreport"', b'"spam\xffreport"'))(
    "sendgrid_invalid_utf8")
signed_sendgrid(lambda p: sendgrid_body([p.event()]).replace(b'"spamreport"', b'"spam\\ud800report"'))(
    "sendgrid_lone_surrogate")
signed_sendgrid(lambda p: b"\xef\xbb\xbf" + sendgrid_body([p.event()]))("sendgrid_byte_order_mark")
signed_sendgrid(lambda p: sendgrid_body([p.event()]).decode().encode("utf-16"))("sendgrid_utf16")
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "timestamp": 1}]).replace(
    b'"timestamp": 1', b'"timestamp": NaN'))("sendgrid_nan")
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "timestamp": 1}]).replace(
    b'"timestamp": 1', b'"timestamp": 1e400'))("sendgrid_infinite_number")
signed_sendgrid(lambda p: sendgrid_body([p.event()])[:-20])("sendgrid_truncated")
signed_sendgrid(lambda p: sendgrid_body([p.event()]) + b"]]")("sendgrid_trailing_garbage")
signed_sendgrid(b"[" * 100_000)("sendgrid_nested_arrays_100k_deep")
signed_sendgrid(b'{"a":' * 5_000 + b"1" + b"}" * 5_000)("sendgrid_nested_objects_5k_deep")
signed_sendgrid(lambda p: sendgrid_body([p.event()])[:-1] + b"," + b"[" * 2_000 + b"]" * 2_000 + b"]")(
    "sendgrid_event_then_nesting_too_deep")  # the good event before it is not published either
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "event": None}]).replace(
    b'"event": null', b'"event": ' + b"[" * 1_000 + b'"spamreport"' + b"]" * 1_000), status=200)(
    "sendgrid_event_field_nested_1000_deep")
signed_sendgrid(b'[1, "spamreport", null, [], true, 2.5]', status=200)("sendgrid_array_of_non_objects")
signed_sendgrid(b"[]", status=200)("sendgrid_empty_array")
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "message_id": 12345, "campaign_id": [p.campaign_id]}]),
                status=200)("sendgrid_ids_of_wrong_types")
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "message_id": p.message_id.upper()}]), status=200)(
    "sendgrid_ids_not_lowercase")
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "event": ["spamreport"]}]), status=200)(
    "sendgrid_event_field_a_list")
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "event": {"spamreport": True}}]), status=200)(
    "sendgrid_event_field_an_object")
signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "event": "exploded"}]), status=200)(
    "sendgrid_unknown_event")


def _spamreport_without_opt_out(p: Probe, results: list[dict], opt_outs: list[dict]) -> None:
    assert [r["outcome"] for r in results] == ["spamreport"] and opt_outs == [], (results, opt_outs)


def _bounce_without_its_optional_fields(p: Probe, results: list[dict], opt_outs: list[dict]) -> None:
    assert [(r["outcome"], r["provider_code"], r["provider_message_id"], r["attempt"]) for r in results] == [
        ("bounced", None, "7", None)] and opt_outs == [], (results, opt_outs)


signed_sendgrid(lambda p: sendgrid_body([{**p.event(), "email": "x" * 400 + p.email}]), status=200,
                publishes=_spamreport_without_opt_out)("sendgrid_spamreport_address_too_long_opts_nobody_out")
signed_sendgrid(lambda p: sendgrid_body([{**p.event("bounce"), "timestamp": "yesterday", "submission": True,
                                          "status": {"code": "5.1.1"}, "reason": ["550"], "sg_event_id": {"x": 1},
                                          "sg_message_id": 7, "type": ["blocked"]}]), status=200,
                publishes=_bounce_without_its_optional_fields)(
    "sendgrid_optional_fields_of_wrong_types_count_as_absent")


@case(MALFORMED, 400)
async def sendgrid_gzip_not_gzip(h: Hostile, p: Probe) -> int:
    body = b"\x1f\x8b\x08\x00 this is not a gzip stream " * 10
    return await h.post("/sendgrid/events", body, {**h.sendgrid_headers(body), "Content-Encoding": "gzip"})


# -- forged: bad or missing signatures on requests that would publish (an opt-out and a result each)

def forged_status(signature=None, token: str | None = None, path: Callable[[Probe], str] | None = None,
                  tamper: Callable[[dict], dict] | None = None, base: str | None = None):
    def run_for(name: str):
        async def run(h: Hostile, p: Probe) -> int:
            form = p.status_form("failed", "21610")
            signed_path = path(p) if path else p.status_path
            if signature is not None:
                header = signature
            else:
                header = h.twilio_signature(signed_path, form, token or TOKEN, base=base)
            sent = tamper(dict(form)) if tamper else form
            return await h.twilio(p.status_path, sent, signature=header)
        run.__name__ = name
        case(FORGED, 403)(run)
    return run_for


async def twilio_status_no_signature(h: Hostile, p: Probe) -> int:
    return await h.twilio(p.status_path, p.status_form("failed", "21610"), signature=None)


case(FORGED, 403)(twilio_status_no_signature)
forged_status(signature="")("twilio_status_empty_signature")
forged_status(signature="AAAAAAAAAAAAAAAAAAAAAAAAAAA=")("twilio_status_garbage_signature")
forged_status(signature="not base64 at all !!")("twilio_status_signature_not_base64")
forged_status(token="another-auth-token-0000")("twilio_status_other_token")
forged_status(token=SIMULATOR_TOKEN)("twilio_status_simulators_public_token")
forged_status(path=lambda p: f"/twilio/status?message_id={uuid.uuid4()}&campaign_id={p.campaign_id}")(
    "twilio_status_signed_for_another_message")
forged_status(tamper=lambda form: {**form, "ErrorCode": "30003"})("twilio_status_field_changed_after_signing")
forged_status(tamper=lambda form: {**form, "Extra": "1"})("twilio_status_field_added_after_signing")
forged_status(tamper=lambda form: {k: v for k, v in form.items() if k != "AccountSid"})(
    "twilio_status_field_removed_after_signing")
forged_status(base="https://attacker.example")("twilio_status_signed_for_another_host")


def forged_inbound(signature=None, token: str | None = None, path: str = "/twilio/inbound",
                   tamper: Callable[[dict], dict] | None = None):
    def run_for(name: str):
        async def run(h: Hostile, p: Probe) -> int:
            form = p.inbound_form("START")
            header = signature if signature is not None else h.twilio_signature(path, form, token or TOKEN)
            sent = tamper(dict(form)) if tamper else form
            return await h.twilio("/twilio/inbound", sent, signature=header)
        run.__name__ = name
        case(FORGED, 403)(run)
    return run_for


async def twilio_inbound_no_signature(h: Hostile, p: Probe) -> int:
    return await h.twilio("/twilio/inbound", p.inbound_form("STOP"), signature=None)


case(FORGED, 403)(twilio_inbound_no_signature)
forged_inbound(signature="forged")("twilio_inbound_garbage_signature")
forged_inbound(token="another-auth-token-0000")("twilio_inbound_other_token")
forged_inbound(token=SIMULATOR_TOKEN)("twilio_inbound_simulators_public_token")
forged_inbound(tamper=lambda form: {**form, "Body": "STOP"})("twilio_inbound_body_changed_after_signing")
forged_inbound(tamper=lambda form: {**form, "From": "+12025550000"})("twilio_inbound_sender_changed_after_signing")
forged_inbound(path="/twilio/status")("twilio_inbound_signed_for_the_status_route")


def forged_sendgrid(headers: Callable[[Hostile, bytes], dict], tamper: Callable[[bytes], bytes] | None = None):
    def run_for(name: str):
        async def run(h: Hostile, p: Probe) -> int:
            body = sendgrid_body([p.event("spamreport")])
            sent = tamper(body) if tamper else body
            return await h.post("/sendgrid/events", sent, {"Content-Type": "application/json", **headers(h, body)})
        run.__name__ = name
        case(FORGED, 403)(run)
    return run_for


def _without(name: str):
    return lambda h, body: {k: v for k, v in h.sendgrid_headers(body).items() if k != name}


forged_sendgrid(lambda h, body: {})("sendgrid_no_signature_headers")
forged_sendgrid(_without(sigs.SENDGRID_SIGNATURE_HEADER))("sendgrid_no_signature")
forged_sendgrid(_without(sigs.SENDGRID_TIMESTAMP_HEADER))("sendgrid_no_timestamp")
forged_sendgrid(lambda h, body: h.sendgrid_headers(body, key=OTHER_KEY))("sendgrid_other_key")
forged_sendgrid(lambda h, body: h.sendgrid_headers(body, key=simulator_private_key()))(
    "sendgrid_simulators_public_key_pair")
forged_sendgrid(lambda h, body: {**h.sendgrid_headers(body, timestamp="1700000000"),
                                 sigs.SENDGRID_TIMESTAMP_HEADER: "1700000001"})("sendgrid_timestamp_changed")
forged_sendgrid(lambda h, body: h.sendgrid_headers(body), tamper=lambda body: body + b" ")(
    "sendgrid_body_changed_by_one_byte")
forged_sendgrid(lambda h, body: {**h.sendgrid_headers(body), sigs.SENDGRID_SIGNATURE_HEADER: "%%%not-base64%%%"})(
    "sendgrid_signature_not_base64")
forged_sendgrid(lambda h, body: h.sendgrid_headers(b"[]"))("sendgrid_signature_of_another_body")
forged_sendgrid(lambda h, body: {**h.sendgrid_headers(body), sigs.SENDGRID_SIGNATURE_HEADER: "é" * 50})(
    "sendgrid_signature_not_ascii")


def forged_unsubscribe(make_query: Callable[[Hostile, Probe], str], method: str = "POST"):
    def run_for(name: str):
        async def run(h: Hostile, p: Probe) -> int:
            url = URL(h.base + "/unsubscribe?" + make_query(h, p), encoded=True)
            async with h.session.request(method, url, data={"List-Unsubscribe": "One-Click"}
                                         if method == "POST" else None) as response:
                return response.status
        run.__name__ = name
        case(FORGED, 403)(run)
    return run_for


def _query(p: Probe, **changes) -> str:
    params = {"v": "1", "campaign_id": p.campaign_id, "message_id": p.message_id, "destination": p.email,
              "sig": "0" * 64, **changes}
    return urlencode({k: v for k, v in params.items() if v is not None})


def _signed_with_default_secret(h: Hostile, p: Probe) -> str:
    default = h.settings.model_copy(update={"unsubscribe_secret": Settings().unsubscribe_secret})
    return unsubscribe_url(default, p.campaign_id, p.message_id, p.email).split("?", 1)[1]


def _signed_for_someone_else(h: Hostile, p: Probe) -> str:
    real = unsubscribe_url(h.settings, p.campaign_id, p.message_id, "someone-else@example.com").split("?", 1)[1]
    return real.replace("someone-else%40example.com", p.email.replace("@", "%40"))


forged_unsubscribe(lambda h, p: _query(p))("unsubscribe_zero_signature")
forged_unsubscribe(lambda h, p: _query(p, sig=None))("unsubscribe_no_signature")
forged_unsubscribe(_signed_with_default_secret)("unsubscribe_signed_with_the_public_default_secret")
forged_unsubscribe(_signed_for_someone_else)("unsubscribe_signature_of_another_address")
forged_unsubscribe(lambda h, p: _query(p, sig="z" * 5000))("unsubscribe_signature_huge")
forged_unsubscribe(lambda h, p: _query(p), method="GET")("unsubscribe_page_forged")


# -- replayed: published once however often, wherever and whenever it comes back

def _once(outcome: str | None = None, opt_out: tuple[str, bool] | None = None):
    """publishes: exactly one result (of `outcome`) and one opt-out (source, opted_out) at most."""
    def check(p: Probe, results: list[dict], opt_outs: list[dict]) -> None:
        assert [r["outcome"] for r in results] == ([outcome] if outcome else []), results
        assert [(o["source"], o["opted_out"]) for o in opt_outs] == ([opt_out] if opt_out else []), opt_outs
    return check


@case(REPLAYED, 200, publishes=_once("spamreport", ("email_spamreport", True)))
async def sendgrid_batch_posted_three_times(h: Hostile, p: Probe) -> int:
    body = sendgrid_body([p.event("spamreport")])
    statuses = {await h.sendgrid(body) for _ in range(3)}
    return statuses.pop() if len(statuses) == 1 else 0


@case(REPLAYED, 200, publishes=_once("spamreport", ("email_spamreport", True)))
async def sendgrid_same_event_twice_in_one_batch(h: Hostile, p: Probe) -> int:
    event = p.event("spamreport")
    return await h.sendgrid([event, dict(event)])


@case(REPLAYED, 200, publishes=_once("spamreport", ("email_spamreport", True)))
async def sendgrid_event_again_in_another_batch_resigned_later(h: Hostile, p: Probe) -> int:
    event = p.event("spamreport")
    first = await h.sendgrid([event])
    other = {**p.event("open"), "message_id": str(uuid.uuid4())}  # not mapped: publishes nothing
    second = await h.sendgrid([other, event], timestamp=str(int(time.time()) + 60))
    return first if first == second else 0


@case(REPLAYED, 200, publishes=_once(None, ("sms_stop", True)))
async def inbound_stop_three_times(h: Hostile, p: Probe) -> int:
    form = p.inbound_form("STOP")
    answers = [await h.inbound(form) for _ in range(3)]
    assert "unsubscribed" in answers[0][1] and all(text.endswith("<Response/>") for _, text in answers[1:])
    return answers[-1][0]


def _start_then_stop(p: Probe, results: list[dict], opt_outs: list[dict]) -> None:
    assert [(o["source"], o["opted_out"]) for o in opt_outs] == [("sms_start", False), ("sms_stop", True)], opt_outs
    assert results == [], results


@case(REPLAYED, 200, publishes=_start_then_stop)
async def inbound_start_replayed_after_a_stop(h: Hostile, p: Probe) -> int:
    start = p.inbound_form("START")
    assert (await h.inbound(start))[0] == 200
    assert (await h.inbound(p.inbound_form("STOP")))[0] == 200
    status, text = await h.inbound(start)  # would resubscribe: nothing changes
    assert text.endswith("<Response/>")
    return status


@case(REPLAYED, 200, publishes=_once(None, ("sms_start", False)))
async def inbound_replay_with_fields_reordered_and_added(h: Hostile, p: Probe) -> int:
    form = p.inbound_form("START")
    assert (await h.inbound(form))[0] == 200
    replay = {"NumMedia": "0", **dict(reversed(list(form.items())))}
    return (await h.inbound(replay))[0]


@case(REPLAYED, 200, publishes=_once("failed", ("twilio_21610", True)))
async def twilio_21610_status_twice(h: Hostile, p: Probe) -> int:
    form = p.status_form("failed", "21610")
    first = await h.twilio(p.status_path, form)
    return first if first == await h.twilio(p.status_path, form) else 0


@case(REPLAYED, 200, publishes=_once("spamreport", ("email_spamreport", True)))
async def sendgrid_forged_first_then_signed(h: Hostile, p: Probe) -> int:
    body = sendgrid_body([p.event("spamreport")])
    assert await h.sendgrid(body, key=OTHER_KEY) == 403  # refused: remembers nothing
    return await h.sendgrid(body)


@case(REPLAYED, 200, publishes=_once(None, ("sms_stop", True)))
async def inbound_forged_first_then_signed(h: Hostile, p: Probe) -> int:
    form = p.inbound_form("STOP")
    assert await h.twilio("/twilio/inbound", form, token=SIMULATOR_TOKEN) == 403
    return (await h.inbound(form))[0]


def _every_status(p: Probe, results: list[dict], opt_outs: list[dict]) -> None:
    assert [r["outcome"] for r in results] == ["delivered", "sent", "delivered"] and opt_outs == [], (results,
                                                                                                    opt_outs)


@case(REPLAYED, 200, publishes=_every_status)
async def twilio_stale_and_repeated_statuses_go_to_the_handler(h: Hostile, p: Probe) -> int:
    """Published as they come: the handler's rules make a stale or repeated status change nothing
    (test_a_stale_or_replayed_status_changes_nothing_in_the_handler)."""
    sid = new_sid()
    statuses = [await h.twilio(p.status_path, p.status_form(s, None, sid=sid)) for s in ("delivered", "sent",
                                                                                         "delivered")]
    return statuses[0] if len(set(statuses)) == 1 else 0


# -- oversized

def _sendgrid_padded(p: Probe, size: int) -> bytes:
    """A JSON array of the probe's event, padded with whitespace to `size` bytes."""
    body = sendgrid_body([p.event("spamreport")])
    return body[:-1] + b" " * (size - len(body)) + b"]"


@case(OVERSIZED, 413)
async def sendgrid_declared_one_byte_over_the_cap(h: Hostile, p: Probe) -> int:
    body = _sendgrid_padded(p, SENDGRID_MAX_BYTES + 1)
    head = (f"POST /sendgrid/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in h.sendgrid_headers(body).items() if k != "Content-Type") + "\r\n")
    return await h.raw(head, [body[:1000]])  # never sends the rest: the answer comes first


@case(OVERSIZED, 413)
async def sendgrid_declared_100_mib(h: Hostile, p: Probe) -> int:
    return await h.raw(f"POST /sendgrid/events HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * 2**20}\r\n\r\n",
                       [b"[" + b" " * 1000])


@case(OVERSIZED, 413)
async def sendgrid_sent_whole_one_byte_over_the_cap(h: Hostile, p: Probe) -> int:
    return await h.sendgrid(_sendgrid_padded(p, SENDGRID_MAX_BYTES + 1))


@case(OVERSIZED, 413)
async def sendgrid_chunked_over_the_cap(h: Hostile, p: Probe) -> int:
    body = _sendgrid_padded(p, SENDGRID_MAX_BYTES + 64 * 1024)
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    head = ("POST /sendgrid/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in h.sendgrid_headers(body).items()) + "\r\n")
    return await h.raw(head, [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"])


@case(OVERSIZED, 413)
async def sendgrid_gzip_bomb(h: Hostile, p: Probe) -> int:
    inflated = _sendgrid_padded(p, 16 * SENDGRID_MAX_BYTES)
    body = gzip.compress(inflated)
    assert len(body) < SENDGRID_MAX_BYTES // 10
    return await h.post("/sendgrid/events", body, {**h.sendgrid_headers(inflated), "Content-Encoding": "gzip"})


@case(OVERSIZED, 413)
async def sendgrid_expect_100_continue_over_the_cap(h: Hostile, p: Probe) -> int:
    head = (f"POST /sendgrid/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Length: {SENDGRID_MAX_BYTES + 1}\r\n\r\n")
    return await h.raw(head, read_before_body=True)  # answered before any of the body is sent


@case(OVERSIZED, 413)
async def twilio_status_declared_over_the_cap(h: Hostile, p: Probe) -> int:
    body = urlencode({**p.status_form(), "Pad": "x" * TWILIO_MAX_BYTES}).encode()
    head = (f"POST {p.status_path} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: {len(body)}\r\n"
            f"{sigs.TWILIO_SIGNATURE_HEADER}: anything\r\n\r\n")
    return await h.raw(head, [body[:500]])


@case(OVERSIZED, 413)
async def twilio_status_chunked_over_the_cap(h: Hostile, p: Probe) -> int:
    form = {**p.status_form(), "Pad": "x" * TWILIO_MAX_BYTES}
    body = urlencode(form).encode()
    head = (f"POST {p.status_path} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nTransfer-Encoding: chunked\r\n"
            f"{sigs.TWILIO_SIGNATURE_HEADER}: {h.twilio_signature(p.status_path, form)}\r\n\r\n")
    chunks = [body[i:i + 8192] for i in range(0, len(body), 8192)]
    return await h.raw(head, [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"])


@case(OVERSIZED, 413)
async def twilio_inbound_sent_whole_over_the_cap_signed(h: Hostile, p: Probe) -> int:
    return await h.twilio("/twilio/inbound", {**p.inbound_form("STOP"), "Pad": "x" * TWILIO_MAX_BYTES})


@case(OVERSIZED, 413)
async def twilio_inbound_expect_100_continue_over_the_cap(h: Hostile, p: Probe) -> int:
    head = (f"POST /twilio/inbound HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nExpect: 100-continue\r\n"
            f"Content-Length: {TWILIO_MAX_BYTES + 1}\r\n\r\n")
    return await h.raw(head, read_before_body=True)


@case(OVERSIZED, 413)
async def twilio_inbound_gzip_bomb(h: Hostile, p: Probe) -> int:
    form = {**p.inbound_form("STOP"), "Pad": "x" * (4 * TWILIO_MAX_BYTES)}
    body = gzip.compress(urlencode(form).encode())
    return await h.post("/twilio/inbound", body, {
        "Content-Type": FORM, "Content-Encoding": "gzip",
        sigs.TWILIO_SIGNATURE_HEADER: h.twilio_signature("/twilio/inbound", form)})


@case(OVERSIZED, 413)
async def unsubscribe_declared_over_the_cap(h: Hostile, p: Probe) -> int:
    query = unsubscribe_url(h.settings, p.campaign_id, p.message_id, p.email).split("?", 1)[1]
    head = (f"POST /unsubscribe?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n"
            f"Content-Length: {UNSUBSCRIBE_MAX_BYTES + 1}\r\n\r\n")
    return await h.raw(head, [b"List-Unsubscribe=One-Click&"])


@case(OVERSIZED, 200, publishes=_once("spamreport", ("email_spamreport", True)))
async def sendgrid_exactly_at_the_cap_is_taken(h: Hostile, p: Probe) -> int:
    return await h.sendgrid(_sendgrid_padded(p, SENDGRID_MAX_BYTES))


@case(OVERSIZED, 200, publishes=_once(None, ("sms_stop", True)))
async def twilio_inbound_exactly_at_the_cap_is_taken(h: Hostile, p: Probe) -> int:
    form = p.inbound_form("STOP")
    form["Pad"] = ""
    form["Pad"] = "x" * (TWILIO_MAX_BYTES - len(urlencode(form).encode()))
    assert len(urlencode(form).encode()) == TWILIO_MAX_BYTES
    return (await h.inbound(form))[0]


@case(OVERSIZED, 200)
async def sendgrid_a_third_of_a_million_empty_events(h: Hostile, p: Probe) -> int:
    body = b"[" + b",".join([b"{}"] * ((SENDGRID_MAX_BYTES - 2) // 3)) + b"]"
    return await h.sendgrid(body)


@case(OVERSIZED, 400)
async def twilio_signature_header_over_aiohttps_limit(h: Hostile, p: Probe) -> int:
    return await h.twilio("/twilio/inbound", p.inbound_form("STOP"), signature="A" * 20_000)


TABLES = {"malformed": MALFORMED, "forged": FORGED, "replayed": REPLAYED, "oversized": OVERSIZED}
CASES = [(kind, name) for kind, table in TABLES.items() for name in table]


@pytest.mark.parametrize("kind, name", CASES, ids=[f"{kind}-{name}" for kind, name in CASES])
async def test_hostile_webhook(hostile: Hostile, kind: str, name: str):
    entry = TABLES[kind][name]
    probe = Probe()
    assert await entry.run(hostile, probe) == entry.status
    await hostile.alive()
    if entry.publishes is None:
        await hostile.nothing_published(probe)
    else:
        results, opt_outs = await hostile.settle(probe)
        entry.publishes(probe, results, opt_outs)


def test_the_tables_are_large_enough():
    counts = {kind: len(table) for kind, table in TABLES.items()}
    print("hostile webhooks per kind:", counts, "total", sum(counts.values()))
    assert all(count >= 10 for count in counts.values()) and sum(counts.values()) >= 60, counts


# ------------------------------------------------------------------ replays after a restart, on another instance

@asynccontextmanager
async def another_receiver(kafka_bootstrap: str, tail: Tail, data_dir, port: int | None = None):
    """A receiver of its own (its published ids in `data_dir`, beside its event store), with its own session."""
    settings = receiver_settings(kafka_bootstrap, data_dir, port)
    async with running(settings), aiohttp.ClientSession() as session:
        yield Hostile(settings, session, tail)


async def _sendgrid_spamreport(h: Hostile, p: Probe, state: dict) -> int:
    state.setdefault("body", sendgrid_body([p.event("spamreport")]))
    return await h.sendgrid(state["body"])


async def _inbound_stop(h: Hostile, p: Probe, state: dict) -> int:
    state.setdefault("form", p.inbound_form("STOP"))
    return (await h.inbound(state["form"]))[0]


async def _twilio_21610(h: Hostile, p: Probe, state: dict) -> int:
    state.setdefault("form", p.status_form("failed", "21610"))
    return await h.twilio(p.status_path, state["form"])


async def _inbound_start(h: Hostile, p: Probe, state: dict) -> int:
    state.setdefault("form", p.inbound_form("START"))
    return (await h.inbound(state["form"]))[0]


LATER_REPLAYS = {  # name -> (request, what it published once)
    "sendgrid_event": (_sendgrid_spamreport, _once("spamreport", ("email_spamreport", True))),
    "inbound_stop": (_inbound_stop, _once(None, ("sms_stop", True))),
    "inbound_start": (_inbound_start, _once(None, ("sms_start", False))),
    "twilio_21610_status": (_twilio_21610, _once("failed", ("twilio_21610", True))),
}
WHERE = ("after_a_restart", "on_another_instance")


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("name", list(LATER_REPLAYS))
async def test_a_replay_after_a_restart_or_on_another_instance_publishes_nothing(
        hostile, kafka_bootstrap, tail, tmp_path, name, where):
    send, published_once = LATER_REPLAYS[name]
    probe, state = Probe(), {}
    port = free_port()
    async with another_receiver(kafka_bootstrap, tail, tmp_path, port) as first:
        assert await send(first, probe, state) == 200
        if where == "on_another_instance":
            async with another_receiver(kafka_bootstrap, tail, tmp_path) as second:  # the same shared store
                assert await send(second, probe, state) == 200
                await second.alive()
    if where == "after_a_restart":
        async with another_receiver(kafka_bootstrap, tail, tmp_path, port) as restarted:
            assert await send(restarted, probe, state) == 200
            await restarted.alive()
    results, opt_outs = await hostile.settle(probe)
    published_once(probe, results, opt_outs)


# ------------------------------------------------------------------ what the handler makes of it

@pytest.fixture
def handler_app(tmp_path, monkeypatch):
    """The command handler's application on a SQLite event store of its own."""
    from services.command_handler.application import OutreachApp
    from services.common.settings import get_settings

    monkeypatch.setenv("OUTREACH_EVENT_STORE", "sqlite")
    monkeypatch.setenv("OUTREACH_SQLITE_PATH", str(tmp_path / "handler-events.db"))
    application = OutreachApp(get_settings())
    yield application
    application.close()


def raw_records(tail: Tail, topic: str, match: Callable[[dict], bool]) -> list[bytes]:
    return [record.value for record, value in tail.records[topic] if isinstance(value, dict) and match(value)]


async def test_a_stale_or_replayed_status_changes_nothing_in_the_handler(hostile, tail, handler_app):
    """`delivered`, then a stale `sent` and the `delivered` again, as the receiver published them, into the
    command handler: the first moves the message, the others store nothing."""
    from services.common import ids
    from tests.handler_driver import Driver, sender_result
    from tests.test_domain_rules import ALL_TRUE, new_campaign

    d = Driver(handler_app)
    campaign_id = new_campaign(d, n=1)
    d.send("RunCampaign", campaign_id, disclaimer=ALL_TRUE)
    handler_app.claim(claim_id=str(uuid.uuid4()), campaign_id=campaign_id, max_messages=1)
    message_id = ids.message_id(campaign_id, 2)
    handler_app.apply_results(result_id=str(uuid.uuid4()), campaign_id=campaign_id,
                              results=[sender_result(message_id, "accepted")])
    d.new_records()

    probe = Probe(campaign_id=campaign_id, message_id=message_id)
    sid = new_sid()
    for status in ("delivered", "sent", "delivered"):
        form = probe.status_form(status, None, sid=sid)
        assert await hostile.twilio(probe.status_path + "&submission=1", form) == 200
    await async_wait_until(lambda: len(hostile.results(probe)) == 3, 20, message="the statuses never arrived")
    first, *again = raw_records(tail, topics.SENDER_RESULTS, lambda v: v.get("campaign_id") == campaign_id)
    assert d.handler.handle(topics.SENDER_RESULTS, first) is None
    moved = [r["value"] for r in d.new_records() if r["topic"] == topics.MESSAGE_STATUS]
    assert [(m["message_id"], m["status"]) for m in moved] == [(message_id, "delivered")]
    for raw in again:
        assert d.handler.handle(topics.SENDER_RESULTS, raw) is None
    assert d.new_records() == []  # stale and repeated: nothing stored, nothing published
    block = handler_app.repository.get(ids.block_id(campaign_id, 0))
    assert block.status[0] == "delivered"


async def test_a_replayed_start_or_21610_after_a_restart_changes_no_opt_out(hostile, kafka_bootstrap, tail,
                                                                             handler_app, tmp_path):
    """START then STOP, the START replayed after a restart: still opted out. A 21610 status then START, the
    status replayed: still opted in. What the receiver published, into the handler's opt-out list."""
    from tests.handler_driver import Driver

    d = Driver(handler_app)
    start_stop, stop_start = Probe(), Probe()
    port = free_port()
    start = start_stop.inbound_form("START")
    failed = stop_start.status_form("failed", "21610")
    async with another_receiver(kafka_bootstrap, tail, tmp_path, port) as first:
        assert (await first.inbound(start))[0] == 200
        assert (await first.inbound(start_stop.inbound_form("STOP")))[0] == 200
        assert await first.twilio(stop_start.status_path, failed) == 200
        assert (await first.inbound(stop_start.inbound_form("START")))[0] == 200
    async with another_receiver(kafka_bootstrap, tail, tmp_path, port) as restarted:
        assert (await restarted.inbound(start))[0] == 200  # the replays
        assert await restarted.twilio(stop_start.status_path, failed) == 200
    for probe, expected in ((start_stop, [("sms_start", False), ("sms_stop", True)]),
                            (stop_start, [("twilio_21610", True), ("sms_start", False)])):
        await hostile.settle(probe)  # its markers come after the replays: whatever they published is read
        records = [(record.value, value) for record, value in tail.records[topics.OPT_OUTS]
                   if isinstance(value, dict) and value["destination"] == probe.phone]
        *before_marker, (_, marker) = records
        assert marker["source"] == "sms_stop"
        assert [(value["source"], value["opted_out"]) for _, value in before_marker] == expected  # no replay
        for raw, _ in before_marker:
            assert d.handler.handle(topics.OPT_OUTS, raw) is None
    assert start_stop.phone in handler_app.suppressed("sms")
    assert stop_start.phone not in handler_app.suppressed("sms")
