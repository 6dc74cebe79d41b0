"""Publishing commands on `outreach.commands`, and reading their answers from the read model.

A command is built with the token's principal as `issued_by` and `issued_via: "api"`, validated by the contract's
strict models (`schemas.commands.parse_command`: what would be `invalid_command` is a 422 here, nothing published), then
published keyed by campaign_id and acknowledged by the broker (acks=all). The write routes then wait (up to
`answer_wait_s`, the contract's 5-second promise) for the handler's answer: a `CommandRejected` is answered
with the status of `REJECTION_STATUS`, an acceptance (or no answer yet) with 202.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ValidationError

from schemas import topics
from schemas.commands import make_command, parse_command
from services.common import jsoncodec, kafka, logs, records
from services.common.settings import Settings

log = logging.getLogger("outreach.api.commands")

BROKER_TIMEOUT_S = 10.0
# Every command the API publishes says so (schemas.commands.CommandBase.issued_via): its issued_by is the
# principal of the bearer token the API checked, not a producer's assertion.
ISSUED_VIA = "api"


class BrokerUnavailable(RuntimeError):
    """The broker did not take the command (the API answers 503: nothing, or only a prefix, was published)."""


class InvalidCommand(ValueError):
    """The command breaks the contract's schema (the API answers 422, nothing published)."""

    def __init__(self, error: ValidationError):
        super().__init__(str(error))
        self.errors = error.errors(include_url=False, include_context=False, include_input=False)


def build_command(command_type: str, campaign_id: str, issued_by: str, *, command_id: str | None = None,
                  **payload: Any) -> dict[str, Any]:
    """A command envelope for `issued_by`, checked against the contract (InvalidCommand if it breaks it);
    `command_id` is given for an Idempotency-Key (services.api.idempotency), else it is a fresh random one."""
    command = make_command(command_type, campaign_id, issued_by, command_id=command_id, issued_via=ISSUED_VIA,
                           **payload)
    try:
        parse_command(jsoncodec.dumps(command))
    except ValidationError as exc:
        raise InvalidCommand(exc) from None
    return command


class CommandPublisher:
    """One producer for the process, started on first use (the API serves reads while the broker is down)."""

    def __init__(self, settings: Settings, timeout_s: float = BROKER_TIMEOUT_S):
        self.settings = settings
        self.timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = kafka.make_producer(self.settings, request_timeout_ms=int(self.timeout_s * 1000))
                try:
                    # A missing topic would be auto-created with the wrong partition count on first send.
                    await kafka.ensure_topics(self.settings, timeout_s=self.timeout_s)
                    await asyncio.wait_for(producer.start(), self.timeout_s)
                except Exception as exc:
                    try:
                        await producer.stop()
                    except Exception:
                        pass
                    raise BrokerUnavailable(f"Kafka at {self.settings.kafka_bootstrap_servers}: {exc}") from exc
                self._producer = producer
            return self._producer

    async def publish(self, commands: list[dict[str, Any]]) -> None:
        """Publish in order, each acknowledged before the next (one key, so one partition, so one order)."""
        producer = await self._started()
        for command in commands:
            with logs.context(campaign_id=command["campaign_id"], command_id=command["command_id"]):
                try:
                    await asyncio.wait_for(
                        producer.send_and_wait(topics.COMMANDS, value=jsoncodec.dumps(command),
                                               key=command["campaign_id"].encode()),
                        self.timeout_s)
                except Exception as exc:
                    log.warning("publishing %s %s failed: %s", command["type"], command["command_id"], exc)
                    raise BrokerUnavailable(f"{command['type']} {command['command_id']} not acknowledged: "
                                            f"{exc}") from exc

    async def publish_record(self, topic: str, key: str, record: BaseModel) -> None:
        """One internal record (a schemas.internal model), acknowledged by the broker (BrokerUnavailable if not)."""
        value = records.encode(record)
        producer = await self._started()
        kind = type(record).__name__
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, value=value, key=key.encode()), self.timeout_s)
        except Exception as exc:
            log.warning("publishing %s on %s failed: %s", kind, topic, exc)
            raise BrokerUnavailable(f"{kind} on {topic} not acknowledged: {exc}") from exc

    async def stop(self) -> None:
        async with self._lock:
            if self._producer is not None:
                await self._producer.stop()
                self._producer = None


