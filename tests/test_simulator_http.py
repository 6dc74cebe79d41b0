"""The HTTP provider simulator (services/simulator/) over real HTTP: every outcome of the contract's table on
both channels, signed callbacks checked by a receiver in the test with its own signature code, auth, probes,
held requests, retries, batching, the process entry point, and a throughput measurement."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.embedded_broker import free_port
from services.common.settings import Settings
from services.simulator import SIMULATOR_SENDGRID_PUBLIC_KEY
from services.simulator.app import Simulator
from services.simulator.signing import twilio_signature

ROOT = Path(__file__).resolve().parents[1]
SID = "ACtest0000000000000000000000000001"
TOKEN = "test-auth-token"
API_KEY = "SG.test-key"
LATE_S = 0.6
DEFER_S = 0.1
WINDOW_S = 1.0


# ------------------------------------------------------------------ independent signature checks

def independent_twilio_signature(token: str, url: str, pairs: list[tuple[str, str]]) -> str:
    data = url + "".join(k + v for k, v in sorted(pairs))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def sendgrid_valid(body: bytes, signature: str | None, timestamp: str | None) -> bool:
    key = serialization.load_der_public_key(base64.b64decode(SIMULATOR_SENDGRID_PUBLIC_KEY))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(base64.b64decode(signature or ""), (timestamp or "").encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# Vectors from Twilio's own RequestValidator tests (twilio-python tests/unit/test_request_validator.py).
TWILIO_URI = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {"CallSid": "CA1234567890ABCDE", "Digits": "1234", "From": "+14158675309", "To": "+18005551212",
                 "Caller": "+14158675309"}


def test_twilio_signature_matches_twilio_vectors():
    assert twilio_signature("12345", TWILIO_URI, TWILIO_PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert independent_twilio_signature("12345", TWILIO_URI, list(TWILIO_PARAMS.items())) == \
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    with_port = TWILIO_URI.replace(".com", ".com:1234").replace("https", "http")
    assert twilio_signature("12345", with_port, TWILIO_PARAMS) == "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
    duplicates = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234")]
    assert twilio_signature("12345", TWILIO_URI, duplicates) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_public_key_is_the_simulators():
    from services.simulator.signing import SIMULATOR_SENDGRID_PRIVATE_KEY_PEM, sendgrid_signature

    private = serialization.load_pem_private_key(SIMULATOR_SENDGRID_PRIVATE_KEY_PEM, password=None)
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert base64.b64encode(der).decode() == SIMULATOR_SENDGRID_PUBLIC_KEY
    assert sendgrid_valid(b"[]", sendgrid_signature(b"[]", "1700000000"), "1700000000")
    assert not sendgrid_valid(b"[ ]", sendgrid_signature(b"[]", "1700000000"), "1700000000")


# ------------------------------------------------------------------ the webhook receiver played by the test

class Receiver:
    def __init__(self) -> None:
        self.sms: list[dict] = []  # form params + "_valid"
        self.posts: list[dict] = []  # {"events", "valid"}
        self.fail_next = 0  # answer 500 to this many requests first
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/twilio/status", self.twilio)
        app.router.add_post("/sendgrid/events", self.sendgrid)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    def _failing(self) -> bool:
        if self.fail_next > 0:
            self.fail_next -= 1
            return True
        return False

    async def twilio(self, request: web.Request) -> web.Response:
        if self._failing():
            return web.Response(status=500)
        form = await request.post()
        pairs = [(k, str(v)) for k, v in form.items()]
        expected = independent_twilio_signature(TOKEN, str(request.url), pairs)
        self.sms.append({**dict(pairs), "_valid": request.headers.get("X-Twilio-Signature") == expected,
                         "_at": time.monotonic(), "_url": str(request.url)})
        return web.Response(status=204)

    async def sendgrid(self, request: web.Request) -> web.Response:
        if self._failing():
            return web.Response(status=500)
        body = await request.read()
        valid = sendgrid_valid(body, request.headers.get("X-Twilio-Email-Event-Webhook-Signature"),
                               request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp"))
        self.posts.append({"events": orjson.loads(body), "valid": valid, "_at": time.monotonic()})
        return web.Response(status=200)

    def sms_for(self, sid: str) -> list[dict]:
        return [c for c in self.sms if c["MessageSid"] == sid]

    def events_for(self, message_id: str) -> list[dict]:
        return [e for p in self.posts for e in p["events"] if e.get("message_id") == message_id]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def receiver():
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def make_settings(receiver_url: str, **overrides) -> Settings:
    values = dict(twilio_account_sid=SID, twilio_auth_token=TOKEN, sendgrid_api_key=API_KEY,
                  webhook_public_url=receiver_url, sim_late_receipt_s=LATE_S, sim_defer_interval_s=DEFER_S,
                  retry_window_s=WINDOW_S, simulator_host="127.0.0.1", simulator_port=0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def sim(receiver):
    simulator = Simulator(make_settings(receiver.url), retry_delays=(0.05, 0.1, 0.2))
    await simulator.start("127.0.0.1", 0)
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client():
    async with aiohttp.ClientSession() as session:
        yield session


# ------------------------------------------------------------------ Twilio

def twilio_auth(sid: str = SID, token: str = TOKEN) -> dict[str, str]:
    """HTTP Basic auth headers (account sid : auth token)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{sid}:{token}".encode()).decode()}


