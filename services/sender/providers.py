"""Provider adapters: the edge where messages leave Outreach.

One adapter per channel (`adapters_for`). An adapter submits one provider call carrying `items` (claimed
work items, see `WorkItem` in schemas/internal.py) and answers one or more results per item, in the
`SenderResults` result shape (docs/design.md): `{message_id, outcome, attempt, provider_code,
provider_message_id, occurred_at}`. `attempt` of a result is `item["attempt"] + 1`: the dispatcher
passes each item with `attempt` = submissions known before this one.

Only the in-process simulator exists so far. The real Twilio / SendGrid / SMTP adapters (and circuit
breaking) slot in here later: they implement `ProviderAdapter` and nothing else changes. Rate limiting is
not the adapters' business: the dispatcher pays each submission's tokens (ratelimit.py) before the call.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from schemas.commands import RFC3339_FORMAT
from services.common.settings import Settings
from services.common.templating import render, render_email


class ProviderAdapter(Protocol):
    def batch_size(self, channel: str) -> int:
        """How many items one provider call may carry (1 for Twilio; SendGrid takes up to 1,000)."""
        ...

    async def submit(self, channel: str, items: list[dict], template: Mapping[str, Any]) -> list[dict]:
        """Submit one provider call for `items`; the results of each item (outcome per the contract)."""
        ...


# ------------------------------------------------------------------ result helpers

def utc_now() -> str:
    return datetime.now(timezone.utc).strftime(RFC3339_FORMAT)


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


# ------------------------------------------------------------------ simulator outcome tables (pure)
# An outcome is a list of steps (outcome, provider_code), all reported for one submission. The first
# step decides the submission: `presend_error` / `no_answer` / `refused`, or `accepted` followed by the
# receipts the provider would call back with.

Steps = list[tuple[str, str | None]]

PRESEND_503: Steps = [("presend_error", "503")]
NO_ANSWER: Steps = [("no_answer", None)]

TWILIO_TEST_NUMBERS = {  # refused at submission (Twilio magic numbers)
    "+15005550001": "21211",
    "+15005550002": "21612",
    "+15005550003": "21408",
    "+15005550004": "21610",
    "+15005550009": "21614",
}
_FICTIONAL_SMS = re.compile(r"\+1[0-9]{3}555010([0-9])")  # +1NXX555010d, any area code


def sms_steps(destination: str, submission: int) -> Steps:
    """The simulator's answer to the `submission`-th submission (1, 2, ...) of an SMS to `destination`."""
    if destination in TWILIO_TEST_NUMBERS:
        return [("refused", TWILIO_TEST_NUMBERS[destination])]
    match = _FICTIONAL_SMS.fullmatch(destination)
    digit = match.group(1) if match else None
    if (digit == "4" and submission <= 2) or digit == "5":
        return PRESEND_503
    if digit == "6":
        return NO_ANSWER
    accepted: Steps = [("accepted", None), ("sent", None)]
    if digit in ("1", "7"):  # 1: no receipt ever; 7: late receipt (its timer comes with a later issue)
        return accepted
    if digit == "2":
        return accepted + [("undelivered", "30003")]
    if digit == "3":
        return accepted + [("failed", "30007")]
    return accepted + [("delivered", None)]


SES_SIMULATOR_DOMAIN = "simulator.amazonses.com"


def email_submission_steps(address: str, submission: int) -> Steps | None:
    """The answer for the whole send call carrying `address`, when its local part asks for one; else None."""
    local = address.rpartition("@")[0].lower()
    if local.endswith("+fail503x2"):
        return PRESEND_503 if submission <= 2 else None
    if local.endswith("+fail503"):
        return PRESEND_503
    if local.endswith("+noanswer"):
        return NO_ANSWER
    return None


def email_delivery_steps(address: str) -> Steps:
    """What happens to one accepted email (SES simulator mailboxes, `+defer` suffixes, else delivered)."""
    local, _, domain = address.lower().rpartition("@")
    if local.endswith("+defer") or local.endswith("+deferforever"):
        # Deferral; the re-submissions (`+defer` delivered after two) come with the SMTP retry issue.
        return [("accepted", None), ("deferred", None)]
    if domain == SES_SIMULATOR_DOMAIN and local.split("+", 1)[0] in ("bounce", "suppressionlist"):
        return [("accepted", None), ("bounced", "550")]
    # success, ooto, complaint (its spam report comes with the opt-out issue) and every other address.
    return [("accepted", None), ("delivered", None)]


def _counts_submissions(channel: str, destination: str) -> bool:
    """Only destinations whose answer depends on the submission number need a counter (keeps memory flat)."""
    if channel == "sms":
        match = _FICTIONAL_SMS.fullmatch(destination)
        return bool(match) and match.group(1) == "4"
    return destination.rpartition("@")[0].lower().endswith("+fail503x2")


class InProcessSimulator:
    """The contract's provider simulator, answered in-process (no HTTP, no timers yet).

    Counts submissions per message id, as the contract's simulator does. A submission outcome of an
    email address (`+fail503x2`, `+fail503`, `+noanswer`) applies to the whole call carrying it.
    """

    def __init__(self, settings: Settings):
        self._batch = {"sms": 1, "email": settings.email_batch}
        self._submissions: dict[str, int] = {}

    def batch_size(self, channel: str) -> int:
        return self._batch[channel]

    def _submission(self, channel: str, item: Mapping[str, Any]) -> int:
        if not _counts_submissions(channel, item["destination"]):
            return 1
        n = self._submissions.get(item["message_id"], 0) + 1
        self._submissions[item["message_id"]] = n
        return n

    async def submit(self, channel: str, items: list[dict], template: Mapping[str, Any]) -> list[dict]:
        now = utc_now()
        submissions = [self._submission(channel, item) for item in items]
        for item in items:
            render_message(channel, template, item.get("variables"))  # what a real adapter would send
        call_steps: Steps | None = None
        if channel == "email":
            call_steps = next((s for item, n in zip(items, submissions)
                               if (s := email_submission_steps(item["destination"], n)) is not None), None)
        results: list[dict] = []
        for item, n in zip(items, submissions):
            if call_steps is not None:
                steps = call_steps
            elif channel == "sms":
                steps = sms_steps(item["destination"], n)
            else:
                steps = email_delivery_steps(item["destination"])
            results.extend(_results(channel, item, steps, now))
        return results


def _results(channel: str, item: Mapping[str, Any], steps: Iterable[tuple[str, str | None]], now: str) -> list[dict]:
    attempt = item["attempt"] + 1
    steps = list(steps)
    provider_message_id = None
    if steps[0][0] == "accepted":  # only a request the provider took gets an id (Twilio: "SM" + 32 hex)
        sid = uuid.uuid4().hex
        provider_message_id = f"SM{sid}" if channel == "sms" else sid
    return [make_result(item["message_id"], outcome, attempt, provider_code=code,
                        provider_message_id=provider_message_id, occurred_at=now) for outcome, code in steps]


def adapters_for(settings: Settings) -> dict[str, ProviderAdapter]:
    """The adapter of each channel. Only the simulator so far: the real providers (chosen by settings) come
    with a later issue, as does the circuit breaker that will wrap them."""
    simulator = InProcessSimulator(settings)
    return {"sms": simulator, "email": simulator}