# ------------------------------------------------------------------ answers

SETTLE_S = 0.5  # after the first answer event: how long to wait for trailing ones (a status change)
POLL_S = 0.2
ANSWER_POLL_S = 0.05  # a write route waiting for its command's answer polls the read model this often

# The HTTP status of a command the handler rejected, by CommandRejected's reason (README, HTTP API):
# 404 the campaign does not exist; 409 the campaign's state does not allow the command now; 422 the command
# itself is wrong (invalid, a confirmation missing, nothing in the campaign to act on); 429 the issuer's test messages
# of the hour are used up.
NOT_FOUND, CONFLICT, UNPROCESSABLE, TOO_MANY_REQUESTS = 404, 409, 422, 429
REJECTION_STATUS: dict[str, int] = {
    "unknown_campaign": NOT_FOUND,
    "campaign_exists": CONFLICT,
    "campaign_not_ready": CONFLICT,
    "campaign_not_running": CONFLICT,
    "not_editable": CONFLICT,
    "not_deletable": CONFLICT,
    "not_retryable": CONFLICT,
    "contacts_closed": CONFLICT,
    "too_many_contacts": CONFLICT,
    "channel_busy": CONFLICT,
    "invalid_command": UNPROCESSABLE,
    "disclaimer_not_accepted": UNPROCESSABLE,
    "stop_not_confirmed": UNPROCESSABLE,
    "no_valid_contacts": UNPROCESSABLE,
    "attachments_not_ready": UNPROCESSABLE,
    "nothing_to_retry": UNPROCESSABLE,
    "test_send_limit": TOO_MANY_REQUESTS,
}


def rejection_of(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The CommandRejected among a command's answer events, if it was rejected."""
    return next((e for e in events if e.get("type") == "CommandRejected"), None)


def rejection_status(reason: str) -> int:
    """The HTTP status of a rejection (a reason added to the contract later: 409, the campaign's state)."""
    return REJECTION_STATUS.get(reason, CONFLICT)


def answer_complete(events: list[dict[str, Any]]) -> bool | None:
    """True when the answer events are all there, None when that cannot be told from the events alone
    (a Stop or Retry may or may not change the status; a ContactsAdded may or may not be the last chunk)."""
    kinds = {e.get("type") for e in events}
    if "CommandRejected" in kinds or kinds & {"CampaignCreated", "TemplateUpdated"}:
        return True
    if kinds & {"CampaignRunStarted", "CampaignDeleted", "CampaignReady"}:
        return "CampaignStatusChanged" in kinds
    return None


def answer_state(events: list[dict[str, Any]]) -> str:
    if not events:
        return "pending"
    return "rejected" if any(e.get("type") == "CommandRejected" for e in events) else "answered"


async def wait_for_answer(read_answers, command_id: str, wait_s: float, *, deadline: float | None = None,
                          poll_s: float = POLL_S) -> list[dict[str, Any]]:
    """The command's answer events from the read model, waiting up to `wait_s` (or until the monotonic
    `deadline`) for the first one, then briefly (SETTLE_S) for trailing ones. `read_answers(command_id)` is the
    (blocking) read-model query."""
    if deadline is None:
        deadline = time.monotonic() + wait_s
    else:
        wait_s = deadline - time.monotonic()
    events = await asyncio.to_thread(read_answers, command_id)
    while not events and time.monotonic() < deadline:
        await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        events = await asyncio.to_thread(read_answers, command_id)
    if not events or wait_s <= 0:
        return events
    settle_until = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        complete = answer_complete(events)
        # Known incomplete: wait on (up to the deadline); unknown: wait until no new event for SETTLE_S.
        if complete is True or (complete is None and time.monotonic() >= settle_until):
            break
        await asyncio.sleep(poll_s)
        more = await asyncio.to_thread(read_answers, command_id)
        if len(more) != len(events):
            events = more
            settle_until = time.monotonic() + SETTLE_S
    return events
