"""The sender process (`python -m services.sender`): claims work, submits it, reports the outcomes.

- `outreach.campaign-events`, every partition, by every instance (no consumer group; the positions live in
  the journal): CampaignCreated teaches the channel; CampaignRunStarted / RetryStarted start claiming for
  the campaign (journalled, so a restart resumes); CampaignStopped / CampaignDeleted and a final
  CampaignStatusChanged end it (a drained campaign is polled until then: claims.py); a hold
  (CampaignSendingHeld) pauses every instance's claims and sets every instance probing.
- Ownership: a campaign is claimed for by the instance that holds its partition of
  `outreach.internal.sender-work` (group `{deployment}-sender-work`; the relay keys work by campaign id), so
  the answers to its claims come to it, and ownership moves with a rebalance or a crash.
- Claim loop: up to 2 claims outstanding per owned active campaign, each a `ClaimRequest` on
  `outreach.internal.claim-requests` (see claims.py for the bookkeeping and its timeout).
- `outreach.internal.sender-work`: each WorkClaimed is worked on as its own task (dispatch.py), and each
  TestMessageWork (a test message: sent once, its outcome a TestMessageResult, dispatch.Dispatcher.send_test); its offset
  is committed once it and every record before it on its partition have their results published
  (`OffsetTracker`), so a crash redelivers, and the hand-off fence stops double sends (also across
  instances: claims an old owner still works on are refused to the new one message by message).
- Claim size: about 2 s of the channel's rate (claims.py); for SMS in messages, from the segments per
  message (the template's, from CampaignCreated / TemplateUpdated, then the rendered messages of each
  WorkClaimed). Sending itself is paced by a token bucket per channel in the dispatcher (ratelimit.py).
- Results leave as `SenderResults` on `outreach.internal.sender-results`, batched per campaign; the
  circuit breakers' `SendingHold` records (dispatch.py, breaker.py) leave the same way.
- Every record out (ClaimRequest, SenderResults, SendingHold) is built as its `schemas.internal` model and
  encoded by `services.common.records`; a WorkClaimed is decoded there too (one validation point each way:
  one its model rejects is logged and skipped, its offset committed).
- An adapter with `run_retries(stop, publish)` (SMTP re-submissions of deferred emails, the in-process
  simulator's late receipts) runs beside the loops; what it publishes goes through the results batcher.

SIGTERM / SIGINT: stop claiming and fetching, let the claims in hand finish (up to `DRAIN_TIMEOUT_S`),
flush the results, commit, exit.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Union

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.partitioner import murmur2
from pydantic import BaseModel, Field, TypeAdapter

from schemas import topics
from schemas.internal import ClaimRequest, TestMessageWork, WorkClaimed, template_digest
from schemas.times import utc_now
from services.common import channel_settings, ids, jsoncodec, kafka, logs, records
from services.common.channel_settings import ChannelConfig, ChannelSettingsFeed
from services.common.fence import HandoffFence, open_fence
from services.common.observability import (CLAIMS_IN_FLIGHT, Observability, assigned_check, broker_check,
                                           event_store_check)
from services.common.retry import retrying
from services.common.runtime import run_service
from services.common.settings import Settings
from services.common.undecodable import undecodable_error
from services.sender.claims import CLAIM_TIMEOUT_S, ClaimBook, claim_size
from services.sender.dispatch import Dispatcher, results_batcher
from services.sender.journal import Journal
from services.sender.providers import ProviderAdapter, adapter_for, adapters_for
from services.sender.ratelimit import mean_segments, sms_cost

log = logging.getLogger("outreach.sender")

# What the relay sends on outreach.internal.sender-work: claims' work, and test messages (told by `type`).
WORK_RECORD: TypeAdapter[WorkClaimed | TestMessageWork] = TypeAdapter(
    Annotated[Union[WorkClaimed, TestMessageWork], Field(discriminator="type")])

AdapterFactory = Callable[[Settings, str], ProviderAdapter]  # (settings, channel) -> that channel's adapter

WORK_GROUP_ROLE = "sender-work"  # the group: settings.group_id(WORK_GROUP_ROLE)
MAX_JOBS = 64  # WorkClaimed records worked on at once (more waits in the broker)
DRAIN_TIMEOUT_S = 15.0
PRUNE_EVERY_S = 3600.0
KEEP_HANDOFFS_S = 7 * 24 * 3600.0  # a claim is redelivered within minutes; a week is plenty
ACTIVATING_EVENTS = ("CampaignRunStarted", "RetryStarted")
ENDING_EVENTS = ("CampaignStopped", "CampaignDeleted")  # nothing left to claim (a new run comes as RunStarted)
# Campaign statuses with nothing queued, sending or sent: claiming ends (a retry comes as RetryStarted).
FINAL_STATUSES = ("complete", "complete_with_errors", "failed", "deleted")
JOB_FIRST_WAIT_S, JOB_LONGEST_WAIT_S = 0.5, 10.0  # a claim that failed is tried again after these
TEMPLATE_POLL_S = 0.05  # a work record whose template's event is not read yet waits for it this often
TEMPLATE_LATE_S = 10.0  # ... and says so in the log after this long
TEMPLATES_CACHED = 8  # templates kept decoded (one per running campaign is what is needed)
# A test message waits this long for its template (someone waits for its answer; a campaign deleted meanwhile has
# none any more), then it is answered not_sent.
TEST_TEMPLATE_WAIT_S = 30.0


class OffsetTracker:
    """Per partition, the offsets in hand in fetch order; committable up to the first unfinished one."""

    def __init__(self) -> None:
        self._offsets: dict[TopicPartition, dict[int, bool]] = {}

    def begin(self, tp: TopicPartition, offset: int) -> None:
        self._offsets.setdefault(tp, {})[offset] = False

    def finish(self, tp: TopicPartition, offset: int) -> None:
        offsets = self._offsets.get(tp)
        if offsets is not None and offset in offsets:
            offsets[offset] = True

    def committable(self) -> dict[TopicPartition, int]:
        """Next offsets to commit (consuming the finished prefix of each partition)."""
        commits = {}
        for tp, offsets in self._offsets.items():
            last = None
            for offset, finished in list(offsets.items()):
                if not finished:
                    break
                del offsets[offset]
                last = offset
            if last is not None:
                commits[tp] = last + 1
        return commits

    def drop(self, tps) -> None:
        for tp in tps:
            self._offsets.pop(tp, None)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, sender: "Sender", consumer: AIOKafkaConsumer):
        self.sender, self.consumer = sender, consumer

    async def on_partitions_revoked(self, revoked) -> None:
        await self.sender.commit_work(self.consumer)
        self.sender.tracker.drop(revoked)  # claims in hand finish; their offsets are the new owner's
        self.sender.disown(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        self.sender.own(assigned, self.consumer.partitions_for_topic(topics.SENDER_WORK))


class Sender:
    def __init__(self, settings: Settings, journal: Journal, producer, adapters: Mapping[str, ProviderAdapter],
                 claim_timeout_s: float = CLAIM_TIMEOUT_S, *, fence: HandoffFence,
                 feed: ChannelSettingsFeed | None = None,
                 adapter_factory: AdapterFactory = adapter_for, environment: Settings | None = None):
        self.settings = settings
        self.journal = journal
        self.producer = producer
        self._templates: dict[tuple[str, str], dict] = {}  # (campaign, digest) -> template, the last few used
        self.consumer_name = f"{settings.group_id('sender')}{'-' + settings.instance_name if settings.instance_name else ''}"
        self.book = ClaimBook(timeout_s=claim_timeout_s)
        self.tracker = OffsetTracker()
        self.adapters = dict(adapters)  # the dispatcher's too: a channel's entry is replaced on a settings change
        self.results = results_batcher(journal, self.publish)
        self.dispatcher = Dispatcher(settings, journal, self.adapters, self.results, fence=fence)
        # Channel settings set over the API: followed on `feed`, applied over `environment` (the settings the
        # process started with); None: the adapters given stay.
        self.feed = feed
        self.environment = environment or settings
        self.adapter_factory = adapter_factory
        self.retiring: dict[int, ProviderAdapter] = {}  # replaced adapters finishing their claims
        self._retirements: set[asyncio.Task] = set()
        self._background: dict[int, tuple[asyncio.Event, asyncio.Task]] = {}
        self.jobs: set[asyncio.Task] = set()
        self._wake = asyncio.Event()  # the claim loop has something to do
        self.owned: set[int] = set()  # the sender-work partitions assigned: their campaigns are ours to claim
        self._work_partitions = 0  # how many the topic has (the relay's partitioner: murmur2 of the key)
        self._partition_of: dict[str, int] = {}
        self._running = False
        self.configs: dict[str, ChannelConfig] = dict(feed.current) if feed is not None else {}
        for campaign in journal.active_campaigns():  # resume after a restart
            self.book.activate(campaign.campaign_id, campaign.channel, campaign.run_no, campaign.segments)
            log.info("resuming claims for campaign %s (run %d)", campaign.campaign_id, campaign.run_no)
        for campaign_id, _ in journal.holds_seen():  # still held: no claims until CampaignSendingResumed
            self.book.hold(campaign_id)

    # ------------------------------------------------------------------ ownership

    def owns(self, campaign_id: str) -> bool:
        if not self._work_partitions:
            return False
        partition = self._partition_of.get(campaign_id)
        if partition is None:  # as aiokafka's (and Java's) default partitioner places the relay's work
            partition = (murmur2(campaign_id.encode()) & 0x7FFFFFFF) % self._work_partitions
            self._partition_of[campaign_id] = partition
        return partition in self.owned

    def own(self, assigned, partitions: set[int] | None) -> None:
        if partitions and len(partitions) != self._work_partitions:
            self._work_partitions = len(partitions)
            self._partition_of.clear()
        self.owned = {tp.partition for tp in assigned if tp.topic == topics.SENDER_WORK}
        log.info("sender-work partitions owned: %s", sorted(self.owned))
        self._wake.set()

    def disown(self, revoked) -> None:
        self.owned -= {tp.partition for tp in revoked if tp.topic == topics.SENDER_WORK}
        self.book.disown(self.owns)

    # ------------------------------------------------------------------ campaign events

    def on_campaign_event(self, value: Any) -> None:
        if not isinstance(value, dict) or not ids.is_wire_uuid(value.get("campaign_id")):
            return
        kind, campaign_id = value.get("type"), value["campaign_id"]
        if kind == "CampaignCreated" and value.get("channel") in ("sms", "email"):
            self.journal.learn_channel(campaign_id, value["channel"])
            self.book.learn_channel(campaign_id, value["channel"])
            self._learn_template(campaign_id, value.get("template"))
        elif kind == "TemplateUpdated":
            self._learn_template(campaign_id, value.get("template"))
        elif kind in ACTIVATING_EVENTS and isinstance(value.get("run_no"), int):
            active = self.journal.activate(campaign_id, value["run_no"])
            if active is not None:  # a run not seen before (a redelivered event changes nothing)
                self.book.activate(active.campaign_id, active.channel, active.run_no, active.segments)
                log.info("claiming for campaign %s (run %d)", campaign_id, active.run_no)
                self._wake.set()
        elif kind == "CampaignSendingHeld":
            self.book.hold(campaign_id)  # whichever sender's breaker opened: every sender pauses its claims
            if isinstance(value.get("provider"), str):
                self.journal.saw_hold(campaign_id, value["provider"])  # a restart must still know it
                if self._running:
                    self.dispatcher.follow_hold(campaign_id, value["provider"])  # and probes: any may lift it
        elif kind == "CampaignSendingResumed":
            self.journal.saw_resume(campaign_id)
            if not self.book.resume(campaign_id) and (active := self.journal.reactivate(campaign_id)) is not None:
                self.book.activate(active.campaign_id, active.channel, active.run_no, active.segments)
            log.info("sending resumes for campaign %s: claiming again", campaign_id)
            self._wake.set()
        elif kind in ENDING_EVENTS or kind == "CampaignStatusChanged" and value.get("status") in FINAL_STATUSES:
            if campaign_id in self.book.campaigns:
                log.info("campaign %s: %s; claiming ended", campaign_id,
                         value.get("status") if kind == "CampaignStatusChanged" else kind)
            self.journal.end(campaign_id)
            self.book.remove(campaign_id)
            if kind == "CampaignDeleted":
                self.journal.forget_template(campaign_id)

    def _learn_template(self, campaign_id: str, template: Any) -> None:
        """The template, which work records name by digest; for SMS its segments (placeholders as written),
        the claim size until work shows better."""
        if isinstance(template, dict):
            self.journal.learn_template(campaign_id, template_digest(template), template)
        if isinstance(template, dict) and isinstance(template.get("body"), str):
            segments = float(sms_cost(template, None))
            self.journal.learn_segments(campaign_id, segments)
            self.book.learn_segments(campaign_id, segments)

    async def read_all_campaign_events(self, consumer: AIOKafkaConsumer) -> None:
        """Assign every partition of the campaign events, from the journal's positions (else the start)."""
        await consumer.topics()  # metadata of every topic (ensure_topics made them)
        partitions = sorted(consumer.partitions_for_topic(topics.CAMPAIGN_EVENTS) or ())
        tps = [TopicPartition(topics.CAMPAIGN_EVENTS, p) for p in partitions]
        consumer.assign(tps)
        positions = self.journal.event_positions()
        for tp in tps:
            if tp.partition in positions:
                consumer.seek(tp, positions[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)

    async def events_loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for fetched in batches.values():
                for record in fetched:
                    if (error := undecodable_error(record)) is not None:
                        await kafka.park(self.producer, record, error, consumer=self.consumer_name)
                        continue
                    with logs.context(campaign_id=logs.key_id(record.key)):
                        try:
                            self.on_campaign_event(jsoncodec.loads(record.value or b"null"))
                        except jsoncodec.JSONDecodeError:
                            log.warning("campaign event %s[%d]@%d is not JSON; skipped",
                                        record.topic, record.partition, record.offset)
            # After their effects (handling is idempotent: a crash in between reads a few again).
            self.journal.save_event_positions({tp.partition: fetched[-1].offset + 1
                                               for tp, fetched in batches.items() if fetched})

    # ------------------------------------------------------------------ claims

    async def claim_loop(self, stop: asyncio.Event) -> None:
        last_prune = 0.0
        while not stop.is_set():
            self._wake.clear()  # before the work: a wake-up during it makes the wait below return at once
            due = self.book.due(time.monotonic(), self.owns)
            if due:
                try:
                    await self._request_claims(due)
                except Exception:  # the claims stay in the book and are re-issued after their timeout
                    log.exception("claim requests not published")
            if time.monotonic() - last_prune > PRUNE_EVERY_S:
                last_prune = time.monotonic()
                self.journal.prune(KEEP_HANDOFFS_S)
            try:
                await asyncio.wait_for(self._wake.wait(), 0.5)  # also the pace of claim timeouts
            except TimeoutError:
                pass

    async def _request_claims(self, due) -> None:
        await self._send(topics.CLAIM_REQUESTS, [
            (campaign.campaign_id, ClaimRequest(
                claim_id=claim_id, campaign_id=campaign.campaign_id,
                max_messages=claim_size(self.settings, campaign.channel, campaign.segments),
                requested_at=utc_now()))
            for campaign, claim_id in due])

    # ------------------------------------------------------------------ work

    async def work_loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if len(self.jobs) >= MAX_JOBS:  # back-pressure: leave the rest in the broker for now
                await asyncio.wait(self.jobs, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            else:
                batches = await consumer.getmany(timeout_ms=100, max_records=MAX_JOBS - len(self.jobs))
                for tp, fetched in batches.items():
                    for record in fetched:
                        self.tracker.begin(tp, record.offset)
                        if (error := undecodable_error(record)) is not None:
                            await kafka.park(self.producer, record, error, consumer=self.consumer_name)
                            self.tracker.finish(tp, record.offset)
                            continue
                        self._start_job(tp, record)
            await self.commit_work(consumer)

    def _start_job(self, tp: TopicPartition, record) -> None:
        try:
            claimed = records.decode(WORK_RECORD, record.value)
        except records.InvalidRecord as exc:
            log.error("sender-work %s[%d]@%d is neither a WorkClaimed nor a TestMessageWork; skipped: %s",
                      tp.topic, tp.partition, record.offset, exc)
            self.tracker.finish(tp, record.offset)
            return
        value = claimed.model_dump(mode="json")  # the dispatcher and the adapters work on its plain form
        if isinstance(claimed, TestMessageWork):  # no claim of the campaign's: the claim book is not told
            self._track(asyncio.create_task(self._test_job(tp, record.offset, value)))
            return
        campaign_id, claim_id = value["campaign_id"], value["claim_id"]
        if self.journal.channel(campaign_id) != value["channel"]:
            self.journal.learn_channel(campaign_id, value["channel"])
            self.book.learn_channel(campaign_id, value["channel"])
        self.book.answered(campaign_id, claim_id, value["run_no"], empty=not value["items"])
        self._wake.set()

        def submitted() -> None:
            self.book.submitted(campaign_id, claim_id)
            self._wake.set()

        self._track(asyncio.create_task(self._job(tp, record.offset, value, submitted)))

    def _track(self, task: asyncio.Task) -> None:
        """A job in hand: counted, waited for at a stop."""
        self.jobs.add(task)
        CLAIMS_IN_FLIGHT.set(len(self.jobs))

        def finished(done: asyncio.Task) -> None:
            self.jobs.discard(done)
            CLAIMS_IN_FLIGHT.set(len(self.jobs))

        task.add_done_callback(finished)

    async def _test_job(self, tp: TopicPartition, offset: int, work: dict) -> None:
        """A test message: sent once (the dispatcher), its outcome published, then its offset committable. A
        failure (the journal, a bug) is tried again; the fence keeps a second try from sending it twice."""
        logs.bind(campaign_id=work["campaign_id"], message_id=work["message_id"])
        try:
            work["template"] = await asyncio.wait_for(self._template(work["campaign_id"], work["template_digest"]),
                                                      TEST_TEMPLATE_WAIT_S)
        except TimeoutError:  # e.g. the campaign was deleted meanwhile (its templates are forgotten): not sent
            log.warning("test message %s: its template was not read within %.0f s; not sent", work["message_id"],
                        TEST_TEMPLATE_WAIT_S)
            await self.dispatcher.report_test(work, "not_sent")
            self.tracker.finish(tp, offset)
            return
        async for attempt in retrying(on=Exception, timeout_s=None, first_wait_s=JOB_FIRST_WAIT_S,
                                      longest_wait_s=JOB_LONGEST_WAIT_S):
            with attempt:
                try:
                    await self.dispatcher.send_test(work)
                except Exception:
                    log.exception("test message %s failed; trying it again", work["message_id"])
                    raise
        self.tracker.finish(tp, offset)

    async def _job(self, tp: TopicPartition, offset: int, work: dict, submitted) -> None:
        logs.bind(campaign_id=work["campaign_id"])  # this task's lines, the adapters' too (a task of its own)
        work["template"] = await self._template(work["campaign_id"], work["template_digest"])
        if work["channel"] == "sms" and work["items"]:  # the rendered messages: the best estimate
            self.book.learn_segments(work["campaign_id"], mean_segments(work["template"], work["items"]))
        # Journal trouble or a bug: keep the offset uncommitted and try again (a stop cancels the job).
        async for attempt in retrying(on=Exception, timeout_s=None, first_wait_s=JOB_FIRST_WAIT_S,
                                      longest_wait_s=JOB_LONGEST_WAIT_S):
            with attempt:
                try:
                    await self.dispatcher.process(work, on_submitted=submitted)
                except Exception:
                    log.exception("claim %s failed; trying it again", work["claim_id"])
                    raise
        self.tracker.finish(tp, offset)

    async def _template(self, campaign_id: str, digest: str) -> dict:
        """The template a work record names. Its campaign event was published before the work record, but on
        another topic: if this sender has not read it yet, the work waits for it (a stop cancels the wait)."""
        key = (campaign_id, digest)
        started = time.monotonic()
        warned = False
        while (template := self._templates.get(key)) is None:
            template = self.journal.template(campaign_id, digest)
            if template is not None:
                self._templates[key] = template
                while len(self._templates) > TEMPLATES_CACHED:
                    self._templates.pop(next(iter(self._templates)))
                break
            if not warned and time.monotonic() - started > TEMPLATE_LATE_S:
                warned = True
                log.warning("campaign %s: work waits for its template %s, not read from the campaign events yet",
                            campaign_id, digest[:12])
            await asyncio.sleep(TEMPLATE_POLL_S)
        return template

    async def commit_work(self, consumer: AIOKafkaConsumer) -> None:
        commits = self.tracker.committable()
        if commits:
            try:
                await consumer.commit(commits)
            except Exception as exc:  # a rebalance under way: the records come again, the journal dedupes
                log.warning("sender-work commit failed: %r", exc)

    # ------------------------------------------------------------------ results

    async def publish(self, keyed: list[tuple[str, BaseModel]]) -> None:
        """The results batcher's records (SenderResults, SendingHold), keyed by campaign."""
        await self._send(topics.SENDER_RESULTS, keyed)

    async def _send(self, topic: str, keyed: list[tuple[str, BaseModel]]) -> None:
        """Send typed records; return once the broker acknowledged all of them."""
        sends = [await self.producer.send(topic, value=records.encode(record), key=key.encode())
                 for key, record in keyed]
        await asyncio.gather(*sends)

    async def publish_later(self, records: list[tuple[str, list[dict]]]) -> None:
        """Results an adapter reports on its own (SMTP re-submissions, late receipts): through the batcher,
        returning once they are published."""
        await asyncio.gather(*(self.results.add(campaign_id, results) for campaign_id, results in records))

    # ------------------------------------------------------------------ lifecycle

    def _start_background(self, adapter: ProviderAdapter, channel: str) -> None:
        """The adapter's `run_retries(stop, publish)`, if it has one, once per adapter object (an adapter
        serving both channels runs once), until `_stop_background(adapter)`."""
        run_retries = getattr(adapter, "run_retries", None)
        if run_retries is None or id(adapter) in self._background:
            return
        stop = asyncio.Event()

        async def background() -> None:
            try:
                await run_retries(stop, self.publish_later)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s adapter's background work failed", channel)

        self._background[id(adapter)] = (stop, asyncio.create_task(background()))

    async def _stop_background(self, adapters: list[ProviderAdapter] | None = None) -> None:
        keys = list(self._background) if adapters is None else [id(a) for a in adapters]
        stopping = [self._background.pop(key) for key in keys if key in self._background]
        for stop, _ in stopping:
            stop.set()
        tasks = [task for _, task in stopping]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ channel settings

    async def apply_channel_settings(self, config: ChannelConfig) -> None:
        """A channel's settings changed (the API published them): new claims of the channel go to a new
        adapter (a fresh circuit breaker with it); the old one finishes its claims in flight and is closed."""
        channel = config.channel
        self.configs[channel] = config
        settings = channel_settings.apply(self.environment, self.configs)
        adapter = self.adapter_factory(settings, channel)
        self.settings = settings
        old = self.dispatcher.replace_adapter(channel, adapter, settings)
        if self._running:
            self._start_background(adapter, channel)
        log.info("%s now sends through %s (settings %s)", channel, adapter, config.settings_id)
        # An adapter the other channel still sends through (one in-process simulator for both) stays.
        if old is not adapter and id(old) not in self.retiring and not any(a is old for a in self.adapters.values()):
            self._retire_soon(old)

    def _retire_soon(self, adapter: ProviderAdapter) -> None:
        self.retiring[id(adapter)] = adapter
        task = asyncio.create_task(self._retire(adapter))
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

    async def _retire(self, adapter: ProviderAdapter) -> None:
        try:
            await self.dispatcher.idle(adapter)
            await self._stop_background([adapter])
            await self.dispatcher.retire(adapter)
            await _close_adapters({"retired": adapter})
            log.info("replaced adapter %s closed", adapter)
        finally:
            self.retiring.pop(id(adapter), None)

    async def _follow_settings(self, stop: asyncio.Event) -> None:
        try:
            await self.feed.follow(stop, self.apply_channel_settings)
        except asyncio.CancelledError:
            raise
        except Exception:  # the sender goes on with the settings in hand
            log.exception("following %s stopped", topics.CHANNEL_SETTINGS)

    async def close_adapters(self) -> None:
        """Shutdown: the adapters in use and those still retiring, each closed once."""
        for task in list(self._retirements):
            task.cancel()
        await asyncio.gather(*self._retirements, return_exceptions=True)
        adapters = {**{f"retiring-{key}": a for key, a in self.retiring.items()}, **self.adapters}
        self.retiring.clear()
        await _close_adapters(adapters)

    async def run(self, stop: asyncio.Event, events: AIOKafkaConsumer, work: AIOKafkaConsumer) -> None:
        results_stop = asyncio.Event()  # set last: results flush until every claim in hand is done
        flusher = asyncio.create_task(self.results.run(results_stop))
        if resumed := self.dispatcher.resume_holds_of_earlier_run():
            log.info("told %d campaigns held by an earlier run that sending resumes", resumed)
        self._running = True
        for campaign_id, provider in self.journal.holds_seen():  # held before a restart: probe again
            self.dispatcher.follow_hold(campaign_id, provider)
        for channel, adapter in self.adapters.items():  # adapters' background work: stopped once claims are done
            self._start_background(adapter, channel)
        loops = [asyncio.create_task(self.events_loop(events, stop)),
                 asyncio.create_task(self.work_loop(work, stop)),
                 asyncio.create_task(self.claim_loop(stop))]
        follower = asyncio.create_task(self._follow_settings(stop)) if self.feed is not None else None
        try:
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*loops, stopper], return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            for task in done:
                if task is not stopper and task.exception():
                    log.error("sender loop failed", exc_info=task.exception())
            await asyncio.gather(*loops, return_exceptions=True)
            if self.jobs:
                log.info("stopping: finishing %d claims in hand", len(self.jobs))
                _, late = await asyncio.wait(set(self.jobs), timeout=DRAIN_TIMEOUT_S)
                for task in late:  # their unsent messages are un-journalled; the claim comes again
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        finally:
            for task in loops:
                task.cancel()
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            self._running = False
            await self.dispatcher.close()
            await self._stop_background()
            results_stop.set()
            await asyncio.gather(flusher, return_exceptions=True)
            await self.commit_work(work)


async def serve(settings: Settings, stop: asyncio.Event, *, adapters: Mapping[str, ProviderAdapter] | None = None,
                claim_timeout_s: float = CLAIM_TIMEOUT_S, work_group: str | None = None, adapter_factory: AdapterFactory = adapter_for) -> None:
    """Run the sender until `stop` is set (groups, timeout and adapters overridable for tests).

    Without `adapters`, the channel settings set over the API apply: the channel-settings topic is read to
    its end before the adapters are built (`adapter_factory(settings, channel)`), then followed."""
    await kafka.ensure_topics(settings)
    own_adapters = adapters is None
    feed = None
    environment = settings
    if own_adapters:
        feed = ChannelSettingsFeed(settings)
        try:
            configs = await feed.load()
        except BaseException:
            await feed.close()
            raise
        settings = channel_settings.apply(environment, configs)
        if adapter_factory is adapter_for:
            adapters = adapters_for(settings)  # `inprocess` channels share one simulator, as without the API
        else:
            adapters = {channel: adapter_factory(settings, channel) for channel in ("sms", "email")}
        for config in configs.values():
            log.info("%s now sends through %s (settings %s)", config.channel, adapters[config.channel],
                     config.settings_id)
    journal = Journal.open(settings)
    fence = open_fence(settings)
    producer = kafka.make_producer(settings)
    config = kafka.consumer_config(settings)
    events = AIOKafkaConsumer(group_id=None, **config)
    work = AIOKafkaConsumer(group_id=work_group or settings.group_id(WORK_GROUP_ROLE), **config)
    sender = Sender(settings, journal, producer, adapters, claim_timeout_s, fence=fence, feed=feed,
                    adapter_factory=adapter_factory, environment=environment)
    work.subscribe([topics.SENDER_WORK], listener=_Rebalance(sender, work))
    observability = Observability(settings, "sender", {
        "broker": broker_check(settings), "event_store": event_store_check(settings),
        "partitions_assigned": assigned_check(lambda: work)})
    await observability.start()
    await producer.start()
    try:
        await asyncio.gather(events.start(), work.start())
        await sender.read_all_campaign_events(events)
        log.info("sender consuming %s and %s", topics.CAMPAIGN_EVENTS, topics.SENDER_WORK)
        await sender.run(stop, events, work)
    finally:
        await asyncio.gather(events.stop(), work.stop(), return_exceptions=True)
        await producer.stop()
        await observability.stop()
        if own_adapters:
            await sender.close_adapters()
        if feed is not None:
            await feed.close()
        journal.close()
        fence.close_connection()


async def _close_adapters(adapters: Mapping[str, ProviderAdapter]) -> None:
    """Close the adapters that hold connections (HTTP sessions, SMTP pools), each once."""
    for adapter in {id(a): a for a in adapters.values()}.values():
        close = getattr(adapter, "close", None)
        if close is None:
            continue
        try:
            closing = close()
            if asyncio.iscoroutine(closing):
                await closing
        except Exception:
            log.exception("closing the %s adapter failed", type(adapter).__name__)


def main() -> None:
    run_service(serve, "sender")


if __name__ == "__main__":
    main()
