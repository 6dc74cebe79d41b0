"""The webhook receiver (`python -m services.sender.webhooks`): provider callbacks in, internal records out.

Endpoints (on `OUTREACH_WEBHOOK_HOST:OUTREACH_WEBHOOK_PORT`; providers call `settings.webhook_url`):
- `POST /twilio/status?message_id=..&campaign_id=..`: Twilio status callback (`X-Twilio-Signature`).
  sent / delivered -> outcome `sent` / `delivered`; undelivered / failed -> same outcome with
  `provider_code` = ErrorCode; queued / accepted / sending (and anything else) -> ignored. ErrorCode 21610
  also opts `To` out (`twilio_21610`).
- `POST /twilio/inbound`: inbound SMS (signed the same way). STOP words -> opt-out (`sms_stop`), START words
  -> opt-in (`sms_start`), HELP words -> help text; each answered with TwiML, anything else `<Response/>`.
- `POST /sendgrid/events`: SendGrid Event Webhook batch (ECDSA P-256 signature). processed ignored;
  deferred, delivered, bounce (`bounced` / `blocked`), dropped, spamreport, unsubscribe / group_unsubscribe
  map to outcomes; spamreport and unsubscribes also opt the address out. Events without our custom args
  (`message_id`, `campaign_id`) are ignored; `sg_event_id`s published recently are skipped (bounded LRU).
- `GET /unsubscribe?..`: confirmation page (a GET never unsubscribes: mail scanners prefetch links).
  `POST /unsubscribe?..` (RFC 8058 one-click, body `List-Unsubscribe=One-Click`): opt-out + `unsubscribe`
  result. Both verified by `services.sender.unsubscribe.verify_unsubscribe`.
- `GET /healthz`.

Records (docs/design.md): `SenderResults` on `outreach.internal.sender-results` keyed by campaign_id,
batched per campaign (flushed every `FLUSH_INTERVAL_S` or at `MAX_RESULTS_PER_RECORD` results);
`OptOutChanged` on `outreach.internal.opt-outs` keyed by destination, `opt_out_id` = uuid5 of source,
destination and the provider's event id, so a provider's retry carries the same id.

A request is answered 200 only after the broker acknowledged every record it caused (acks=all); if
publishing fails it is answered 503 and the provider retries. A bad signature is 403 and publishes nothing.

Signatures are verified with the Twilio auth token and the SendGrid Event Webhook key of the channel
settings in force: the environment's, replaced by those an org_admin sets over the API (followed on
`outreach.internal.channel-settings`, services/common/channel_settings.py).
"""
from __future__ import annotations

import asyncio
import html
import logging
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from aiohttp import web
from aiokafka import AIOKafkaProducer

from schemas import topics
from schemas.commands import RFC3339_FORMAT
from services.common import channel_settings, jsoncodec, kafka
from services.common.channel_settings import ChannelConfig, ChannelSettingsFeed
from services.common.ids import OUTREACH_NS, is_wire_uuid
from services.common.runtime import run_service
from services.common.settings import Settings
from services.sender import webhook_signatures as sigs

log = logging.getLogger("outreach.webhooks")

FLUSH_INTERVAL_S = 0.01
MAX_RESULTS_PER_RECORD = 1000
SEEN_EVENTS_MAX = 65_536  # sg_event_ids remembered (SendGrid retries a failed batch within hours)
CLIENT_MAX_SIZE = 16 * 1024 * 1024  # SendGrid batches can be large
SHUTDOWN_TIMEOUT_S = 10.0

UnsubscribeVerifier = Callable[[Settings, Mapping[str, str]], "tuple[str, str, str] | None"]


# ------------------------------------------------------------------ record building (pure)

def utc_now() -> str:
    return datetime.now(timezone.utc).strftime(RFC3339_FORMAT)


