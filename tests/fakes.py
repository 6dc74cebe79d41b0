"""Fakes shared by the sender's and the webhook receiver's tests: a virtual clock, producers and publishers
that check every record against its `schemas/` model, and the dispatcher harness (journal, batcher,
dispatcher) with the simulator behind a recording adapter.

Whatever a fake producer or publisher is handed is decoded with the model of its topic: a producer that
sends a record its model rejects fails the test that made it send it.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from schemas import topics
from schemas.internal import ClaimRequest, OptOutChanged, SenderResults, SendingHold, TestMessageResult
from services.common import jsoncodec, records
from services.common.embedded_broker import free_port
from services.common.fence import ClaimedMessage, HandoffFence, open_fence
from services.common.settings import Settings
from services.sender.app import Sender
from services.sender.dispatch import Dispatcher, results_batcher
from services.sender.journal import Journal
from services.sender.providers import InProcessSimulator

SMS_TEMPLATE = {"body": "Hi {{name}}"}
EMAIL_TEMPLATE = {"subject": "Hello {{name}}", "html": "<p>Hi {{name}}</p>", "from_email": "team@example.com",
                  "from_name": "Team", "attachments": []}

# What may be published on each internal topic our producers write.
TOPIC_MODELS: dict[str, Any] = {
    topics.CLAIM_REQUESTS: ClaimRequest,
    topics.SENDER_RESULTS: TypeAdapter(SenderResults | SendingHold | TestMessageResult),
    topics.OPT_OUTS: OptOutChanged,
}


def checked(topic: str, value: bytes) -> dict:
    """`value` as a dict, after its topic's model accepted it (InvalidRecord otherwise)."""
    records.decode(TOPIC_MODELS[topic], value)
    return jsoncodec.loads(value)


# ---------------------------------------------------------------- time

