"""The webhook receiver's HTTP routes: provider callbacks in, typed internal records out.

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
  result. Both verified by `services.common.unsubscribe.verify_unsubscribe`.
- `GET /healthz`.

A request is answered 200 only after the broker acknowledged every record it caused (publishing.py); if
publishing fails it is answered 503 and the provider retries. A bad signature is 403 and publishes nothing
(signatures.py). The mapping from callbacks to records is callbacks.py.
"""
from __future__ import annotations

import asyncio
import html
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from schemas.internal import OptOutChanged, SenderResult
from services.common import jsoncodec
from services.common.ids import is_wire_uuid
from services.common.settings import Settings
from services.common.unsubscribe import verify_unsubscribe as verify_unsubscribe_link
from services.webhook_receiver.callbacks import (inbound_action, normalize_email, opt_out, result,
                                                 sendgrid_records, submission_number, text,
                                                 twilio_status_records, twiml)
from services.webhook_receiver.seen import SeenEventStore
from services.webhook_receiver.publishing import Outbox
from services.webhook_receiver.signatures import CallbackSecrets

log = logging.getLogger("outreach.webhooks")

SEEN_EVENTS_MAX = 65_536  # sg_event_ids remembered (SendGrid retries a failed batch within hours)
CLIENT_MAX_SIZE = 16 * 1024 * 1024  # SendGrid batches can be large

UnsubscribeVerifier = Callable[[Settings, Mapping[str, str]], "tuple[str, str, str] | None"]


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


# ------------------------------------------------------------------ HTTP

class Receiver:
    """The handlers' state: the secrets in force, the outbox, the seen sg_event_ids."""

    def __init__(self, settings: Settings, outbox: Outbox | None, *,
                 verify_unsubscribe: UnsubscribeVerifier = verify_unsubscribe_link,
                 sendgrid_public_key: Any = None, seen_events_max: int = SEEN_EVENTS_MAX,
                 seen_store: SeenEventStore | None = None):
        self.secrets = CallbackSecrets(settings, sendgrid_public_key=sendgrid_public_key)
        self.outbox = outbox
        self._verify_unsubscribe = verify_unsubscribe
        self.seen_events = SeenEvents(seen_events_max)  # this instance's recent ones, in front of the store
        self.seen_store = seen_store  # every instance's (None: this instance's memory only)

    @property
    def settings(self) -> Settings:
        return self.secrets.settings

    async def publish(self, results: Mapping[str, list[SenderResult]],
                      opt_outs: list[OptOutChanged]) -> web.Response | None:
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
        form = await self.secrets.twilio_form(request)
        if form is None:
            return web.Response(status=403, text="invalid signature")
        campaign_id, message_id = request.query.get("campaign_id"), request.query.get("message_id")
        ours = is_wire_uuid(campaign_id) and is_wire_uuid(message_id)
        record, optout = twilio_status_records(form, message_id if ours else None,
                                               submission_number(request.query.get("submission")))
        if not ours:
            log.warning("Twilio status callback without our ids (%r): result ignored", request.query_string)
        failed = await self.publish({campaign_id: [record]} if record else {}, [optout] if optout else [])
        return failed or web.Response(status=200)

    async def twilio_inbound(self, request: web.Request) -> web.Response:
        form = await self.secrets.twilio_form(request)
        if form is None:
            return web.Response(status=403, text="invalid signature")
        opted_out, source, reply = inbound_action(form.get("Body"))
        sender = text(form.get("From"))
        if opted_out is not None and sender:
            sid = text(form.get("MessageSid")) or text(form.get("SmsSid"))
            failed = await self.publish({}, [opt_out("sms", sender, opted_out, source, sid)])
            if failed:
                return failed
        return web.Response(text=twiml(reply), content_type="text/xml")

    async def sendgrid_events(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self.secrets.sendgrid_signed(request, body):
            return web.Response(status=403, text="invalid signature")
        try:
            events = jsoncodec.loads(body)
        except jsoncodec.JSONDecodeError:
            return web.Response(status=400, text="not JSON")
        if not isinstance(events, list):
            return web.Response(status=400, text="expected a JSON array of events")
        results: dict[str, list[SenderResult]] = defaultdict(list)
        opt_outs: list[OptOutChanged] = []
        batch_ids: set[str] = set()
        published_elsewhere: set[str] = set()
        if self.seen_store is not None:  # one query per batch: published by any instance (a retry)
            candidates = {i for e in events if isinstance(e, dict) and (i := text(e.get("sg_event_id")))
                          and i not in self.seen_events}
            published_elsewhere = await asyncio.to_thread(self.seen_store.seen, candidates) if candidates else set()
        for event in events:
            if not isinstance(event, dict):
                continue
            sg_event_id = text(event.get("sg_event_id"))
            if sg_event_id is not None:
                if sg_event_id in batch_ids or sg_event_id in self.seen_events or sg_event_id in published_elsewhere:
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
        if self.seen_store is not None and batch_ids:
            try:
                await asyncio.to_thread(self.seen_store.record, batch_ids)
            except Exception:  # published already: a retry elsewhere may publish them again (at least once)
                log.warning("could not record %d published event ids", len(batch_ids), exc_info=True)
        return web.Response(status=200)

    async def _verified_unsubscribe(self, request: web.Request):
        params = {k: request.query.get(k) for k in request.query}
        try:
            verified = self._verify_unsubscribe(self.settings, params)
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


def create_app(settings: Settings, outbox: Outbox | None, **receiver_options: Any) -> web.Application:
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