def _from_unix(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return datetime.fromtimestamp(value, timezone.utc).strftime(RFC3339_FORMAT)
    except (OverflowError, OSError, ValueError):
        return None


def result(message_id: str, outcome: str, *, provider_code: str | None = None,
           provider_message_id: str | None = None, occurred_at: str | None = None) -> dict:
    """One `SenderResults` result; `attempt` is null: a callback does not say which submission it is about."""
    return {"message_id": message_id, "outcome": outcome, "attempt": None, "provider_code": provider_code,
            "provider_message_id": provider_message_id, "occurred_at": occurred_at or utc_now()}


def opt_out(channel: str, destination: str, opted_out: bool, source: str, event_id: str | None,
            occurred_at: str | None = None) -> dict:
    """An `OptOutChanged`; with the provider's event id the record id is stable across provider retries."""
    opt_out_id = (uuid.uuid5(OUTREACH_NS, f"opt-out:{source}:{destination}:{event_id}") if event_id
                  else uuid.uuid4())
    return {"type": "OptOutChanged", "opt_out_id": str(opt_out_id), "channel": channel,
            "destination": destination, "opted_out": opted_out, "source": source,
            "occurred_at": occurred_at or utc_now()}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def normalize_email(address: str) -> str:
    """The address in the form contacts are stored in (email-validator's), so opt-outs match it."""
    from schemas.destinations import validate_destination

    normalized, _ = validate_destination("email", address)
    return normalized or address.strip()


TWILIO_OUTCOMES = {"sent": "sent", "delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}
TWILIO_CODED = {"undelivered", "failed"}
TWILIO_OPTED_OUT_CODE = "21610"


def twilio_status_records(form: Mapping[str, str], message_id: str | None) -> tuple[dict | None, dict | None]:
    """(result or None, opt-out or None) for one Twilio status callback."""
    status = (_text(form.get("MessageStatus")) or _text(form.get("SmsStatus")) or "").lower()
    outcome = TWILIO_OUTCOMES.get(status)
    if outcome is None:  # queued / accepted / sending / scheduled / read ...: nothing changes
        return None, None
    sid = _text(form.get("MessageSid")) or _text(form.get("SmsSid"))
    code = _text(form.get("ErrorCode")) if outcome in TWILIO_CODED else None
    record = result(message_id, outcome, provider_code=code, provider_message_id=sid) if message_id else None
    to = _text(form.get("To"))
    optout = None
    if code == TWILIO_OPTED_OUT_CODE and to:
        optout = opt_out("sms", to, True, "twilio_21610", sid)
    return record, optout


STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
STOP_REPLY = "You have been unsubscribed and will receive no more messages. Reply START to resubscribe."
START_REPLY = "You have been resubscribed and will receive messages again. Reply STOP to unsubscribe."
HELP_REPLY = "Outreach messages. Reply STOP to unsubscribe, START to resubscribe. Msg & data rates may apply."


def inbound_action(body: str | None) -> tuple[bool | None, str | None, str | None]:
    """(opted_out or None, source, TwiML reply text or None) for an inbound SMS body."""
    word = (body or "").strip().upper()
    if word in STOP_WORDS:
        return True, "sms_stop", STOP_REPLY
    if word in START_WORDS:
        return False, "sms_start", START_REPLY
    if word in HELP_WORDS:
        return None, None, HELP_REPLY
    return None, None, None


def twiml(message: str | None) -> str:
    if message is None:
        return '<?xml version="1.0" encoding="UTF-8"?><Response/>'
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>{xml_escape(message)}</Message></Response>'


def _sendgrid_code(event: Mapping[str, Any]) -> str | None:
    return _text(event.get("status")) or _text(event.get("reason"))


def sendgrid_records(event: Mapping[str, Any]) -> tuple[str, dict, dict | None] | None:
    """(campaign_id, result, opt-out or None) for one SendGrid event; None when it is not ours or not mapped."""
    campaign_id, message_id = event.get("campaign_id"), event.get("message_id")
    if not (is_wire_uuid(campaign_id) and is_wire_uuid(message_id)):
        return None
    kind = str(event.get("event") or "").lower()
    optout_source = None
    code = None
    if kind == "deferred":
        outcome = "deferred"
        response = _text(event.get("response"))
        code = response[:3] if response and response[:3].isdigit() else None
    elif kind == "delivered":
        outcome = "delivered"
    elif kind == "bounce":
        outcome = "blocked" if str(event.get("type") or "").lower() == "blocked" else "bounced"
        code = _sendgrid_code(event)
    elif kind == "dropped":
        outcome = "dropped"
        code = _text(event.get("reason"))
    elif kind == "spamreport":
        outcome, optout_source = "spamreport", "email_spamreport"
    elif kind in ("unsubscribe", "group_unsubscribe"):
        outcome, optout_source = "unsubscribe", "email_unsubscribe"
    else:  # processed, open, click, group_resubscribe, ...
        return None
    occurred_at = _from_unix(event.get("timestamp")) or utc_now()
    sg_message_id = _text(event.get("sg_message_id"))
    record = result(message_id, outcome, provider_code=code, provider_message_id=sg_message_id,
                    occurred_at=occurred_at)
    optout = None
    email = _text(event.get("email"))
    if optout_source and email:
        optout = opt_out("email", normalize_email(email), True, optout_source,
                         _text(event.get("sg_event_id")), occurred_at)
    return campaign_id, record, optout


# ------------------------------------------------------------------ publishing

@dataclass
class _Pending:
    campaign_id: str
    results: list[dict]
    future: asyncio.Future = field(repr=False)


class Outbox:
    """One producer; results batched per campaign, opt-outs sent at once. Each call returns once the
    broker acknowledged the records carrying its items (raises if publishing failed)."""

    def __init__(self, producer: AIOKafkaProducer, *, interval_s: float = FLUSH_INTERVAL_S,
                 max_results: int = MAX_RESULTS_PER_RECORD):
        self._producer = producer
        self._interval_s = interval_s
        self._max_results = max_results
        self._pending: list[_Pending] = []
        self._pending_results = 0
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task] = set()
        self.records_published = 0

    async def results(self, campaign_id: str, results: list[dict]) -> None:
        if not results:
            return
        loop = asyncio.get_running_loop()
        pending = _Pending(campaign_id, results, loop.create_future())
        self._pending.append(pending)
        self._pending_results += len(results)
        if self._pending_results >= self._max_results:
            self._flush_now()
        elif self._timer is None:
            self._timer = loop.call_later(self._interval_s, self._flush_now)
        await asyncio.shield(pending.future)

    async def opt_outs(self, records: list[dict]) -> None:
        await self._deliver([(topics.OPT_OUTS, r["destination"], r) for r in records])

    async def _deliver(self, records: list[tuple[str, str, dict]]) -> None:
        """Send (topic, key, value) records; return once the broker acknowledged all of them."""
        deliveries = []
        try:
            for topic, key, value in records:
                deliveries.append(await self._producer.send(topic, jsoncodec.dumps(value), key=key.encode()))
        except BaseException:
            await asyncio.gather(*deliveries, return_exceptions=True)  # nothing left unobserved
            raise
        await asyncio.gather(*deliveries)
        self.records_published += len(deliveries)

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._pending_results = self._pending, [], 0
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            per_campaign: dict[str, list[dict]] = defaultdict(list)
            for p in batch:
                per_campaign[p.campaign_id].extend(p.results)
            await self._deliver([
                (topics.SENDER_RESULTS, campaign_id,
                 {"type": "SenderResults", "result_id": str(uuid.uuid4()), "campaign_id": campaign_id,
                  "results": results[i:i + self._max_results]})
                for campaign_id, results in per_campaign.items()
                for i in range(0, len(results), self._max_results)])
        except BaseException as exc:
            log.warning("publishing %d callback results failed: %r", sum(len(p.results) for p in batch), exc)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc if isinstance(exc, Exception) else ConnectionError(repr(exc)))
                    p.future.exception()  # retrieved: a gone request must not log "never retrieved"
            if not isinstance(exc, Exception):
                raise
        else:
            for p in batch:
                if not p.future.done():
                    p.future.set_result(None)

    async def close(self) -> None:
        """Publish what is pending and wait for every flush in flight."""
        self._flush_now()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)