class FakeClock:
    """Virtual time: `sleep` advances it (and yields, so other tasks run as they would)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """The port of a listener whose accept backlog is full: a TCP handshake with it does not complete
    (a provider that cannot be reached: the connect timeout fires, not the read timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the backlog (never accepted)
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextlib.asynccontextmanager
async def serving(app: web.Application, release: asyncio.Event | None = None) -> AsyncIterator[str]:
    """`app` (a fake provider) on a free local port: its base URL until the block ends. Then `release` is
    set, so handlers holding a request end, and the server stops."""
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if release is not None:
            release.set()
        await runner.cleanup()


# ---------------------------------------------------------------- producers

def _acknowledged() -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class FakeProducer:
    """An aiokafka producer that acknowledges at once; `sent` holds (topic, key, value dict), each checked."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict]] = []

    async def send(self, topic, value, key=None):
        self.sent.append((topic, key, checked(topic, value)))
        return _acknowledged()

    def values(self, topic: str) -> list[dict]:
        return [value for t, _, value in self.sent if t == topic]


class FakePublishers(dict):
    """FastStream publishers by topic (`publish(message, key=, no_confirm=)`), sharing one `sent` list of
    (topic, key, value dict); each fails with ConnectionError while `fail` is set."""

    def __init__(self, *topic_names: str) -> None:
        super().__init__()
        self.fail = False
        self.sent: list[tuple[str, bytes, dict]] = []
        for topic in topic_names:
            self[topic] = _FakePublisher(self, topic)


@dataclass
class _FakePublisher:
    owner: FakePublishers
    topic: str

    async def publish(self, message: bytes, *, key: bytes, no_confirm: bool = False):
        if self.owner.fail:
            raise ConnectionError("broker down")
        self.owner.sent.append((self.topic, key, checked(self.topic, message)))
        return _acknowledged() if no_confirm else None


# ---------------------------------------------------------------- claims

def items(destinations: list[str], variables: dict | None = None, attempt: int = 0) -> list[dict]:
    return [{"message_id": str(uuid.uuid4()), "row": n + 1, "destination": d,
             "variables": variables or {"name": "Ada"}, "attempt": attempt} for n, d in enumerate(destinations)]


def work(channel: str, claim_items: list[dict], template: Mapping[str, Any] | None = None, *,
         claim_id: str | None = None, campaign_id: str | None = None) -> dict:
    """A WorkClaimed as the dispatcher takes it (its plain form); the template defaults to the channel's."""
    return {"type": "WorkClaimed", "event_id": str(uuid.uuid4()), "claim_id": claim_id or str(uuid.uuid4()),
            "campaign_id": campaign_id or str(uuid.uuid4()), "channel": channel, "run_no": 1,
            "template": dict(template or (SMS_TEMPLATE if channel == "sms" else EMAIL_TEMPLATE)),
            "items": claim_items, "remaining_queued": 0, "holds_channel": True}


# ---------------------------------------------------------------- the dispatcher harness

@dataclass
class Published:
    """The results batcher's publish function: every record checked, results and holds kept apart."""

    results: list[tuple[str, list[dict]]] = field(default_factory=list)  # (campaign_id, results)
    holds: list[dict] = field(default_factory=list)
    test_messages: list[dict] = field(default_factory=list)  # TestMessageResult records

    async def __call__(self, keyed: list[tuple[str, BaseModel]]) -> None:
        for campaign_id, record in keyed:
            value = checked(topics.SENDER_RESULTS, records.encode(record))
            if value["type"] == "SenderResults":
                assert value["campaign_id"] == campaign_id
                self.results.append((campaign_id, value["results"]))
            elif value["type"] == "TestMessageResult":
                self.test_messages.append(value)
            else:
                self.holds.append(value)


class RecordingAdapter:
    """The in-process simulator, recording (when, how many items) per call and submissions per message."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.sim = InProcessSimulator(settings)
        self.clock = clock
        self.calls: list[tuple[float, int]] = []
        self.submitted: dict[str, int] = {}

    def batch_size(self, channel: str) -> int:
        return self.sim.batch_size(channel)

    async def submit(self, channel, claim_items, template):
        self.calls.append((self.clock(), len(claim_items)))
        for it in claim_items:
            self.submitted[it["message_id"]] = self.submitted.get(it["message_id"], 0) + 1
        return await self.sim.submit(channel, claim_items, template)


@dataclass
class Harness:
    dispatcher: Dispatcher
    journal: Journal
    published: Published
    settings: Settings
    fence: HandoffFence


def relayed(fence: HandoffFence, settings: Settings, process: Callable[..., Any]) -> Callable[..., Any]:
    """`Dispatcher.process` after the relay's part: the fence opened for the claim (once per claim, at its
    first delivery, with a version above every earlier claim's; the Sending deadline from then)."""
    versions: dict[str, int] = {}

    async def process_relayed(claim: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        if claim["claim_id"] not in versions:
            versions[claim["claim_id"]] = len(versions) + 1
            fence.open_claim(campaign_id=claim["campaign_id"], claim_id=claim["claim_id"],
                             claim_version=versions[claim["claim_id"]],
                             deadline=time.time() + settings.sending_timeout_s,
                             messages=[ClaimedMessage(item["message_id"], item["attempt"])
                                       for item in claim.get("items") or ()])
        return await process(claim, *args, **kwargs)

    return process_relayed


@contextlib.asynccontextmanager
async def dispatcher_harness(settings: Settings, adapters: Mapping[str, Any],
                             **dispatcher_options: Any) -> AsyncIterator[Harness]:
    """A Dispatcher over `adapters` with a journal in `settings.data_dir` and a running results batcher."""
    journal = Journal.open(settings)
    fence = open_fence(settings)
    published = Published()
    batcher = results_batcher(journal, published)
    stop = asyncio.Event()
    flusher = asyncio.create_task(batcher.run(stop))
    dispatcher = Dispatcher(settings, journal, dict(adapters), batcher, fence=fence, **dispatcher_options)
    dispatcher.process = relayed(fence, settings, dispatcher.process)  # type: ignore[method-assign]
    try:
        yield Harness(dispatcher, journal, published, settings, fence)
    finally:
        await dispatcher.close()
        stop.set()
        await flusher
        journal.close()
        fence.close_connection()


@contextlib.asynccontextmanager
async def simulated_sender(settings: Settings) -> AsyncIterator[tuple[Sender, FakeProducer]]:
    """A Sender (no broker) on one in-process simulator for both channels, its results batcher running,
    publishing to a FakeProducer."""
    journal = Journal.open(settings)
    fence = open_fence(settings)
    producer = FakeProducer()
    simulator = InProcessSimulator(settings)
    sender = Sender(settings, journal, producer, {"sms": simulator, "email": simulator}, fence=fence)
    sender.dispatcher.process = relayed(fence, settings, sender.dispatcher.process)  # type: ignore[method-assign]
    stop = asyncio.Event()
    flusher = asyncio.create_task(sender.results.run(stop))
    try:
        yield sender, producer
    finally:
        await sender._stop_background()
        stop.set()
        await flusher
        journal.close()
        fence.close_connection()
