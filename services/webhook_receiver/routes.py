"""The webhook receiver's HTTP routes: provider callbacks in, typed internal records out.

Endpoints (on `OUTREACH_WEBHOOK_HOST:OUTREACH_WEBHOOK_PORT`; providers call `settings.webhook_url`):
- `POST /twilio/status?message_id=..&campaign_id=..`: Twilio status callback (`X-Twilio-Signature`).
  sent / delivered -> outcome `sent` / `delivered`; undelivered / failed -> same outcome with
  `provider_code` = ErrorCode; queued / accepted / sending (and anything else) -> ignored. ErrorCode 21610
  also opts `To` out (`twilio_21610`), once per MessageSid.
- `POST /twilio/inbound`: inbound SMS (signed the same way). STOP words -> opt-out (`sms_stop`), START words
  -> opt-in (`sms_start`), once per MessageSid; HELP words -> help text; each answered with TwiML, anything
  else (and a replayed STOP / START) `<Response/>`.
- `POST /sendgrid/events`: SendGrid Event Webhook batch (ECDSA P-256 signature). processed ignored;
  deferred, delivered, bounce (`bounced` / `blocked`), dropped, spamreport, unsubscribe / group_unsubscribe
  map to outcomes; spamreport and unsubscribes also opt the address out. Events without our custom args
  (`message_id`, `campaign_id`) are ignored; an `sg_event_id` published before is skipped.
- `GET /unsubscribe?..`: confirmation page (a GET never unsubscribes: mail scanners prefetch links).
  `POST /unsubscribe?..` (RFC 8058 one-click, body `List-Unsubscribe=One-Click`): opt-out + `unsubscribe`
  result. Both verified by `services.common.unsubscribe.verify_unsubscribe`.
- `GET /healthz`.

Answers: 200 only after the broker acknowledged every record the request caused (publishing.py), and 200
to a replay, which publishes nothing; 400 a body that is not what the route takes (not UTF-8, not JSON or
nested deeper than 1,024, not an array of events, a form of too many fields); 403 a bad or missing signature
(nothing published, nothing remembered: signatures.py); 413 a body over the route's cap (bodies.py: 1 MiB
SendGrid, 64 KiB Twilio, 4 KiB unsubscribe); 415 a Twilio post that is not a UTF-8 form; 503 when the
broker or the store of published ids is unavailable (the provider retries). Order: the cap, then SendGrid's
signature (over the raw body) before parsing; Twilio's form parsed before its signature (computed over the
fields). An event of the wrong shape inside a good batch is skipped, the rest published.

Replays: the provider event ids published (SendGrid's `sg_event_id`, the MessageSid of an inbound STOP /
START or of a status that opts out) are remembered here and in the store every instance shares, beside the
event store (seen.py), so a replay is skipped by any instance, after a restart too, for `seen.KEEP_S`. A
replayed or stale status callback is published again: the handler's rules make it change nothing (a
`sent` after `delivered`, a second `delivered`). The mapping from callbacks to records is callbacks.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import html
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from multidict import MultiDict

from schemas.internal import OptOutChanged, SenderResult
from services.common import jsoncodec, logs
from services.common.ids import is_wire_uuid
from services.common.observability import WEBHOOK_VERIFICATION_FAILURES, http_metrics_middleware
from services.common.settings import Settings
from services.common.unsubscribe import verify_unsubscribe as verify_unsubscribe_link
from services.webhook_receiver.bodies import (APP_MAX_BYTES, LIMITS, body_limits, expect_within_limit, parse_form,
                                              read_body)
from services.webhook_receiver.callbacks import (destination, inbound_action, normalize_email, opt_out, result,
                                                 sendgrid_records, submission_number, text, twilio_sid,
                                                 twilio_status_records, twiml)
from services.webhook_receiver.seen import SeenEventStore
from services.webhook_receiver.publishing import Outbox
from services.webhook_receiver.signatures import CallbackSecrets

log = logging.getLogger("outreach.webhooks")

SEEN_EVENTS_MAX = 65_536  # event ids remembered here, in front of the shared store
CLIENT_MAX_SIZE = APP_MAX_BYTES  # aiohttp's own cap; each route has its own (bodies.py)
MAX_KEY_CHARS = 200

UnsubscribeVerifier = Callable[[Settings, Mapping[str, str]], "tuple[str, str, str] | None"]


class SeenEvents:
    """The provider event ids this instance published recently (bounded, least recently seen dropped first), in
    front of the shared store."""

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
    """The handlers' state: the secrets in force, the outbox, the provider event ids published."""

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
            return unavailable()
        return None

    # -- provider event ids published before (by this instance or any other, before a restart too)

    async def published_before(self, keys: set[str]) -> set[str]:
        """Those of `keys` (see `event_key`) published before; raises when the shared store cannot say."""
        found = {key for key in keys if key in self.seen_events}
        rest = keys - found
        if rest and self.seen_store is not None:  # one query for them all
            found |= await asyncio.to_thread(self.seen_store.seen, rest)
        return found

    async def remember(self, keys: set[str]) -> None:
        """`keys` are published: a replay of them anywhere is skipped."""
        for key in keys:
            self.seen_events.add(key)
        if self.seen_store is not None and keys:
            try:
                await asyncio.to_thread(self.seen_store.record, keys)
            except Exception:  # published already: a retry elsewhere may publish them again (at least once)
                log.warning("could not record %d published event ids", len(keys), exc_info=True)

    # -- handlers

    async def twilio_request(self, request: web.Request) -> MultiDict[str] | web.Response:
        """The signed form of a Twilio request, or its 403; a body the route does not take raises BodyRefused
        (413, 415, 400: answered by bodies.body_limits)."""
        form = parse_form(request, await read_body(request, LIMITS[request.path]))
        if not self.secrets.twilio_signed(request, form):
            WEBHOOK_VERIFICATION_FAILURES.labels("twilio").inc()
            return web.Response(status=403, text="invalid signature")
        return form

    async def twilio_status(self, request: web.Request) -> web.Response:
        form = await self.twilio_request(request)
        if isinstance(form, web.Response):
            return form
        campaign_id, message_id = request.query.get("campaign_id"), request.query.get("message_id")
        ours = is_wire_uuid(campaign_id) and is_wire_uuid(message_id)
        if ours:
            logs.bind(campaign_id=campaign_id, message_id=message_id)
        try:
            record, optout = twilio_status_records(form, message_id if ours else None,
                                                   submission_number(request.query.get("submission")))
        except (ValueError, TypeError) as exc:  # a value the records' models refuse: nothing to publish
            log.warning("Twilio status callback not mapped: %s", type(exc).__name__)
            return web.Response(status=200)
        if not ours:
            log.warning("Twilio status callback without our ids (%r): result ignored", request.query_string[:200])
        # One that opts out (21610) is published once: replayed after an opt-in, it would opt out again. The
        # others are not remembered (the handler's rules make a repeated or stale status change nothing).
        keys = set()
        if optout is not None and (sid := twilio_sid(form)):
            keys = {event_key("twilio-status", f"{sid}:{optout.source}")}
            try:
                if await self.published_before(keys):
                    return web.Response(status=200)
            except Exception as exc:
                log.error("could not read the published event ids: %r", exc)
                return unavailable()
        failed = await self.publish({campaign_id: [record]} if record else {}, [optout] if optout else [])
        if failed:
            return failed
        await self.remember(keys)
        return web.Response(status=200)

    async def twilio_inbound(self, request: web.Request) -> web.Response:
        form = await self.twilio_request(request)
        if isinstance(form, web.Response):
            return form
        opted_out, source, reply = inbound_action(form.get("Body"))
        sender = destination(form.get("From"))
        if opted_out is not None and sender:
            # STOP / START change the opt-out list: each message (MessageSid) acts once, whichever instance
            # it reaches, before a restart or after. A replay is answered without a reply (no second SMS).
            sid = twilio_sid(form)
            keys = {event_key("twilio-inbound", sid)} if sid else set()
            try:
                if keys and await self.published_before(keys):
                    log.info("inbound message replayed: nothing changes")
                    return web.Response(text=twiml(None), content_type="text/xml")
            except Exception as exc:
                log.error("could not read the published event ids: %r", exc)
                return unavailable()
            failed = await self.publish({}, [opt_out("sms", sender, opted_out, source, sid)])
            if failed:
                return failed
            await self.remember(keys)
        return web.Response(text=twiml(reply), content_type="text/xml")

    async def sendgrid_events(self, request: web.Request) -> web.Response:
        body = await read_body(request, LIMITS[request.path])
        if not self.secrets.sendgrid_signed(request, body):
            WEBHOOK_VERIFICATION_FAILURES.labels("sendgrid").inc()
            return web.Response(status=403, text="invalid signature")
        try:
            events = jsoncodec.loads(body)  # invalid UTF-8 and nesting deeper than 1,024 are refused too
        except jsoncodec.JSONDecodeError:
            return web.Response(status=400, text="not JSON")
        if not isinstance(events, list):
            return web.Response(status=400, text="expected a JSON array of events")
        keyed = [(event, event_key("sendgrid", sg_event_id) if (sg_event_id := text(event.get("sg_event_id")))
                  else None) for event in events if isinstance(event, dict)]
        try:  # one query per batch: published by any instance (a retry)
            published_before = await self.published_before({key for _, key in keyed if key is not None})
        except Exception as exc:
            log.error("could not read the published event ids: %r", exc)
            return unavailable()
        results: dict[str, list[SenderResult]] = defaultdict(list)
        opt_outs: list[OptOutChanged] = []
        batch_keys: set[str] = set()
        unmapped = 0
        for event, key in keyed:
            if key is not None:
                if key in batch_keys or key in published_before:
                    continue
                batch_keys.add(key)
            try:
                mapped = sendgrid_records(event)
            except (ValueError, TypeError):  # a value the records' models refuse
                unmapped += 1
                continue
            if mapped is None:
                continue
            campaign_id, record, optout = mapped
            results[campaign_id].append(record)
            if optout:
                opt_outs.append(optout)
        if unmapped:
            log.warning("%d SendGrid events not mapped (values the records refuse)", unmapped)
        failed = await self.publish(results, opt_outs)
        if failed:
            return failed
        await self.remember(batch_keys)  # only once published: a failed batch is retried in full
        return web.Response(status=200)

    async def _verified_unsubscribe(self, request: web.Request):
        params = {k: request.query.get(k) for k in request.query}
        try:
            verified = self._verify_unsubscribe(self.settings, params)
        except Exception:
            log.exception("unsubscribe verification failed")
            verified = None
        if not verified:
            WEBHOOK_VERIFICATION_FAILURES.labels("unsubscribe").inc()
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
        logs.bind(**logs.ids_of({"campaign_id": campaign_id, "message_id": message_id}))
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


