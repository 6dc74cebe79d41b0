"""The provider simulator as an HTTP server speaking Twilio's and SendGrid's APIs (`python -m services.simulator`).

Outcomes come from the pure kernel `services/common/simulation.py` (the contract's table); this module is
only the wire: authentication, request parsing, answers, and the signed callbacks providers send later.

Endpoints
- Twilio: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` (form: To, Body, From or MessagingServiceSid,
  StatusCallback), HTTP Basic auth (account sid : auth token). 201 Twilio-like message JSON; 400
  `{code, message, more_info, status}` when refused (or a malformed request: 21604 no To, 21602 no Body,
  21603 no sender, 21211 a To that is not E.164); 503 for a pre-send error; `+1NXX5550106` held open and never
  answered. 401 `{"code": 20003, "message": "Authenticate", "status": 401}` for wrong credentials.
  `GET /2010-04-01/Accounts/{AccountSid}.json`: the account (the circuit breaker's probe).
  Attempts are counted per OUR message id, read from the StatusCallback URL's query (`message_id`,
  `campaign_id`); without one, per destination (log key `sms:<To>`).
  Status callbacks (`sms_receipts`): form POSTs to the StatusCallback URL with MessageSid, SmsSid,
  MessageStatus, SmsStatus, To, From, AccountSid, MessagingServiceSid, ApiVersion and ErrorCode (when
  failing), signed with `X-Twilio-Signature` (signing.py).
- SendGrid v3: `POST /v3/mail/send` with `Authorization: Bearer <api key>` (else 401 with SendGrid's errors
  body), JSON with 1 to 1,000 personalizations. 202 with an empty body and `X-Message-Id`, 503, or no
  answer, for the whole call (`email_call_submission`); 400 with SendGrid's errors body when malformed.
  Attempts are counted per call by the message ids it carries (each personalization's
  `custom_args.message_id`, else each recipient address, log key `email:<address>`): the call's attempt is
  the highest.
  `GET /v3/user/account`: the account (the probe).
  Event Webhook (`email_events`): JSON arrays POSTed to `{settings.webhook_url}/sendgrid/events`, events
  due within `batch_window_s` (100 ms) in one POST, at most `max_batch` (1,000) per POST, each with
  email, timestamp, event, sg_event_id (unique), sg_message_id, smtp-id, the call's and the
  personalization's custom_args flattened in (message_id, campaign_id, ...), category when given;
  bounces add type "bounce", bounce_classification, status "5.1.1" and reason "550 5.1.1 ..." (the SMTP code
  first); deferrals add response and attempt; deliveries add response. Signed with
  `X-Twilio-Email-Event-Webhook-Signature` / `-Timestamp` (the simulator's test key, signing.py).
- Test hooks: `GET /_simulator/submissions` -> `{message_id: [entry, ...]}` (entry: attempt, channel,
  destination, outcome, http_status, provider_code, provider_message_id, campaign_id, at); `GET
  /_simulator/stats` -> counters; `POST /_simulator/reset` -> forgets the log, attempt counters, counters
  and every callback not yet delivered (held requests stay held).

Delivery of callbacks: one keep-alive `aiohttp.ClientSession`, `callback_concurrency` worker tasks reading
one queue. Timers are a single heap armed with one `loop.call_at` handle (no task per message): each
accepted message has one heap entry at a time (its next receipt). A callback that fails (connection error,
timeout, 429 or 5xx) is retried after each of `retry_delays` (via the heap); another 4xx is not retried.

Memory is bounded: attempt counters are an LRU of `attempt_capacity` message ids (destinations whose answer
depends on the attempt are kept apart and never evicted: they are the contract's few test addresses);
the log keeps the last `log_capacity` message ids and at most `LOG_ENTRIES_PER_MESSAGE` entries each.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import hmac
import itertools
import logging
import re
import signal
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from services.common import logs
from services.common.observability import Observability, http_metrics_middleware
from services.common.settings import Settings, get_settings
from services.common.simulation import (
    Receipt,
    email_call_submission,
    email_counts_attempts,
    email_events,
    sms_counts_attempts,
    sms_receipts,
    sms_submission,
)
from services.common.templating import sms_segments
from services.simulator.signing import (
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    SIMULATOR_SENDGRID_PUBLIC_KEY,
    TWILIO_SIGNATURE_HEADER,
    sendgrid_signature,
    twilio_signature,
)

__all__ = ["Simulator", "SIMULATOR_SENDGRID_PUBLIC_KEY", "run", "main"]

log = logging.getLogger("outreach.simulator")

API_VERSION = "2010-04-01"
SIMULATOR_FROM_NUMBER = "+15005550006"  # Twilio's "valid From" test number: the pool number a service uses
LOG_ENTRIES_PER_MESSAGE = 20
E164 = re.compile(r"\+[1-9][0-9]{1,14}", re.ASCII)
SENDGRID_UNAUTHORIZED = {"errors": [{"message": "The provided authorization grant is invalid, expired, or revoked",
                                     "field": None, "help": None}]}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _twilio_error(code: int, message: str, status: int) -> web.Response:
    return _json({"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                  "status": status}, status)


def _sendgrid_error(message: str, status: int = 400, field_name: str | None = None) -> web.Response:
    return _json({"errors": [{"message": message, "field": field_name, "help": None}]}, status)


def _rfc2822_now() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())


def _short_id() -> str:
    """A SendGrid-like id (22 url-safe characters)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")