async def twilio_create(client, sim, to: str, receiver=None, *, message_id: str | None = None,
                        auth=None, timeout: float | None = None, sid: str = SID):
    form = {"To": to, "Body": "Hello from Outreach", "MessagingServiceSid": "MGtest"}
    if receiver is not None:
        form["StatusCallback"] = (f"{receiver.url}/twilio/status?message_id={message_id or uuid.uuid4()}"
                                  f"&campaign_id=7a1c2e3d-0000-4000-8000-000000000001")
    async with client.post(f"{sim.url}/2010-04-01/Accounts/{sid}/Messages.json", data=form,
                           headers=auth or twilio_auth(),
                           timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None) as response:
        return response.status, await response.json()


SMS_TABLE = [
    # destination, answers to submissions 1..3 (None: stop there), receipts [(MessageStatus, ErrorCode)]
    ("+15005550001", [(400, 21211)], []),
    ("+15005550002", [(400, 21612)], []),
    ("+15005550003", [(400, 21408)], []),
    ("+15005550004", [(400, 21610)], []),
    ("+15005550009", [(400, 21614)], []),
    ("+12125550100", [(201, None)], [("sent", None), ("delivered", None)]),
    ("+12125550101", [(201, None)], [("sent", None)]),
    ("+12125550102", [(201, None)], [("sent", None), ("undelivered", "30003")]),
    ("+12125550103", [(201, None)], [("sent", None), ("failed", "30007")]),
    ("+12125550104", [(503, 20503), (503, 20503), (201, None)], [("sent", None), ("delivered", None)]),
    ("+12125550105", [(503, 20503), (503, 20503), (503, 20503)], []),
    ("+12125550107", [(201, None)], [("sent", None), ("delivered", None)]),
    ("+12125550108", [(201, None)], [("sent", None), ("delivered", None)]),
    ("+447700900123", [(201, None)], [("sent", None), ("delivered", None)]),
]


@pytest.mark.parametrize(("to", "answers", "receipts"), SMS_TABLE)
async def test_twilio_outcomes(sim, receiver, client, to, answers, receipts):
    message_id = str(uuid.uuid4())
    sid = None
    for status, code in answers:
        got_status, body = await twilio_create(client, sim, to, receiver, message_id=message_id)
        assert got_status == status, body
        if status == 201:
            sid = body["sid"]
            assert sid.startswith("SM") and len(sid) == 34 and body["status"] == "accepted" and body["to"] == to
        else:
            assert body["code"] == code and body["status"] == status and body["message"]
    log = await (await client.get(f"{sim.url}/_simulator/submissions")).json()
    assert [e["attempt"] for e in log[message_id]] == list(range(1, len(answers) + 1))
    assert log[message_id][0]["campaign_id"] == "7a1c2e3d-0000-4000-8000-000000000001"
    if sid is None:
        await asyncio.sleep(0.3)
        assert receiver.sms == []
        return
    await wait_for(lambda: len(receiver.sms_for(sid)) >= len(receipts), timeout=3)
    await asyncio.sleep(0.3 if not to.endswith("7") else 0.1)  # nothing more comes
    got = receiver.sms_for(sid)
    assert [(c["MessageStatus"], c.get("ErrorCode")) for c in got] == receipts
    for callback in got:
        assert callback["_valid"], "X-Twilio-Signature does not verify"
        assert callback["AccountSid"] == SID and callback["To"] == to and callback["SmsSid"] == sid
        assert f"message_id={message_id}" in callback["_url"]
    if to.endswith("7"):
        assert got[1]["_at"] - got[0]["_at"] >= LATE_S * 0.9
    else:
        assert got[-1]["_at"] - got[0]["_at"] < 1.0


