"""Sender results batched per campaign: the one batcher of the sender and the webhook receiver.

Results (`schemas.internal.SenderResult`, or their dicts: validated as they are added, so a bad one fails
its caller, not a flush) are collected per campaign and leave as `SenderResults` records, one per campaign
and up to `max_results` results each, keyed by campaign id, in the order they were added. A flush happens
`interval_s` after the first pending item, or at once when `max_results` are pending. Other whole records
keyed by campaign (the sender's `SendingHold`) may ride along (`add_record`), after the results.

`publish([(campaign_id, record), ...])` returns once the broker acknowledged every record. The future
`add` / `add_record` return resolves once its items are published. When publishing fails:
- `retry_failed=True` (the sender): the batch is kept, first and in order, and the flush is retried
  (`services.common.retry`) until it passes or the run stops; the futures stay pending meanwhile;
- `retry_failed=False` (the webhook receiver): the futures of the batch fail with the error (the request
  is answered 503 and the provider retries it).
`before_publish(done)`, if given, runs before publishing with the `done` items of the batch (the sender
journals its finished hand-offs there: idempotent, so a retried flush may repeat it).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas.internal import SenderResult, SenderResults
from services.common.retry import retrying

log = logging.getLogger("outreach.batching")

MAX_RESULTS_PER_RECORD = 1000  # ~250 bytes each: far below the 1 MiB record limit

Publish = Callable[[list[tuple[str, BaseModel]]], Awaitable[None]]
_RESULTS = TypeAdapter(list[SenderResult])  # models pass as they are, dicts are validated (a third faster in bulk)


@dataclass
class _Pending:
    campaign_id: str
    results: list[SenderResult]
    done: list[Any]
    future: asyncio.Future = field(repr=False)
    record: BaseModel | None = None  # a whole record (SendingHold) instead of results


class ResultsBatcher:
    """See the module docstring. Run `run(stop)` beside the producers of results; it flushes what is left
    once `stop` is set."""

    def __init__(self, publish: Publish, *, interval_s: float, max_results: int = MAX_RESULTS_PER_RECORD,
                 retry_failed: bool = True, before_publish: Callable[[list[Any]], None] | None = None):
        self._publish = publish
        self._interval_s = interval_s
        self._max_results = max_results
        self._retry_failed = retry_failed
        self._before_publish = before_publish
        self._pending: list[_Pending] = []
        self._pending_results = 0
        self._waiting = asyncio.Event()  # something is pending
        self._full = asyncio.Event()  # max_results are pending: flush now

    def add(self, campaign_id: str, results: Iterable[SenderResult | Mapping[str, Any]],
            done: Iterable[Any] = ()) -> asyncio.Future:
        """Results of one campaign (and the caller's `done` items for `before_publish`)."""
        typed = _RESULTS.validate_python(list(results))
        return self._add(_Pending(campaign_id, typed, list(done), asyncio.get_running_loop().create_future()))

    def add_record(self, campaign_id: str, record: BaseModel) -> asyncio.Future:
        """A whole record keyed by `campaign_id` (SendingHold), published with the next flush."""
        return self._add(_Pending(campaign_id, [], [], asyncio.get_running_loop().create_future(), record))

    def _add(self, pending: _Pending) -> asyncio.Future:
        self._pending.append(pending)
        self._pending_results += len(pending.results)
        self._waiting.set()
        if self._pending_results >= self._max_results:
            self._full.set()
        return pending.future

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until `stop` is set, then flush what is left (once)."""
        waking = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                await self._waiting.wait()
                try:
                    await asyncio.wait_for(self._full.wait(), self._interval_s)
                except TimeoutError:
                    pass
                if not stop.is_set():
                    await self._flush_retrying(stop)
        finally:
            waking.cancel()
        try:
            await self.flush()
        except Exception:
            log.exception("last results flush failed")

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._waiting.set()
        self._full.set()

    async def _flush_retrying(self, stop: asyncio.Event) -> None:
        try:
            async for attempt in retrying(on=lambda exc: not stop.is_set(), timeout_s=None):
                with attempt:
                    await self.flush()
        except Exception:  # the run is stopping: the last flush tries once more
            log.exception("results flush failed")

    async def flush(self) -> None:
        """Publish what is pending now (see the module docstring for a failure)."""
        batch, self._pending, self._pending_results = self._pending, [], 0
        self._waiting.clear()
        self._full.clear()
        if not batch:
            return
        try:
            if self._before_publish is not None:
                self._before_publish([item for p in batch for item in p.done])
            await self._publish(self._records(batch))
        except BaseException as exc:
            if self._retry_failed or not isinstance(exc, Exception):
                self._requeue(batch)
                raise
            log.warning("publishing %d results failed: %r", sum(len(p.results) for p in batch), exc)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
                    p.future.exception()  # retrieved: a caller gone meanwhile must not log "never retrieved"
            return
        for p in batch:
            if not p.future.done():
                p.future.set_result(None)

    def _requeue(self, batch: list[_Pending]) -> None:
        self._pending[:0] = batch  # first, in order, for the next flush
        self._pending_results += sum(len(p.results) for p in batch)
        self._waiting.set()

    def _records(self, batch: list[_Pending]) -> list[tuple[str, BaseModel]]:
        per_campaign: dict[str, list[SenderResult]] = defaultdict(list)  # insertion order = report order
        for p in batch:
            if p.record is None:
                per_campaign[p.campaign_id].extend(p.results)
        records: list[tuple[str, BaseModel]] = [
            (campaign_id, SenderResults(result_id=str(uuid.uuid4()), campaign_id=campaign_id,
                                        results=results[i:i + self._max_results]))
            for campaign_id, results in per_campaign.items() if results
            for i in range(0, len(results), self._max_results)]
        records.extend((p.campaign_id, p.record) for p in batch if p.record is not None)
        return records
