"""Provider adapters: the edge where messages leave Outreach.

One adapter per channel (`adapters_for`, chosen by `OUTREACH_SMS_PROVIDER` / `OUTREACH_EMAIL_PROVIDER`).
An adapter submits one provider call carrying `items` (claimed work items, see `WorkItem` in
schemas/internal.py, plus the `campaign_id` they belong to) and answers one or more results per item, in
the `SenderResults` result shape (docs/design.md): `{message_id, outcome, attempt, provider_code,
provider_message_id, occurred_at}`. `attempt` of a result is `item["attempt"] + 1`: the dispatcher
passes each item with `attempt` = submissions known before this one.

An adapter may also have:
- `async probe() -> bool`: a request that sends no message (an account lookup); the circuit breaker
  (breaker.py) probes with it while the provider is held. Without one, a probe always succeeds.
- `async run_retries(stop, publish)`: background work that reports results later (SMTP re-submissions
  of deferred emails; the in-process simulator's late receipts), with `async publish([(campaign_id,
  results), ...])` (the sender's `publish_later`: through its results batcher). The sender runs it
  beside the claim loop (app.py).

Rate limiting and circuit breaking are not the adapters' business: the dispatcher passes each submission
through its provider's breaker and pays its tokens (ratelimit.py) before the call.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from schemas.times import utc_now
from services.common import simulation
from services.common.settings import Settings
from services.common.templating import render, render_email

log = logging.getLogger("outreach.sender")


class ProviderAdapter(Protocol):
    def batch_size(self, channel: str) -> int:
        """How many items one provider call may carry (1 for Twilio; SendGrid takes up to 1,000)."""
        ...

    async def submit(self, channel: str, items: list[dict], template: Mapping[str, Any]) -> list[dict]:
        """Submit one provider call for `items`; the results of each item (outcome per the contract)."""
        ...


# ------------------------------------------------------------------ result helpers

def make_result(message_id: str, outcome: str, attempt: int, *, provider_code: str | None = None,
                provider_message_id: str | None = None, occurred_at: str | None = None) -> dict:
    result = {"message_id": message_id, "outcome": outcome, "attempt": attempt, "provider_code": provider_code,
              "provider_message_id": provider_message_id, "occurred_at": occurred_at or utc_now()}
    if outcome == "presend_error":
        result["final"] = False  # the dispatcher sets it on the last one it reports
    return result


def render_message(channel: str, template: Mapping[str, Any], variables: Mapping[str, object] | None) -> dict:
    """What a provider is sent for one item: SMS `{body}`, email `{subject, html}` (placeholders filled)."""
    if channel == "sms":
        return {"body": render(template["body"], variables)}
    subject, html = render_email(template["subject"], template["html"], variables)
    return {"subject": subject, "html": html}


# ------------------------------------------------------------------ in-process simulator

# Provider receipt / event names (services.common.simulation) -> SenderResults outcomes. SendGrid's
# `processed` says nothing the acceptance did not (absent: not reported).
RECEIPT_OUTCOMES = {
    "sent": "sent", "delivered": "delivered", "undelivered": "undelivered", "failed": "failed",
    "deferred": "deferred", "bounce": "bounced", "spamreport": "spamreport",
}
IMMEDIATE_S = 1.0  # receipts due within this (the contract's "within a second") come with the submission
MAX_PENDING_RECEIPTS = 100_000  # later receipts wait on timers, at most this many at once

PublishResults = Callable[[list[tuple[str, list[dict]]]], Awaitable[None]]


class InProcessSimulator:
    """The contract's provider simulator (services.common.simulation's rules), answered in-process.

    Counts submissions per message id, as the HTTP simulator does (only for destinations whose answer
    depends on it). An email call's submission outcome (`+fail503x2`, `+fail503`, `+noanswer`) applies to
    the whole call. Receipts due within `IMMEDIATE_S` are returned with the submission; later ones (SMS
    digit 7's late receipt, the delivery of a `+defer` email) are reported when due through
    `run_retries`' publish callback, if it runs (at most `MAX_PENDING_RECEIPTS` waiting; beyond that, or
    without a callback, they are lost like an undelivered webhook and the message's timers decide).
    A repeated deferral changes nothing and is not reported.
    """

    def __init__(self, settings: Settings):
        self._batch = {"sms": 1, "email": settings.email_batch}
        self._late_receipt_s = settings.late_receipt_s
        self._defer_interval_s = settings.sim_defer_interval_s
        self._retry_window_s = settings.retry_window_s
        self._submissions: dict[str, int] = {}
        self._reporting = False  # run_retries is running: later receipts have somewhere to go
        self._timers: set[asyncio.TimerHandle] = set()
        self._due: list[tuple[str, dict]] = []  # (campaign_id, result) whose time came, to publish
        self._wake = asyncio.Event()

    def batch_size(self, channel: str) -> int:
        return self._batch[channel]

    async def probe(self) -> bool:
        return True  # the account lookup of a provider that is always up

    @property
    def pending_receipts(self) -> int:
        return len(self._timers)

    def _attempt(self, channel: str, item: Mapping[str, Any]) -> int:
        counts = simulation.sms_counts_attempts if channel == "sms" else simulation.email_counts_attempts
        if not counts(item["destination"]):
            return 1
        n = self._submissions.get(item["message_id"], 0) + 1
        self._submissions[item["message_id"]] = n
        return n

    def _receipts(self, channel: str, destination: str) -> list[simulation.Receipt]:
        if channel == "sms":
            return simulation.sms_receipts(destination, self._late_receipt_s)
        return simulation.email_events(destination, self._defer_interval_s, self._retry_window_s)

    async def submit(self, channel: str, items: list[dict], template: Mapping[str, Any]) -> list[dict]:
        now = utc_now()
        attempts = [self._attempt(channel, item) for item in items]
        for item in items:
            render_message(channel, template, item.get("variables"))  # what a real adapter would send
        if channel == "sms":
            answers = [simulation.sms_submission(item["destination"], n) for item, n in zip(items, attempts)]
        else:
            call = simulation.email_call_submission([item["destination"] for item in items], max(attempts))
            answers = [call] * len(items)
        results: list[dict] = []
        for item, answer in zip(items, answers):
            results.extend(self._results(channel, item, answer, now))
        return results

    def _results(self, channel: str, item: Mapping[str, Any], answer: simulation.Submission, now: str) -> list[dict]:
        mid, attempt = item["message_id"], item["attempt"] + 1
        if answer.kind != "accepted":
            return [make_result(mid, answer.kind, attempt, provider_code=answer.provider_code, occurred_at=now)]
        sid = uuid.uuid4().hex  # only a request the provider took gets an id (Twilio: "SM" + 32 hex)
        provider_message_id = f"SM{sid}" if channel == "sms" else sid
        results = [make_result(mid, "accepted", attempt, provider_message_id=provider_message_id, occurred_at=now)]
        last = "accepted"
        for receipt in self._receipts(channel, item["destination"]):
            outcome = RECEIPT_OUTCOMES.get(receipt.event)
            if outcome is None or (outcome == "deferred" and last == "deferred"):
                continue
            last = outcome
            result = make_result(mid, outcome, attempt, provider_code=receipt.provider_code,
                                 provider_message_id=provider_message_id, occurred_at=now)
            if receipt.after_s <= IMMEDIATE_S:
                results.append(result)
            else:
                self._later(receipt.after_s, item.get("campaign_id"), result)
        return results

    def _later(self, after_s: float, campaign_id: str | None, result: dict) -> None:
        if not self._reporting or campaign_id is None:
            return
        if len(self._timers) >= MAX_PENDING_RECEIPTS:
            log.warning("in-process simulator: %d receipts pending; one for %s dropped",
                        len(self._timers), result["message_id"])
            return
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._timers.discard(handle)
            self._due.append((campaign_id, {**result, "occurred_at": utc_now()}))
            self._wake.set()

        handle = asyncio.get_running_loop().call_later(after_s, fire)
        self._timers.add(handle)

    async def run_retries(self, stop: asyncio.Event, publish: PublishResults) -> None:
        """Publish the receipts due later, as their time comes, until `stop` is set (pending ones are
        then dropped: a restarted simulator knows nothing of them, like a provider whose webhook is lost)."""
        self._reporting = True
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waking = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait([stopping, waking], return_when=asyncio.FIRST_COMPLETED)
                waking.cancel()
                self._wake.clear()
                due, self._due = self._due, []
                if due:
                    per_campaign: dict[str, list[dict]] = defaultdict(list)
                    for campaign_id, result in due:
                        per_campaign[campaign_id].append(result)
                    await publish(list(per_campaign.items()))
        finally:
            stopping.cancel()
            self._reporting = False
            for handle in self._timers:
                handle.cancel()
            self._timers.clear()
            self._due.clear()


# ------------------------------------------------------------------ choosing the adapters

def _real_adapter(module: str, name: str, settings: Settings) -> ProviderAdapter:
    """Import a real adapter only when chosen (so the in-process default never needs it)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(f"services.sender.{module}"), name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"provider adapter services.sender.{module}.{name} is not available: {exc}") from exc
    return cls(settings)