class SeenEvents:
    """The provider event ids published recently (bounded, least recently seen dropped first)."""

    def __init__(self, max_size: int = SEEN_EVENTS_MAX):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._max_size = max_size

    def __contains__(self, event_id: str) -> bool:
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        return False

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self._max_size:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


# ------------------------------------------------------------------ collaborators resolved lazily

def _default_unsubscribe_verifier() -> UnsubscribeVerifier | None:
    try:
        from services.sender.unsubscribe import verify_unsubscribe
    except ImportError:
        return None
    return verify_unsubscribe


def _simulator_sendgrid_key() -> Any:
    """The simulator's public test key (its app re-exports it from its signing module), if installed."""
    import importlib

    for module in ("services.simulator.app", "services.simulator.signing"):
        try:
            return getattr(importlib.import_module(module), "SIMULATOR_SENDGRID_PUBLIC_KEY")
        except (ImportError, AttributeError):
            continue
    return None


# ------------------------------------------------------------------ HTTP

class Receiver:
    """The handlers' state: settings, outbox, SendGrid key, seen sg_event_ids."""

    def __init__(self, settings: Settings, outbox: Outbox, *, verify_unsubscribe: UnsubscribeVerifier | None = None,
                 sendgrid_public_key: Any = None, seen_events_max: int = SEEN_EVENTS_MAX):
        self.settings = settings
        self.environment = settings  # what channel settings set over the API apply over
        self.configs: dict[str, ChannelConfig] = {}
        self.outbox = outbox
        self._verify_unsubscribe = verify_unsubscribe
        self._given_sendgrid_key = sendgrid_public_key
        self._sendgrid_key_source = sendgrid_public_key or settings.sendgrid_webhook_public_key
        self._sendgrid_key = None
        self.seen_events = SeenEvents(seen_events_max)
        self._auth_token = settings.twilio_auth_token.get_secret_value()

    def apply_channel_settings(self, config: ChannelConfig) -> None:
        """A channel's settings changed (published by the API): verify with its current secrets from now on."""
        self.configs[config.channel] = config
        self.settings = channel_settings.apply(self.environment, self.configs)
        self._auth_token = self.settings.twilio_auth_token.get_secret_value()
        self._sendgrid_key_source = self._given_sendgrid_key or self.settings.sendgrid_webhook_public_key
        self._sendgrid_key = None  # loaded again from the new source on the next event batch
        log.info("%s callbacks verified with settings %s (%s)", config.channel, config.settings_id, config.provider)

    # -- helpers

    def sendgrid_key(self):
        if self._sendgrid_key is None:
            source = self._sendgrid_key_source or _simulator_sendgrid_key()
            if source is None:
                log.error("no SendGrid Event Webhook key (OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY unset, no simulator)")
                return None
            try:
                self._sendgrid_key = sigs.load_sendgrid_public_key(source)
            except (ValueError, TypeError) as exc:
                log.error("unusable SendGrid Event Webhook key: %s", exc)
                return None
        return self._sendgrid_key

    def unsubscribe_verifier(self) -> UnsubscribeVerifier | None:
        return self._verify_unsubscribe or _default_unsubscribe_verifier()

    async def twilio_form(self, request: web.Request):
        """The form if the request carries Twilio's signature for it, else None."""
        form = await request.post()
        url = self.settings.webhook_url + request.raw_path
        signature = request.headers.get(sigs.TWILIO_SIGNATURE_HEADER)
        if not sigs.verify_twilio_signature(self._auth_token, url, form.items(), signature):
            log.warning("rejected %s: bad Twilio signature", request.path)
            return None
        return form

    async def publish(self, results: Mapping[str, list[dict]], opt_outs: list[dict]) -> web.Response | None:
        """Hand everything to the broker; a 503 response if it failed (the provider retries)."""
        work = [self.outbox.results(cid, rs) for cid, rs in results.items() if rs]
        if opt_outs:
            work.append(self.outbox.opt_outs(opt_outs))
        if not work:
            return None
        try:
            await asyncio.gather(*work)
        except Exception as exc:
            log.error("could not publish callback records: %r", exc)
            return web.Response(status=503, text="temporarily unavailable")
        return None

    # -- handlers

    async def twilio_status(self, request: web.Request) -> web.Response:
        form = await self.twilio_form(request)
        if form is None:
            return web.Response(status=403, text="invalid signature")
        campaign_id, message_id = request.query.get("campaign_id"), request.query.get("message_id")
        ours = is_wire_uuid(campaign_id) and is_wire_uuid(message_id)
        record, optout = twilio_status_records(form, message_id if ours else None)
        if not ours:
            log.warning("Twilio status callback without our ids (%r): result ignored", request.query_string)
        failed = await self.publish({campaign_id: [record]} if record else {}, [optout] if optout else [])
        return failed or web.Response(status=200)

    async def twilio_inbound(self, request: web.Request) -> web.Response:
        form = await self.twilio_form(request)
        if form is None:
            return web.Response(status=403, text="invalid signature")
        opted_out, source, reply = inbound_action(form.get("Body"))
        sender = _text(form.get("From"))
        if opted_out is not None and sender:
            sid = _text(form.get("MessageSid")) or _text(form.get("SmsSid"))
            failed = await self.publish({}, [opt_out("sms", sender, opted_out, source, sid)])
            if failed:
                return failed
        return web.Response(text=twiml(reply), content_type="text/xml")

    async def sendgrid_events(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = self.sendgrid_key()
        if key is None or not sigs.verify_sendgrid_signature(
                key, body, request.headers.get(sigs.SENDGRID_SIGNATURE_HEADER),
                request.headers.get(sigs.SENDGRID_TIMESTAMP_HEADER)):
            log.warning("rejected SendGrid events: bad signature")
            return web.Response(status=403, text="invalid signature")
        try:
            events = jsoncodec.loads(body)
        except jsoncodec.JSONDecodeError:
            return web.Response(status=400, text="not JSON")
        if not isinstance(events, list):
            return web.Response(status=400, text="expected a JSON array of events")
        results: dict[str, list[dict]] = defaultdict(list)
        opt_outs: list[dict] = []
        batch_ids: set[str] = set()
        for event in events:
            if not isinstance(event, dict):
                continue
            sg_event_id = _text(event.get("sg_event_id"))
            if sg_event_id is not None:
                if sg_event_id in batch_ids or sg_event_id in self.seen_events:
                    continue
                batch_ids.add(sg_event_id)
            mapped = sendgrid_records(event)
            if mapped is None:
                continue
            campaign_id, record, optout = mapped
            results[campaign_id].append(record)
            if optout:
                opt_outs.append(optout)
        failed = await self.publish(results, opt_outs)
        if failed:
            return failed
        for sg_event_id in batch_ids:  # only once published: a failed batch is retried in full
            self.seen_events.add(sg_event_id)
        return web.Response(status=200)

    async def _verified_unsubscribe(self, request: web.Request):
        verify = self.unsubscribe_verifier()
        if verify is None:
            log.error("services.sender.unsubscribe is not available")
            return None, _page("Unavailable", "Unsubscribing is temporarily unavailable. Please try again later.", 503)
        params = {k: request.query.get(k) for k in request.query}
        try:
            verified = verify(self.settings, params)
        except Exception:
            log.exception("unsubscribe verification failed")
            verified = None
        if not verified:
            return None, _page("Invalid link", "This unsubscribe link is not valid.", 403)
        return verified, None

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        verified, refusal = await self._verified_unsubscribe(request)
        if refusal:
            return refusal
        _, _, destination = verified
        action = html.escape(request.raw_path, quote=True)
        form = (f'<p>Unsubscribe <strong>{html.escape(destination)}</strong> from these emails?</p>'
                f'<form method="post" action="{action}">'
                '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
                '<button type="submit">Unsubscribe</button></form>')
        return _page("Unsubscribe", form, 200, raw=True)

    async def unsubscribe(self, request: web.Request) -> web.Response:
        verified, refusal = await self._verified_unsubscribe(request)
        if refusal:
            return refusal
        campaign_id, message_id, destination = verified
        results = {}
        if is_wire_uuid(campaign_id) and is_wire_uuid(message_id):
            results[campaign_id] = [result(message_id, "unsubscribe")]
        optout = opt_out("email", normalize_email(destination), True, "email_unsubscribe", message_id)
        failed = await self.publish(results, [optout])
        return failed or _page("Unsubscribed", "You are unsubscribed.", 200)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def _page(title: str, body: str, status: int, raw: bool = False) -> web.Response:
    content = body if raw else f"<p>{html.escape(body)}</p>"
    text = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
            f"<body><h1>{html.escape(title)}</h1>{content}</body></html>")
    return web.Response(status=status, text=text, content_type="text/html")


