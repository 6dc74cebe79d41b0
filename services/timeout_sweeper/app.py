"""The timeout sweeper: follows the message-status stream, keeps one durable timer per message, and
publishes an Expiry when one falls due. The command handler judges each expiry (a receipt that arrived
first wins), so a timer fired twice or late changes nothing it should not.

A FastStream app (services.common.kafka.run_consumer): one batch subscriber folds each batch of status
records into the timers in one transaction, then commits it; next to it, `fire_due` publishes the due
expiries through the app's publisher. The timers are shared by every sweeper instance (timers.py: in the
event store's database), so any number of them may run: each applies its partitions' records and fires
whatever is due.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.publisher.usecase import DefaultPublisher

from schemas import topics
from schemas.events import MessageStatusChanged
from schemas.internal import Expiry
from services.common import ids, kafka, logs, records
from services.common.observability import (PENDING_TIMERS, Observability, assigned_check, broker_check,
                                           event_store_check, subscriber_consumer)
from services.common.runtime import run_service
from services.common.settings import Settings
from services.timeout_sweeper.timers import STATUS_RECORD, StatusRecord, TimeoutSettings, Timer, TimerStore

log = logging.getLogger("outreach.timeout_sweeper")

GROUP_ROLE = "timeout-sweeper"  # the group: settings.group_id(GROUP_ROLE)
MAX_RECORDS = 2000  # decoded at once; with 5,000 a sweeper behind a backlog peaked 25 MB higher, no faster
TICK_S = 0.1
FIRE_LEASE_S = 10.0  # a sweeper that took due timers and died: the others fire them after this
# The public record; the sweeper reads the part of it that is a StatusRecord.
StatusValue = kafka.records_of(MessageStatusChanged, mode="serialization")


def expiry_record(timer: Timer) -> Expiry:
    return Expiry(
        expiry_id=str(uuid.uuid5(ids.OUTREACH_NS, f"expiry:{timer.message_id}:{timer.since_sequence}:{timer.kind}")),
        campaign_id=timer.campaign_id,
        message_id=timer.message_id,
        kind=timer.kind,
        since_sequence=timer.since_sequence,
    )


def parse_status(value: bytes | None) -> StatusRecord | None:
    """A status record, or None for a record the sweeper cannot use (logged, skipped: a poison record never
    stops the sweeper)."""
    try:
        return records.decode(STATUS_RECORD, value)
    except records.InvalidRecord as exc:
        with logs.context(**logs.ids_in_json(value)):
            log.warning("skipping an unreadable status record (%s): %r", exc, (value or b"")[:200])
        return None


async def fire_due(store: TimerStore, expiries: DefaultPublisher, timeouts: TimeoutSettings,
                   stop: asyncio.Event) -> None:
    """Publishes an Expiry for every due timer until `stop`; polls the due index every TICK_S when idle.

    Take (leased: other sweepers leave them), publish, wait for every acknowledgement, then forget: a crash
    in between fires the same expiry (same expiry_id) again once the lease ends, and the handler's judgement
    makes the repeat change nothing. Every sweeper fires every due timer of the shared store, whichever
    partitions it reads: a timer never waits for its partition's owner."""
    while not stop.is_set():
        due = await asyncio.to_thread(store.take_due, time.time(), FIRE_LEASE_S)
        if due:
            sent = [await expiries.publish(records.encode(expiry_record(timer)), key=timer.campaign_id.encode(),
                                           no_confirm=True) for timer in due]
            await asyncio.gather(*sent)
            await asyncio.to_thread(store.fired, due, timeouts)
        else:
            await asyncio.sleep(TICK_S)


def build_broker(settings: Settings) -> KafkaBroker:
    """The sweeper's FastStream broker, its subscriber and Expiry publisher declared, not connected."""
    return _declare(settings)[0]


def _declare(settings: Settings, store: TimerStore | None = None,
             timeouts: TimeoutSettings | None = None) -> tuple[KafkaBroker, DefaultPublisher]:
    broker = kafka.make_faststream_broker(settings, client_id="timeout-sweeper")
    expiries = broker.publisher(topics.EXPIRIES, schema=Expiry, description="a message's timer ran out")

    @kafka.batch_subscriber(broker, topics.MESSAGE_STATUS, group_id=settings.group_id(GROUP_ROLE), max_records=MAX_RECORDS,
                            settings=settings)
    async def on_batch(values: list[StatusValue], msg: KafkaMessage) -> None:
        parsed = [status for value in values if (status := parse_status(value))]
        if parsed:
            await asyncio.to_thread(store.apply, parsed, timeouts)
        await kafka.commit(msg)

    return broker, expiries


async def report_pending(store: TimerStore, settings: Settings, stop: asyncio.Event) -> None:
    """`outreach_pending_timers{kind}` from the shared timer store, every metrics_lag_interval_s."""
    while not stop.is_set():
        try:
            for kind, count in (await asyncio.to_thread(store.pending_by_kind)).items():
                PENDING_TIMERS.labels(kind).set(count)
        except Exception:
            log.debug("pending timers could not be counted", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.metrics_lag_interval_s)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    await kafka.ensure_topics(settings)
    store = TimerStore.open(settings)
    local = settings.data_dir / "timers.db"  # a sweeper's own file, from before timers were shared
    if local.exists():
        imported = store.import_local(local)
        local.rename(local.with_suffix(".db.imported"))
        log.info("imported %d pending timers from %s into the shared timer store", imported, local)
    timeouts = TimeoutSettings(settings.sending_timeout_s, settings.sent_timeout_s, settings.retry_window_s)
    broker, expiries = _declare(settings, store, timeouts)
    observability = Observability(settings, "timeout-sweeper", {
        "broker": broker_check(settings), "event_store": event_store_check(settings),
        "partitions_assigned": assigned_check(subscriber_consumer(broker))})
    await observability.start()
    pending = asyncio.create_task(report_pending(store, settings, stop))
    try:
        log.info("timeout sweeper running with %d pending timers", store.pending())
        await kafka.run_consumer(broker, stop, alongside=lambda: fire_due(store, expiries, timeouts, stop))
    finally:
        stop.set()
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await observability.stop()
        store.close()


def main() -> None:
    run_service(serve, "timeout-sweeper")


if __name__ == "__main__":
    main()