# ------------------------------------------------------------------ scheduled work

@dataclass
class _Timeline:
    """The receipts of one accepted message still to come; one heap entry at a time."""

    channel: str  # "sms" | "email"
    base: float  # loop time of the acceptance
    receipts: list[Receipt]
    context: dict[str, Any]
    index: int = 0
    deferrals: int = 0


@dataclass
class _Delivery:
    """One callback POST (Twilio: one status; SendGrid: one batch of events)."""

    kind: str  # "twilio" | "sendgrid"
    url: str
    params: dict[str, str] | None = None  # twilio form
    events: list[dict] | None = None  # sendgrid batch
    tries: int = 0
    ids: list[str] = field(default_factory=list)


class Simulator:
    """The HTTP provider simulator: `make_app()` for aiohttp, or `start()` / `stop()` to serve it."""

    def __init__(self, settings: Settings, *, callback_concurrency: int = 128,
                 retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0), batch_window_s: float = 0.1,
                 max_batch: int = 1000, callback_timeout_s: float = 10.0, log_capacity: int = 20_000,
                 attempt_capacity: int = 200_000):
        self.settings = settings
        self._account_sid = settings.twilio_account_sid
        self._auth_token = settings.twilio_auth_token.get_secret_value()
        self._basic = "Basic " + base64.b64encode(f"{self._account_sid}:{self._auth_token}".encode()).decode()
        self._bearer = "Bearer " + settings.sendgrid_api_key.get_secret_value()
        self._events_url = f"{settings.webhook_url}/sendgrid/events"
        self.callback_concurrency = callback_concurrency
        self.retry_delays = retry_delays
        self.batch_window_s = batch_window_s
        self.max_batch = max_batch
        self.callback_timeout_s = callback_timeout_s
        self.log_capacity = log_capacity
        self.attempt_capacity = attempt_capacity
        # state
        self._attempts: OrderedDict[str, int] = OrderedDict()  # LRU
        self._counted: dict[str, int] = {}  # message ids whose answer depends on the attempt
        self._log: OrderedDict[str, list[dict]] = OrderedDict()
        self._stats: Counter[str] = Counter()
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._outbox: list[dict] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._queue: asyncio.Queue[_Delivery] | None = None
        self._workers: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._held: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self.host: str | None = None
        self.port: int | None = None

    # -------------------------------------------------------------- lifecycle

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024,
                              middlewares=[http_metrics_middleware("simulator"), self._outage_middleware])
        # /metrics, /healthz, /readyz (no checks: the simulator depends on nothing); `run` also serves them on
        # the metrics port and records it, like every service.
        app.add_routes(Observability(self.settings, "simulator").routes())
        app.router.add_post("/2010-04-01/Accounts/{account_sid}/Messages.json", self.twilio_create)
        app.router.add_get("/2010-04-01/Accounts/{account_sid}.json", self.twilio_account)
        app.router.add_post("/v3/mail/send", self.sendgrid_send)
        app.router.add_get("/v3/user/account", self.sendgrid_account)
        app.router.add_get("/_simulator/submissions", self.submissions)
        app.router.add_get("/_simulator/stats", self.stats)
        app.router.add_post("/_simulator/reset", self.reset)
        app.router.add_post("/_simulator/outage", self.outage)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Serve on host:port (default: the settings'; port 0 picks a free one). Returns the base URL."""
        host = host or self.settings.simulator_host
        port = self.settings.simulator_port if port is None else port
        # handler_cancellation: a held (no answer) request ends when its client gives up.
        self._runner = web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self._site = site
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        self.host, self.port = host, (sockets[0].getsockname()[1] if sockets else port)
        log.info("provider simulator listening on http://%s:%s", self.host, self.port)
        return self.url

    @web.middleware
    async def _outage_middleware(self, request: web.Request, handler):
        # During an outage new connections are refused (the site is stopped) and requests on connections
        # kept alive from before get 503, as from a load balancer in front of a provider that is down.
        if time.monotonic() < getattr(self, "_down_until", 0.0) and not request.path.startswith("/_simulator"):
            return web.Response(status=503, text="service unavailable (simulated outage)")
        return await handler(request)

    async def outage(self, request: web.Request) -> web.Response:
        """Test hook: the API goes down (connections refused) for `seconds`, while callbacks already due keep
        going out, as a provider's API outage looks to a sender."""
        seconds = float(request.query.get("seconds", "30"))

        self._down_until = time.monotonic() + seconds

        async def go_down() -> None:
            await asyncio.sleep(0.05)  # let this answer leave first
            await self._site.stop()
            log.warning("simulated outage: API down for %.1f s", seconds)
            await asyncio.sleep(seconds)
            self._site = web.TCPSite(self._runner, self.host, self.port, backlog=1024, reuse_address=True)
            await self._site.start()
            log.warning("simulated outage over: API back")

        self._outage_task = asyncio.create_task(go_down())
        return _json({"outage_s": seconds})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        self._cancel_held()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _on_startup(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.callback_concurrency, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=self.callback_timeout_s), json_serialize=lambda v: orjson.dumps(v).decode())
        self._queue = asyncio.Queue()
        self._workers = [asyncio.create_task(self._worker(), name=f"simulator-callbacks-{i}")
                         for i in range(self.callback_concurrency)]

    async def _on_shutdown(self, app: web.Application) -> None:
        self._cancel_held()

    async def _on_cleanup(self, app: web.Application) -> None:
        self._clear_scheduled()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _cancel_held(self) -> None:
        for task in list(self._held):
            task.cancel()

    async def _hold(self) -> web.StreamResponse:
        """Never answer: wait until the client gives up (handler cancelled) or the simulator stops."""
        task = asyncio.current_task()
        assert task is not None
        self._held.add(task)
        self._stats["held_total"] += 1
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self._held.discard(task)
        raise AssertionError("unreachable")

    # -------------------------------------------------------------- attempts and log

    def _next_attempt(self, key: str, counted: bool) -> int:
        if counted:
            n = self._counted.get(key, 0) + 1
            self._counted[key] = n
            return n
        n = self._attempts.pop(key, 0) + 1
        self._attempts[key] = n
        if len(self._attempts) > self.attempt_capacity:
            self._attempts.popitem(last=False)
        return n

    def _record(self, key: str, entry: dict) -> None:
        entries = self._log.pop(key, None) or []
        entries.append(entry)
        if len(entries) > LOG_ENTRIES_PER_MESSAGE:
            del entries[0]
        self._log[key] = entries
        if len(self._log) > self.log_capacity:
            self._log.popitem(last=False)

    # -------------------------------------------------------------- Twilio

    def _twilio_authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        return (hmac.compare_digest(header.encode(), self._basic.encode())
                and request.match_info["account_sid"] == self._account_sid)

    def _twilio_unauthorized(self) -> web.Response:
        self._stats["unauthorized"] += 1
        response = _json({"code": 20003, "message": "Authenticate",
                          "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}, 401)
        response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        return response

    async def twilio_account(self, request: web.Request) -> web.Response:
        if not self._twilio_authorized(request):
            return self._twilio_unauthorized()
        self._stats["account_lookups"] += 1
        now = _rfc2822_now()
        return _json({"sid": self._account_sid, "owner_account_sid": self._account_sid,
                      "friendly_name": "Outreach simulator", "status": "active", "type": "Full",
                      "date_created": now, "date_updated": now, "auth_token": "[redacted]",
                      "uri": f"/{API_VERSION}/Accounts/{self._account_sid}.json"})

    async def twilio_create(self, request: web.Request) -> web.StreamResponse:
        if not self._twilio_authorized(request):
            return self._twilio_unauthorized()
        form = await request.post()
        to = str(form.get("To") or "")
        body = str(form.get("Body") or "")
        sender = str(form.get("From") or "")
        service = str(form.get("MessagingServiceSid") or "")
        callback = str(form.get("StatusCallback") or "")
        if not to:
            return _twilio_error(21604, "A 'To' phone number is required.", 400)
        if not body and "MediaUrl" not in form:
            return _twilio_error(21602, "Message body is required.", 400)
        if not sender and not service:
            return _twilio_error(21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message.", 400)
        if not E164.fullmatch(to):
            return _twilio_error(21211, f"The 'To' number {to} is not a valid phone number.", 400)
        message_id = campaign_id = None
        if callback:
            with contextlib.suppress(ValueError):
                query = URL(callback).query
                message_id, campaign_id = query.get("message_id"), query.get("campaign_id")
        key = message_id or f"sms:{to}"
        attempt = self._next_attempt(key, sms_counts_attempts(to))
        sub = sms_submission(to, attempt)
        self._stats[f"sms_{sub.kind}"] += 1
        sid = f"SM{uuid.uuid4().hex}" if sub.kind == "accepted" else None
        self._record(key, {"attempt": attempt, "channel": "sms", "destination": to, "outcome": sub.kind,
                           "http_status": sub.http_status, "provider_code": sub.provider_code,
                           "provider_message_id": sid, "campaign_id": campaign_id, "body": body[:200],
                           "at": time.time()})
        if sub.kind == "no_answer":
            return await self._hold()
        if sub.kind == "presend_error":
            return _twilio_error(20503, "Service unavailable (simulator)", 503)
        if sub.kind == "refused":
            return _twilio_error(int(sub.provider_code or 0), sub.message or "Refused", sub.http_status)
        assert sid is not None
        from_number = sender or SIMULATOR_FROM_NUMBER
        if callback:
            receipts = sms_receipts(to, self.settings.late_receipt_s)
            if receipts:
                self._start_timeline(_Timeline("sms", asyncio.get_running_loop().time(), receipts, {
                    "url": callback, "sid": sid, "to": to, "from": from_number, "service": service,
                    "ids": [key]}))
        now = _rfc2822_now()
        uri = f"/{API_VERSION}/Accounts/{self._account_sid}/Messages/{sid}.json"
        return _json({
            "sid": sid, "account_sid": self._account_sid, "to": to, "from": sender or None,
            "messaging_service_sid": service or None, "body": body,
            "status": "accepted" if service else "queued", "num_segments": str(sms_segments(body)),
            "num_media": "0", "direction": "outbound-api", "api_version": API_VERSION, "price": None,
            "price_unit": "USD", "error_code": None, "error_message": None, "date_created": now,
            "date_updated": now, "date_sent": None, "uri": uri,
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
        }, 201)

    def _twilio_delivery(self, timeline: _Timeline, receipt: Receipt) -> _Delivery:
        ctx = timeline.context
        params = {"AccountSid": self._account_sid, "ApiVersion": API_VERSION, "From": ctx["from"],
                  "MessageSid": ctx["sid"], "MessageStatus": receipt.event, "SmsSid": ctx["sid"],
                  "SmsStatus": receipt.event, "To": ctx["to"]}
        if ctx["service"]:
            params["MessagingServiceSid"] = ctx["service"]
        if receipt.provider_code:
            params["ErrorCode"] = receipt.provider_code
        return _Delivery("twilio", ctx["url"], params=params, ids=ctx["ids"])

    # -------------------------------------------------------------- SendGrid

    def _sendgrid_authorized(self, request: web.Request) -> bool:
        return hmac.compare_digest(request.headers.get("Authorization", "").encode(), self._bearer.encode())

    def _sendgrid_unauthorized(self) -> web.Response:
        self._stats["unauthorized"] += 1
        return _json(SENDGRID_UNAUTHORIZED, 401)

    async def sendgrid_account(self, request: web.Request) -> web.Response:
        if not self._sendgrid_authorized(request):
            return self._sendgrid_unauthorized()
        self._stats["account_lookups"] += 1
        return _json({"type": "paid", "reputation": 100})

    async def sendgrid_send(self, request: web.Request) -> web.StreamResponse:
        if not self._sendgrid_authorized(request):
            return self._sendgrid_unauthorized()
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _sendgrid_error("Bad Request: the body is not valid JSON", 400)
        if not isinstance(data, dict):
            return _sendgrid_error("Bad Request: the body must be a JSON object", 400)
        personalizations = data.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            return _sendgrid_error("The personalizations field is required and must have at least one "
                                   "personalization.", 400, "personalizations")
        if len(personalizations) > 1000:
            return _sendgrid_error("The personalizations field cannot have more than 1000 personalizations.",
                                   400, "personalizations")
        sender = data.get("from")
        if not isinstance(sender, dict) or not sender.get("email"):
            return _sendgrid_error("The from object must be provided for every email send. It is an object that "
                                   "requires the email parameter, but may also contain a name parameter.", 400, "from")
        if not data.get("content") and not data.get("template_id"):
            return _sendgrid_error("Unless a valid template_id is provided, the content parameter is required.",
                                   400, "content")
        base_args = data.get("custom_args") if isinstance(data.get("custom_args"), dict) else {}
        categories = data.get("categories")
        recipients: list[tuple[str, str, dict]] = []  # (address, log key, custom args)
        for n, p in enumerate(personalizations):
            to = p.get("to") if isinstance(p, dict) else None
            if not isinstance(to, list) or not to or not all(isinstance(t, dict) and t.get("email") for t in to):
                return _sendgrid_error("The to array is required for all personalization objects, and must have "
                                       "at least one email object with a valid email address.", 400,
                                       f"personalizations.{n}.to")
            args = {**base_args, **(p.get("custom_args") or {})}
            args = {str(k): str(v) for k, v in args.items()}
            for t in to:
                address = str(t["email"])
                recipients.append((address, args.get("message_id") or f"email:{address.lower()}", args))
        keys = list(dict.fromkeys(key for _, key, _ in recipients))
        counted = {key for address, key, _ in recipients if email_counts_attempts(address)}
        attempt = max(self._next_attempt(key, key in counted) for key in keys)
        sub = email_call_submission([address for address, _, _ in recipients], attempt)
        self._stats[f"email_call_{sub.kind}"] += 1
        self._stats[f"email_{sub.kind}"] += len(recipients)
        call_id = _short_id()
        accepted = sub.kind == "accepted"
        now = time.time()
        for address, key, args in recipients:
            self._record(key, {"attempt": attempt, "channel": "email", "destination": address, "outcome": sub.kind,
                               "http_status": sub.http_status, "provider_code": sub.provider_code,
                               "provider_message_id": call_id if accepted else None,
                               "campaign_id": args.get("campaign_id"), "call_id": call_id,
                               "call_size": len(recipients), "at": now})
        if sub.kind == "no_answer":
            return await self._hold()
        if sub.kind == "presend_error":
            return _sendgrid_error("Service Unavailable (simulator)", 503)
        loop_now = asyncio.get_running_loop().time()
        interval, window = self.settings.sim_defer_interval_s, self.settings.retry_window_s
        extra = {"category": categories} if categories else {}
        for n, (address, key, args) in enumerate(recipients):
            self._start_timeline(_Timeline("email", loop_now, email_events(address, interval, window), {
                "email": address, "sg_message_id": f"{call_id}.sim.{n}", "smtp_id": f"<{call_id}.{n}@simulator>",
                "args": {**args, **extra}, "ids": [key]}))
        return web.Response(status=202, headers={"X-Message-Id": call_id})

    def _sendgrid_event(self, timeline: _Timeline, receipt: Receipt) -> dict:
        ctx = timeline.context
        event = dict(ctx["args"])  # custom args flattened into the event, as SendGrid does
        event.update({"email": ctx["email"], "timestamp": int(time.time()), "event": receipt.event,
                      "sg_event_id": _short_id(), "sg_message_id": ctx["sg_message_id"], "smtp-id": ctx["smtp_id"]})
        if receipt.event == "bounce":
            code = receipt.provider_code or "550"
            event.update({"type": "bounce", "bounce_classification": "Invalid Address", "status": "5.1.1",
                          "reason": receipt.reason or f"{code} 5.1.1 Recipient address rejected"})
        elif receipt.event == "deferred":
            timeline.deferrals += 1
            event.update({"response": receipt.reason or "451 Try again later", "attempt": str(timeline.deferrals)})
        elif receipt.event == "delivered":
            event.update({"response": "250 2.0.0 OK (simulator)", "ip": "127.0.0.1", "tls": 0})
        return event

    # -------------------------------------------------------------- scheduler (one heap, one timer handle)

    def _start_timeline(self, timeline: _Timeline) -> None:
        self._push(timeline.base + timeline.receipts[0].after_s, timeline)

    def _push(self, when: float, job: Any) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), job))
        if self._timer is None or when < self._timer_when:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._run_due)
        self._timer_when = when

    def _run_due(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._heap and self._heap[0][0] <= now + 0.001:
            _, _, job = heapq.heappop(self._heap)
            if isinstance(job, _Delivery):  # a retry
                self._enqueue(job)
                continue
            receipt = job.receipts[job.index]
            job.index += 1
            if job.channel == "sms":
                self._enqueue(self._twilio_delivery(job, receipt))
            else:
                self._outbox.append(self._sendgrid_event(job, receipt))
                if len(self._outbox) >= self.max_batch:
                    self._flush()
                elif self._flush_handle is None:
                    self._flush_handle = loop.call_later(self.batch_window_s, self._flush)
            if job.index < len(job.receipts):
                heapq.heappush(self._heap, (job.base + job.receipts[job.index].after_s, next(self._seq), job))
        if self._heap:
            self._arm(self._heap[0][0])

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._outbox:
            batch, self._outbox = self._outbox[:self.max_batch], self._outbox[self.max_batch:]
            self._enqueue(_Delivery("sendgrid", self._events_url, events=batch))

    def _enqueue(self, delivery: _Delivery) -> None:
        if self._queue is not None:
            self._queue.put_nowait(delivery)

    def _clear_scheduled(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._heap.clear()
        self._outbox.clear()
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait()

    # -------------------------------------------------------------- callback delivery

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            delivery = await self._queue.get()
            try:
                outcome = await self._post(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, timeout, ...: the provider retries
                log.debug("callback to %s failed: %r", delivery.url, exc)
                outcome = "retry"
            if outcome == "retry":
                if delivery.tries < len(self.retry_delays):
                    self._stats["callbacks_retried"] += 1
                    delay = self.retry_delays[delivery.tries]
                    self._push(asyncio.get_running_loop().time() + delay, replace(delivery, tries=delivery.tries + 1))
                else:
                    self._stats["callbacks_failed"] += 1
                    log.warning("gave up on a %s callback to %s after %d tries",
                                delivery.kind, delivery.url, delivery.tries + 1)
            elif outcome == "rejected":
                self._stats["callbacks_rejected"] += 1

    async def _post(self, delivery: _Delivery) -> str:
        assert self._session is not None
        if delivery.kind == "twilio":
            assert delivery.params is not None
            body = urlencode(delivery.params).encode()
            headers = {TWILIO_SIGNATURE_HEADER: twilio_signature(self._auth_token, delivery.url, delivery.params),
                       "Content-Type": "application/x-www-form-urlencoded", "User-Agent": "TwilioProxy/1.1"}
        else:
            assert delivery.events is not None
            body = orjson.dumps(delivery.events)
            timestamp = str(int(time.time()))
            headers = {SENDGRID_SIGNATURE_HEADER: sendgrid_signature(body, timestamp),
                       SENDGRID_TIMESTAMP_HEADER: timestamp, "Content-Type": "application/json",
                       "User-Agent": "SendGrid Event API"}
        async with self._session.post(delivery.url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
        if 200 <= status < 300:
            if delivery.kind == "twilio":
                self._stats["callbacks_sent"] += 1
            else:
                self._stats["event_posts"] += 1
                self._stats["events_sent"] += len(delivery.events or ())
            return "ok"
        if status == 429 or status >= 500:
            return "retry"
        log.warning("%s callback to %s answered %s: not retried", delivery.kind, delivery.url, status)
        return "rejected"

    # -------------------------------------------------------------- test hooks

    async def submissions(self, request: web.Request) -> web.Response:
        return _json(self._log)

    async def stats(self, request: web.Request) -> web.Response:
        return _json({**self._stats, "held_now": len(self._held), "scheduled": len(self._heap),
                      "outbox": len(self._outbox), "deliveries_queued": self._queue.qsize() if self._queue else 0,
                      "messages_logged": len(self._log)})

    async def reset(self, request: web.Request) -> web.Response:
        self._attempts.clear()
        self._counted.clear()
        self._log.clear()
        self._stats.clear()
        self._clear_scheduled()
        return _json({"reset": True})


# ------------------------------------------------------------------ entry points

async def run(settings: Settings | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM / SIGINT (or `stop` is set), then shut down gracefully."""
    settings = settings or get_settings()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    simulator = Simulator(settings)
    await simulator.start()
    observability = await Observability(settings, "simulator").start()
    try:
        await stop.wait()
    finally:
        log.info("provider simulator stopping")
        await observability.stop()
        await simulator.stop()


def main() -> None:
    logs.configure("simulator")
    asyncio.run(run())