RECEIVER = web.AppKey("receiver", Receiver)


def create_app(settings: Settings, outbox: Outbox, **receiver_options: Any) -> web.Application:
    receiver = Receiver(settings, outbox, **receiver_options)
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[RECEIVER] = receiver
    app.router.add_post("/twilio/status", receiver.twilio_status)
    app.router.add_post("/twilio/inbound", receiver.twilio_inbound)
    app.router.add_post("/sendgrid/events", receiver.sendgrid_events)
    app.router.add_get("/unsubscribe", receiver.unsubscribe_page)
    app.router.add_post("/unsubscribe", receiver.unsubscribe)
    app.router.add_get("/healthz", receiver.healthz)
    return app


@asynccontextmanager
async def running(settings: Settings, **receiver_options: Any) -> AsyncIterator[web.Application]:
    """The receiver listening on webhook_host:webhook_port with its producer, until the block ends."""
    await kafka.ensure_topics(settings)
    # Channel settings set over the API: read to the end before serving, then followed.
    feed = ChannelSettingsFeed(settings)
    try:
        await feed.load()
    except BaseException:
        await feed.close()
        raise
    producer = kafka.make_producer(settings)
    await producer.start()
    outbox = Outbox(producer)
    runner = None
    following_stop = asyncio.Event()
    following = None
    try:
        app = create_app(settings, outbox, **receiver_options)
        receiver = app[RECEIVER]
        for config in feed.current.values():
            receiver.apply_channel_settings(config)
        following = asyncio.create_task(feed.follow(following_stop, receiver.apply_channel_settings))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        await web.TCPSite(runner, settings.webhook_host, settings.webhook_port).start()
        log.info("webhook receiver on %s:%s (public %s)", settings.webhook_host, settings.webhook_port,
                 settings.webhook_url)
        yield app
    finally:
        following_stop.set()
        if following is not None:
            await asyncio.gather(following, return_exceptions=True)
        await feed.close()
        if runner is not None:
            await runner.cleanup()  # stop accepting, let requests in hand finish (their records flush)
        await outbox.close()
        await producer.stop()


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    async with running(settings):
        await stop.wait()


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