async def test_twilio_no_answer_is_held_until_the_client_gives_up(sim, receiver, client):
    with pytest.raises(asyncio.TimeoutError):  # held until then (how long after: bench/sender_timings.py)
        await twilio_create(client, sim, "+12125550106", receiver, timeout=0.4)
    await wait_for(lambda: sim._held == set(), timeout=3)  # the handler ended with the client's connection
    stats = await (await client.get(f"{sim.url}/_simulator/stats")).json()
    assert stats["held_total"] == 1 and stats["held_now"] == 0 and stats["sms_no_answer"] == 1
    assert receiver.sms == []


async def test_twilio_attempts_fall_back_to_destination(sim, client):
    answers = [(await twilio_create(client, sim, "+13105550104"))[0] for _ in range(3)]
    assert answers == [503, 503, 201]
    log = await (await client.get(f"{sim.url}/_simulator/submissions")).json()
    assert [e["attempt"] for e in log["sms:+13105550104"]] == [1, 2, 3]


async def test_twilio_wrong_credentials(sim, client):
    for auth, path_sid in ((twilio_auth(token="nope"), SID), (twilio_auth(sid="ACother"), SID),
                           (twilio_auth(), "ACother00000000000000000000000000")):
        status, body = await twilio_create(client, sim, "+12125550100", auth=auth, sid=path_sid)
        assert status == 401
        assert (body["code"], body["message"], body["status"]) == (20003, "Authenticate", 401)
    async with client.post(f"{sim.url}/2010-04-01/Accounts/{SID}/Messages.json", data={"To": "+12125550100"}) as r:
        assert r.status == 401 and (await r.json())["code"] == 20003
    async with client.get(f"{sim.url}/2010-04-01/Accounts/{SID}.json", headers=twilio_auth(token="x")) as r:
        assert r.status == 401


async def test_twilio_malformed_requests(sim, client):
    url = f"{sim.url}/2010-04-01/Accounts/{SID}/Messages.json"
    cases = [({"Body": "x", "From": "+15005550006"}, 21604), ({"To": "+12125550100", "From": "+15005550006"}, 21602),
             ({"To": "+12125550100", "Body": "x"}, 21603), ({"To": "12125550100", "Body": "x", "From": "+1"}, 21211)]
    for form, code in cases:
        async with client.post(url, data=form, headers=twilio_auth()) as r:
            assert r.status == 400 and (await r.json())["code"] == code