def unavailable() -> web.Response:
    return web.Response(status=503, text="temporarily unavailable")


def event_key(kind: str, provider_id: str) -> str:
    """The id a provider event is remembered by: SendGrid's `sg_event_id` as it is (the ids stored before
    inbound messages were remembered too), `kind:id` for the others; a long id by its SHA-256 (a row stays
    small, and two ids never share one by being cut)."""
    key = provider_id if kind == "sendgrid" else f"{kind}:{provider_id}"
    if len(key) > MAX_KEY_CHARS:
        key = f"{kind}:sha256:{hashlib.sha256(provider_id.encode('utf-8', 'surrogatepass')).hexdigest()}"
    return key


@web.middleware
async def log_ids_scope(request: web.Request, handler: Callable) -> web.StreamResponse:
    """The ids a handler binds (logs.bind: the callback's campaign and message) end with its request."""
    with logs.context():
        return await handler(request)


def create_app(settings: Settings, outbox: Outbox | None, **receiver_options: Any) -> web.Application:
    receiver = Receiver(settings, outbox, **receiver_options)
    app = web.Application(client_max_size=CLIENT_MAX_SIZE,
                          middlewares=[http_metrics_middleware("webhooks"), body_limits, log_ids_scope])
    app[RECEIVER] = receiver
    app.router.add_post("/twilio/status", receiver.twilio_status, expect_handler=expect_within_limit)
    app.router.add_post("/twilio/inbound", receiver.twilio_inbound, expect_handler=expect_within_limit)
    app.router.add_post("/sendgrid/events", receiver.sendgrid_events, expect_handler=expect_within_limit)
    app.router.add_get("/unsubscribe", receiver.unsubscribe_page)
    app.router.add_post("/unsubscribe", receiver.unsubscribe, expect_handler=expect_within_limit)
    app.router.add_get("/healthz", receiver.healthz)
    return app
