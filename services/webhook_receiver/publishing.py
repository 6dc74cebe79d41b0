"""What the receiver publishes, through FastStream publishers (so they appear in its AsyncAPI document).

- `SenderResults` on `outreach.internal.sender-results`, keyed by campaign_id, batched per campaign by the
  kernel's `ResultsBatcher` (flushed `FLUSH_INTERVAL_S` after the first result, or at 1000 results);
- `OptOutChanged` on `outreach.internal.opt-outs`, keyed by destination, sent at once.

Every call returns once the broker acknowledged (acks=all) the records carrying its items, and raises if
publishing failed: the request is answered only then (503 on failure, and the provider retries).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Protocol

from faststream.kafka import KafkaBroker
from pydantic import BaseModel

from schemas import topics
from schemas.internal import OptOutChanged, SenderResult, SenderResults
from services.common import records
from services.common.batching import ResultsBatcher

FLUSH_INTERVAL_S = 0.01  # a provider waits for its answer: results wait at most this for others


class Publisher(Protocol):
    """A FastStream publisher's `publish`, as used here (`no_confirm=True`: the broker's ack is awaited
    on the future it returns, so several records are in flight at once)."""

    async def publish(self, message: bytes, *, key: bytes, no_confirm: bool) -> Awaitable[Any]: ...


def declare_publishers(broker: KafkaBroker) -> dict[str, Publisher]:
    """The receiver's publishers on `broker`, by topic."""
    return {
        topics.SENDER_RESULTS: broker.publisher(
            topics.SENDER_RESULTS, title="senderResults", schema=SenderResults,
            description="Outcomes reported by provider callbacks, batched per campaign (key: campaign_id)."),
        topics.OPT_OUTS: broker.publisher(
            topics.OPT_OUTS, title="optOuts", schema=OptOutChanged,
            description="Opt-outs and opt-ins from STOP/START, unsubscribes and complaints (key: destination)."),
    }


class Outbox:
    """Results batched per campaign, opt-outs sent at once; `start()` before use, `close()` publishes what
    is pending."""

    def __init__(self, publishers: Mapping[str, Publisher], *, interval_s: float = FLUSH_INTERVAL_S):
        self._publishers = publishers
        self._batcher = ResultsBatcher(self._deliver_results, interval_s=interval_s, retry_failed=False)
        self._stop = asyncio.Event()
        self._flusher: asyncio.Task | None = None

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._batcher.run(self._stop))

    async def close(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def results(self, campaign_id: str, results: list[SenderResult]) -> None:
        if results:
            # Shielded: a request whose client went away must not cancel a flush other requests wait for.
            await asyncio.shield(self._batcher.add(campaign_id, results))

    async def opt_outs(self, opt_outs: Iterable[OptOutChanged]) -> None:
        await self._deliver(topics.OPT_OUTS, [(o.destination, o) for o in opt_outs])

    async def _deliver_results(self, keyed: list[tuple[str, BaseModel]]) -> None:
        await self._deliver(topics.SENDER_RESULTS, keyed)

    async def _deliver(self, topic: str, keyed: list[tuple[str, BaseModel]]) -> None:
        """Publish the records; return once the broker acknowledged all of them."""
        publisher = self._publishers[topic]
        deliveries = []
        try:
            for key, record in keyed:
                deliveries.append(await publisher.publish(records.encode(record), key=key.encode(),
                                                          no_confirm=True))
        except BaseException:
            await asyncio.gather(*deliveries, return_exceptions=True)  # nothing left unobserved
            raise
        await asyncio.gather(*deliveries)