async def test_account_lookups(sim, client):
    async with client.get(f"{sim.url}/2010-04-01/Accounts/{SID}.json", headers=twilio_auth()) as r:
        assert r.status == 200 and (await r.json())["sid"] == SID
    async with client.get(f"{sim.url}/v3/user/account", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 200 and (await r.json())["type"]
    async with client.get(f"{sim.url}/v3/user/account", headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    stats = await (await client.get(f"{sim.url}/_simulator/stats")).json()
    assert stats["account_lookups"] == 2


async def test_callback_retried_when_receiver_fails(sim, receiver, client):
    receiver.fail_next = 2
    status, body = await twilio_create(client, sim, "+12125550100", receiver)
    assert status == 201
    await wait_for(lambda: len(receiver.sms_for(body["sid"])) == 2, timeout=5)
    stats = await (await client.get(f"{sim.url}/_simulator/stats")).json()
    assert stats["callbacks_retried"] >= 2 and stats["callbacks_sent"] == 2
    assert {c["MessageStatus"] for c in receiver.sms_for(body["sid"])} == {"sent", "delivered"}


# ------------------------------------------------------------------ SendGrid

def mail(recipients: list[tuple[str, str]], **extra) -> dict:
    body = {
        "personalizations": [{"to": [{"email": address}], "substitutions": {"-name-": "Ada"},
                              "custom_args": {"message_id": message_id,
                                              "campaign_id": "7a1c2e3d-0000-4000-8000-000000000002"}}
                             for address, message_id in recipients],
        "from": {"email": "team@example.com", "name": "Team"}, "subject": "Hello",
        "content": [{"type": "text/html", "value": "<p>Hi -name-</p>"}],
        "headers": {"List-Unsubscribe": "<https://example.com/u>"},
    }
    body.update(extra)
    return body


async def sendgrid_send(client, sim, body: dict, *, key: str = API_KEY, timeout: float | None = None):
    async with client.post(f"{sim.url}/v3/mail/send", data=orjson.dumps(body),
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                           timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None) as response:
        return response.status, await response.read(), response.headers


EMAIL_TABLE = [
    # address, answers to submissions, events [(event, extra check)]
    ("success@simulator.amazonses.com", [202], ["processed", "delivered"]),
    ("success+x@simulator.amazonses.com", [202], ["processed", "delivered"]),
    ("ooto@simulator.amazonses.com", [202], ["processed", "delivered"]),
    ("bounce@simulator.amazonses.com", [202], ["processed", "bounce"]),
    ("suppressionlist@simulator.amazonses.com", [202], ["processed", "bounce"]),
    ("complaint@simulator.amazonses.com", [202], ["processed", "delivered", "spamreport"]),
    ("ada+defer@example.com", [202], ["processed", "deferred", "deferred", "delivered"]),
    ("ada+deferforever@example.com", [202], ["processed"] + ["deferred"] * 10),
    ("ada+fail503x2@example.com", [503, 503, 202], ["processed", "delivered"]),
    ("ada+fail503@example.com", [503, 503, 503], []),
    ("someone@example.com", [202], ["processed", "delivered"]),
]


@pytest.mark.parametrize(("address", "answers", "expected"), EMAIL_TABLE)
async def test_sendgrid_outcomes(sim, receiver, client, address, answers, expected):
    message_id = str(uuid.uuid4())
    for status in answers:
        got, body, headers = await sendgrid_send(client, sim, mail([(address, message_id)]))
        assert got == status, body
        if status == 202:
            assert body == b"" and headers.get("X-Message-Id")
    log = await (await client.get(f"{sim.url}/_simulator/submissions")).json()
    assert [e["attempt"] for e in log[message_id]] == list(range(1, len(answers) + 1))
    await wait_for(lambda: len(receiver.events_for(message_id)) >= len(expected), timeout=4)
    await asyncio.sleep(0.3)
    events = receiver.events_for(message_id)
    assert [e["event"] for e in events] == expected
    assert all(p["valid"] for p in receiver.posts), "Event Webhook signature does not verify"
    for e in events:
        assert e["email"] == address and e["campaign_id"] == "7a1c2e3d-0000-4000-8000-000000000002"
        assert e["sg_message_id"].startswith(headers["X-Message-Id"]) and isinstance(e["timestamp"], int)
        if e["event"] == "bounce":
            assert e["type"] == "bounce" and e["reason"].startswith("550") and e["bounce_classification"]
    assert len({e["sg_event_id"] for e in events}) == len(events)
    if "deferred" in expected:
        deferrals = [e for e in events if e["event"] == "deferred"]
        assert [e["attempt"] for e in deferrals] == [str(n) for n in range(1, len(deferrals) + 1)]


async def test_sendgrid_submission_outcome_applies_to_the_whole_call(sim, receiver, client):
    ok, failing = str(uuid.uuid4()), str(uuid.uuid4())
    call = mail([("ok@example.com", ok), ("x+fail503x2@example.com", failing)])
    assert [(await sendgrid_send(client, sim, call))[0] for _ in range(3)] == [503, 503, 202]
    log = await (await client.get(f"{sim.url}/_simulator/submissions")).json()
    assert [e["outcome"] for e in log[ok]] == ["presend_error", "presend_error", "accepted"]
    await wait_for(lambda: len(receiver.events_for(ok)) == 2 and len(receiver.events_for(failing)) == 2)

    held = mail([("ok2@example.com", str(uuid.uuid4())), ("x+noanswer@example.com", str(uuid.uuid4()))])
    with pytest.raises(asyncio.TimeoutError):
        await sendgrid_send(client, sim, held, timeout=0.4)
    always = mail([("ok3@example.com", str(uuid.uuid4())), ("x+fail503@example.com", str(uuid.uuid4()))])
    assert (await sendgrid_send(client, sim, always))[0] == 503


async def test_sendgrid_no_answer_within_client_timeout(sim, client):
    with pytest.raises(asyncio.TimeoutError):
        await sendgrid_send(client, sim, mail([("x+noanswer@example.com", str(uuid.uuid4()))]), timeout=0.3)
    await wait_for(lambda: sim._held == set(), timeout=3)


async def test_sendgrid_wrong_key_and_bad_requests(sim, client):
    status, body, _ = await sendgrid_send(client, sim, mail([("a@example.com", str(uuid.uuid4()))]), key="wrong")
    assert status == 401
    assert orjson.loads(body)["errors"][0]["message"] == \
        "The provided authorization grant is invalid, expired, or revoked"
    too_many = mail([(f"u{n}@example.com", str(uuid.uuid4())) for n in range(1001)])
    assert (await sendgrid_send(client, sim, too_many))[0] == 400
    assert (await sendgrid_send(client, sim, {"personalizations": []}))[0] == 400
    assert (await sendgrid_send(client, sim, mail([("a@example.com", "m")], **{"from": {}})))[0] == 400


async def test_sendgrid_events_are_batched(sim, receiver, client):
    recipients = [(f"user{n}@example.com", str(uuid.uuid4())) for n in range(1000)]
    started = time.monotonic()
    status, _, _ = await sendgrid_send(client, sim, mail(recipients))
    assert status == 202
    await wait_for(lambda: sum(len(p["events"]) for p in receiver.posts) == 2000, timeout=10)
    sizes = [len(p["events"]) for p in receiver.posts]
    assert max(sizes) <= 1000 and len(sizes) <= 6, sizes  # ~100 ms batches, not one POST per event
    assert all(p["valid"] for p in receiver.posts)
    ids = {e["sg_event_id"] for p in receiver.posts for e in p["events"]}
    assert len(ids) == 2000
    print(f"\n1000-recipient call: 2000 events in {len(sizes)} POSTs {sizes} within "
          f"{time.monotonic() - started:.2f}s")


async def test_reset_forgets_log_counters_and_pending(sim, receiver, client):
    await twilio_create(client, sim, "+12125550104")
    await twilio_create(client, sim, "+12125550107", receiver)  # its late receipt is pending
    async with client.post(f"{sim.url}/_simulator/reset") as r:
        assert r.status == 200
    assert await (await client.get(f"{sim.url}/_simulator/submissions")).json() == {}
    stats = await (await client.get(f"{sim.url}/_simulator/stats")).json()
    assert stats["scheduled"] == 0
    assert (await twilio_create(client, sim, "+12125550104"))[0] == 503  # attempt 1 again


async def test_stop_releases_held_requests(receiver):
    simulator = Simulator(make_settings(receiver.url))
    await simulator.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(twilio_create(session, simulator, "+12125550106", timeout=30))
        await wait_for(lambda: len(simulator._held) == 1)
        await simulator.stop()  # how long it takes: bench/sender_timings.py
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(pending, 3)


def test_module_entry_point_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "OUTREACH_SIMULATOR_PORT": str(port), "OUTREACH_SIMULATOR_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "services.simulator"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        settings = Settings()
        auth = base64.b64encode(f"{settings.twilio_account_sid}:"
                                f"{settings.twilio_auth_token.get_secret_value()}".encode()).decode()
        import urllib.request

        deadline = time.monotonic() + 10
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/2010-04-01/Accounts/{settings.twilio_account_sid}.json",
                    headers={"Authorization": f"Basic {auth}"})
                with urllib.request.urlopen(request, timeout=1) as response:
                    assert response.status == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ throughput

async def test_twilio_create_throughput(receiver):
    """Creates/s served to one aiohttp client with 64 requests in flight, the simulator in its own process
    (as it runs beside Outreach); then again with StatusCallback (2 signed callbacks per create to the
    receiver, which lives in this test's process: client, receiver and simulator share the 2 cores)."""
    port = free_port()
    env = {**os.environ, "OUTREACH_SIMULATOR_PORT": str(port), "OUTREACH_SIMULATOR_HOST": "127.0.0.1",
           "OUTREACH_TWILIO_ACCOUNT_SID": SID, "OUTREACH_TWILIO_AUTH_TOKEN": TOKEN,
           "OUTREACH_WEBHOOK_PUBLIC_URL": receiver.url}
    proc = subprocess.Popen([sys.executable, "-m", "services.simulator"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total, concurrency = 4000, 64
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/2010-04-01/Accounts/{SID}/Messages.json"
    auth = twilio_auth()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with session.get(f"{base}/2010-04-01/Accounts/{SID}.json", headers=auth) as r:
                        assert r.status == 200
                    break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    await asyncio.sleep(0.1)

            async def measure(callback: bool) -> float:
                counter = iter(range(total))

                async def worker() -> None:
                    for n in counter:
                        form = {"To": "+12125550100", "Body": f"Hello {n}", "MessagingServiceSid": "MGtest"}
                        if callback:
                            form["StatusCallback"] = f"{receiver.url}/twilio/status?message_id={uuid.uuid4()}"
                        async with session.post(url, data=form, headers=auth) as response:
                            await response.read()
                            assert response.status == 201

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                return total / (time.perf_counter() - started)

            await measure(False)  # warm up (connections, caches)
            plain = max([await measure(False) for _ in range(2)])
            with_callbacks = await measure(True)
            await wait_for(lambda: len(receiver.sms) == 2 * total, timeout=30)
            assert all(c["_valid"] for c in receiver.sms)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"\nTwilio creates, one aiohttp client, {concurrency} in flight, simulator in its own process: "
          f"{plain:,.0f} req/s; with 2 signed callbacks per create: {with_callbacks:,.0f} req/s")
    assert plain > 200