def adapters_for(settings: Settings) -> dict[str, ProviderAdapter]:
    """The adapter of each channel, as the settings choose (`inprocess` channels share one simulator)."""
    simulator: InProcessSimulator | None = None

    def in_process() -> InProcessSimulator:
        nonlocal simulator
        if simulator is None:
            simulator = InProcessSimulator(settings)
        return simulator

    if settings.sms_provider == "twilio":
        sms = _real_adapter("twilio", "TwilioAdapter", settings)
    else:
        sms = in_process()
    if settings.email_provider == "sendgrid":
        email = _real_adapter("sendgrid", "SendGridAdapter", settings)
    elif settings.email_provider == "smtp":
        email = _real_adapter("smtp", "SmtpAdapter", settings)
    else:
        email = in_process()
    return {"sms": sms, "email": email}


def adapter_for(settings: Settings, channel: str) -> ProviderAdapter:
    """A new adapter for one channel, as the settings choose (a channel's settings changed: app.py)."""
    return adapters_for(settings.model_copy(update={"sms_provider": "inprocess"} if channel == "email"
                                            else {"email_provider": "inprocess"}))[channel]


def provider_name(settings: Settings, channel: str) -> str:
    """The provider a channel's submissions go to (SendingHold.provider)."""
    return settings.sms_provider if channel == "sms" else settings.email_provider
