"""The outbox relay: publishes stored events to Kafka in notification-log order.

Read a page from the checkpoint, map each stored event to wire records (stable event ids), open the hand-off
fence (services/common/fence.py) for the page's claims and test messages, send, wait for every ack, then checkpoint. The
fence rows exist before any sender can see the WorkClaimed they govern; a rewind opens nothing again
(a claim's rows are opened once, by its version). On a send error it drops its producer and rewinds to the checkpoint, so records
are never reordered (a resend repeats records; consumers dedupe on event_id). It also notices a new, empty
broker (the embedded one keeps nothing) and republishes the whole history.

Several relays may run: one publishes, the others stand by. The active one holds the deployment's relay lock
(services/common/leader.py: a PostgreSQL advisory lock, or a file lock beside a SQLite store) and checks it
between pages; a standby tries for it every `STANDBY_POLL_S`, and when it gets it, it starts from the
checkpoint the previous one saved (a page published and not yet saved goes out again: consumers dedupe).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter

from schemas import topics
from services.common import ids, kafka
from services.common.fence import ClaimedMessage, HandoffFence
from services.common.lag import LagCollector
from services.common.observability import MESSAGES, RELAY_LAG, Observability, broker_check, event_store_check
from services.common.leader import LeaderLock, leader_lock
from services.common.retry import retrying
from services.common.runtime import run_service
from services.common.settings import Settings
from services.command_handler import wire
from services.command_handler.application import open_app
from services.command_handler.domain.model import Campaign
from services.command_handler.checkpoint import Checkpoint, open_checkpoint_store

log = logging.getLogger("outreach.relay")

PAGE_SIZE = 200
# A page stops after the stored event that brings its records to this many (always one event at least): a run
# of a 300,000-message campaign stores 300,000 status changes in 300 events, and the relay's memory follows
# the page, not the campaign. After a page cut short the next one reads only twice the events it used (their
# stored bytes are in memory too), growing back to PAGE_SIZE while pages are not cut. Replaying a stored
# 300,000-message campaign, 2,000 records a page publish as fast as 5,000 and peak 20 MB lower.
PAGE_RECORDS = 2_000
IDLE_POLL_S = 0.02
BROKER_CHECK_S = 5.0  # an empty broker is noticed within seconds; checking costs new connections
REWIND_FIRST_WAIT_S = 0.1  # after a failed page: 0.1 s, doubling up to 5 s (plus jitter) while it fails
REWIND_LONGEST_WAIT_S = 5.0
STANDBY_POLL_S = 0.5  # a standby tries for the lock this often: the takeover delay after a crash
LOCK_CHECK_S = 0.5  # the active relay checks it still holds the lock this often (between pages)
OPT_OUT_LISTS_MARK = "relay-opt-out-lists"  # the checkpoint row saying the stored opt-out list changes went out


class Relay:
    def __init__(self, settings: Settings, lock: LeaderLock | None = None):
        self.settings = settings
        self.lock = lock or leader_lock(settings, "relay")
        self._lock_checked = 0.0
        self.app = open_app(settings)
        self.checkpoints = open_checkpoint_store(settings)
        self.checkpoint = self.checkpoints.load()
        self.fence: HandoffFence = self.app.fence
        self.producer = None
        self._last_broker_check = 0.0
        self._page_size = PAGE_SIZE
        self._opt_out_lists_published = False  # the lists' changes stored before the relay published them

    async def _producer(self):
        if self.producer is None:
            self.producer = kafka.make_producer(self.settings, linger_ms=2)
            await self.producer.start()
        return self.producer

    async def _drop_producer(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception:  # it is being discarded because it failed
                log.debug("producer stop failed", exc_info=True)

    async def check_broker(self) -> None:
        """A broker holding fewer campaign events than we published is a new, empty one: start over."""
        self._last_broker_check = time.monotonic()
        await kafka.ensure_topics(self.settings)
        held = await kafka.end_offsets_total(self.settings, topics.CAMPAIGN_EVENTS)
        if self.checkpoint.published and (held or 0) < self.checkpoint.published:
            log.warning("the broker holds %s campaign events but %d were published: republishing from the start",
                        held, self.checkpoint.published)
            self.checkpoint = Checkpoint()
            self.checkpoints.save(self.checkpoint)

    def _read_page(self) -> tuple[int, list[wire.Record]]:
        """The next page's records; the fence is open for its claims when this returns."""
        notifications = self.app.recorder.select_notifications(start=self.checkpoint.position + 1,
                                                               limit=self._page_size)
        position, records, used = self.checkpoint.position, [], 0
        for n in notifications:
            if len(records) >= PAGE_RECORDS:
                break  # the rest is the next page's
            e = self.app.mapper.to_domain_event(n)
            if isinstance(e, Campaign.WorkClaimed) and e.items:
                open_fence_for_claim(self.fence, e, self.settings.sending_timeout_s)
            elif isinstance(e, Campaign.TestMessageQueued):
                open_fence_for_test_message(self.fence, e, self.settings.sending_timeout_s)
            records += wire.to_records(e)
            position, used = n.id, used + 1
        cut = used < len(notifications)
        self._page_size = min(PAGE_SIZE, 2 * used if cut else 2 * self._page_size)
        return position, records

    async def publish_once(self) -> int:
        """Publishes one page; returns how many notifications it covered (0 when caught up)."""
        if time.monotonic() - self._last_broker_check > BROKER_CHECK_S:
            await self.check_broker()
        if not self._opt_out_lists_published:
            await self._publish_stored_opt_out_lists()
        position, records = await asyncio.to_thread(self._read_page)
        if position == self.checkpoint.position:
            return 0
        producer = await self._producer()
        futures = []
        for r in records:
            value = r.encoded()
            if len(value) > topics.MAX_RECORD_BYTES:
                futures.append(await self._park_oversized(producer, r, value))
                continue
            futures.append(await producer.send(r.topic, value=value, key=r.key.encode()))
        for future in futures:
            await future
        counted = Counter((r.value.get("channel") or "", r.value.get("status") or "", r.value.get("reason") or "")
                          for r in records if r.topic == topics.MESSAGE_STATUS)
        for labels, count in counted.items():  # one metric update per distinct label set, not per record
            MESSAGES.labels(*labels).inc(count)
        covered = position - self.checkpoint.position
        self.checkpoint = Checkpoint(
            position=position,
            published=self.checkpoint.published + sum(r.topic == topics.CAMPAIGN_EVENTS for r in records))
        await asyncio.to_thread(self.checkpoints.save, self.checkpoint)
        return covered

    async def _publish_stored_opt_out_lists(self) -> None:
        """Once per event store: every stored change of the opt-out lists, when the relay's checkpoint is past some
        of them. The relay publishes them on outreach.internal.opt-out-list since that topic exists; changes stored
        before were published on no topic, so they go out once here (those after the checkpoint go out again with
        their pages: the read model keeps the highest sequence per destination). Done when a mark of its own
        (a row of the checkpoint table) says so; a failure leaves the mark unset: tried again with the next page."""
        marks = await asyncio.to_thread(open_checkpoint_store, self.settings, OPT_OUT_LISTS_MARK)
        try:
            if (await asyncio.to_thread(marks.load)).position == 0:
                if self.checkpoint.position > 0:
                    published = await self._publish_opt_out_list_events()
                    log.info("published the %d stored changes of the opt-out lists", published)
                await asyncio.to_thread(marks.save, Checkpoint(position=1))
        finally:
            await asyncio.to_thread(marks.close)
        self._opt_out_lists_published = True

    async def _publish_opt_out_list_events(self) -> int:
        producer = await self._producer()
        published = 0
        for channel in ("sms", "email"):
            events = iter(await asyncio.to_thread(self.app.events.get, ids.opt_out_list_id(channel)))
            while chunk := await asyncio.to_thread(lambda: list(itertools.islice(events, PAGE_RECORDS))):
                futures = [await producer.send(r.topic, value=r.encoded(), key=r.key.encode())
                           for e in chunk for r in wire.to_records(e)]
                for future in futures:
                    await future
                published += len(futures)
        return published

    @staticmethod
    async def _park_oversized(producer, record: wire.Record, value: bytes):
        """A record over the contract's 1 MiB limit cannot be published (the handler refuses commands whose
        events would be; an event stored before that rule could be): parked in the DLQ, cut to 64 KiB, so
        one record never halts the relay for every campaign."""
        error = f"a {record.value.get('type', 'record')} of {len(value)} bytes, over the {topics.MAX_RECORD_BYTES} " \
                f"a record may be: not published"
        headers = {"x-error": error, "x-source-topic": record.topic, "x-source-offset": "",
                   "x-consumer": "relay", "x-event-id": str(record.value.get("event_id", ""))}
        log.error("ALARM: %s (event %s); parked in %s", error, record.value.get("event_id"), topics.COMMANDS_DLQ)
        return await producer.send(topics.COMMANDS_DLQ, value=value[:kafka.DLQ_VALUE_LIMIT], key=record.key.encode(),
                                   headers=[(k, v.encode()) for k, v in headers.items()])

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by until this relay holds the lock, then publish while it does; until `stop`."""
        standing_by = False
        while not stop.is_set():
            if not await asyncio.to_thread(self.lock.try_acquire):
                if not standing_by:
                    log.info("standing by: another relay holds the lock and publishes")
                    standing_by = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STANDBY_POLL_S)
                continue
            standing_by = False
            try:  # where the previous holder stopped (this one's own view may be minutes old)
                self.checkpoint = await asyncio.to_thread(self.checkpoints.load)
            except Exception:  # the store is down: let go, and try again (a standby may take over)
                log.warning("the relay checkpoint could not be read; trying again", exc_info=True)
                await asyncio.to_thread(self.lock.release)
                await asyncio.sleep(STANDBY_POLL_S)
                continue
            log.info("active: this relay holds the lock; publishing from position %d", self.checkpoint.position)
            await self._publish_while_held(stop)
        await asyncio.to_thread(self.lock.release)

    async def _still_held(self) -> bool:
        if time.monotonic() - self._lock_checked < LOCK_CHECK_S:
            return True
        self._lock_checked = time.monotonic()
        return await asyncio.to_thread(self.lock.still_held)

    async def _publish_while_held(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self._still_held():
                log.warning("lost the relay lock (its connection ended): standing down")
                await self._drop_producer()
                return
            covered = 0
            async for attempt in retrying(on=Exception, timeout_s=None, first_wait_s=REWIND_FIRST_WAIT_S,
                                          longest_wait_s=REWIND_LONGEST_WAIT_S):
                with attempt:
                    if not stop.is_set():  # a stop ends the waiting out of a failure too
                        covered = await self._publish_or_rewind()
            if covered == 0:
                await asyncio.sleep(IDLE_POLL_S)

    async def _publish_or_rewind(self) -> int:
        """One page; on a failure the producer is dropped and the next try starts from the checkpoint (and
        checks the broker first), so records are never reordered."""
        try:
            return await self.publish_once()
        except Exception:
            log.exception("publishing failed: dropping the producer and rewinding to position %d",
                          self.checkpoint.position)
            await self._drop_producer()
            self._last_broker_check = 0.0
            raise

    async def report_lag(self, stop: asyncio.Event) -> None:
        """`outreach_relay_lag_events`: the store's last notification id minus the position this relay has
        published to (a standby reads the active one's checkpoint), every metrics_lag_interval_s."""
        while not stop.is_set():
            try:
                last = await asyncio.to_thread(self.app.recorder.max_notification_id) or 0
                position = self.checkpoint.position if self.producer is not None else \
                    (await asyncio.to_thread(open_checkpoint_store(self.settings).load_and_close)).position
                RELAY_LAG.set(max(0, last - position))
            except Exception:
                log.debug("relay lag could not be read", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.metrics_lag_interval_s)

    async def close(self) -> None:
        await self._drop_producer()
        self.checkpoints.close()
        self.app.close()


def open_fence_for_claim(fence: HandoffFence, e: Campaign.WorkClaimed, sending_timeout_s: float) -> None:
    """The claim's messages may be handed off under it until its Sending deadline (from the claim); the
    claim's version is the campaign's event version, so a later claim of a message replaces this one."""
    fence.open_claim(
        campaign_id=str(e.originator_id), claim_id=e.claim_id, claim_version=e.originator_version,
        deadline=e.timestamp.timestamp() + sending_timeout_s,
        messages=[ClaimedMessage(item["message_id"], item["attempt"]) for item in e.items])


def open_fence_for_test_message(fence: HandoffFence, e: Campaign.TestMessageQueued, sending_timeout_s: float) -> None:
    """A test message may be handed off once, under its command's id, until its Sending deadline: a redelivered
    work record, a second sender or a restarted one finds it taken (or closed) and sends nothing."""
    fence.open_claim(campaign_id=str(e.originator_id), claim_id=e.causation_id, claim_version=e.originator_version,
                     deadline=e.timestamp.timestamp() + sending_timeout_s,
                     messages=[ClaimedMessage(e.message_id, 0)])


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    relay = Relay(settings)
    observability = Observability(settings, "relay", {"broker": broker_check(settings),
                                                      "event_store": event_store_check(settings)})
    await observability.start()
    # Every relay, active or standing by, computes consumer lag and DLQ records (services/common/lag.py).
    side = [asyncio.create_task(LagCollector(settings).run(stop)), asyncio.create_task(relay.report_lag(stop))]
    try:
        await relay.run(stop)
    finally:
        stop.set()
        for task in side:  # a round waiting on an absent broker or store is not waited for
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        await relay.close()
        await observability.stop()


def main() -> None:
    run_service(serve, "relay")


if __name__ == "__main__":
    main()
