"""Working a claim: journal, submit through the channel's adapter, retry pre-send errors, report results.

No Kafka here: results leave through a `ResultsBatcher` (services/common/batching.py) whose `publish`
function the app provides, so this path is tested and measured on its own.

Order of effects for each message (at least once, never sent twice):
1. the claim is journalled (one transaction per claim): a cache, so a redelivered claim re-publishes the
   results it already has;
2. the provider is called: each submission (pre-send re-submissions too) waits until its provider's
   circuit breaker is closed (breaker.py), takes a slot of its channel (bounded concurrency), then waits
   for its tokens in the channel's bucket (ratelimit.py), and only then, the breaker still closed, is
   handed to the adapter. Tokens are taken after the breaker lets the submission through, so a held
   submission pays nothing while it waits (if the breaker opens while it pays, it is held again and
   those tokens are lost, once). A submission held by the breaker is not a submission: the attempt
   number counts the calls made. Right before the call, the hand-off fence (services/common/fence.py,
   shared by every sender) grants the messages still `sending` under this claim before its deadline, and
   numbers their submission; only those are submitted, the others are dropped without a result (another
   instance has them, or a hold, a retry or the deadline took them back). A definite pre-send error gives
   the messages back to the claim; the last one closes them;
3. its results are journalled `done` and then published, batched per campaign; every submission's
   results also go to the breaker (a pre-send error counts towards opening it, an answer resets it);
4. the claim counts as finished (its offset may be committed) once all of its results are published.

When a provider's breaker opens or closes, each campaign with a claim in hand on that provider gets a
`SendingHold {held: true|false}` record (same topic and key as its results); a campaign whose claim
arrives while the breaker is open gets its `held: true` then.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas.internal import SendingHold, TestMessageResult
from schemas.times import utc_now
from services.common.batching import Publish, ResultsBatcher
from services.common.fence import HandoffFence
from services.common.observability import PROVIDER_ERRORS, PROVIDER_REQUEST_SECONDS, RATE_LIMITER_WAIT_SECONDS
from services.common.retry import backoff_s, is_transient
from services.common.settings import Settings
from services.sender.breaker import HELD_REASON, ProviderBreaker
from services.sender.journal import Journal
from services.sender.providers import ProviderAdapter, make_result, provider_name
from services.sender.ratelimit import TokenBucket, channel_limiters, item_cost

RESUMED_AFTER_RESTART = "sender_restarted"  # SendingHold.reason when a restarted sender lifts an old hold

log = logging.getLogger("outreach.sender")

MAX_IN_FLIGHT = 64  # provider calls at once per channel (its provider), over all claims
FLUSH_INTERVAL_S = 0.05  # results wait at most this long for others to share their record


# ------------------------------------------------------------------ decisions (pure)

def backoff_delay(retry_no: int, base_s: float, rand: Callable[[], float] = random.random) -> float:
    """Wait before pre-send retry `retry_no` (1, 2, ...): base doubling each time, jittered by +-25 %
    so messages failing together do not retry in lockstep."""
    return base_s * 2 ** (retry_no - 1) * (0.75 + 0.5 * rand())


def is_presend_error(results: Iterable[Mapping[str, Any]]) -> bool:
    return any(r["outcome"] == "presend_error" for r in results)


def should_retry(results: list[dict], submission: int, retries: int) -> bool:
    """A pre-send error is retried `retries` times (1 + retries submissions); nothing else ever is
    (`no_answer` may have reached the provider: a duplicate is worse than a time-out)."""
    return is_presend_error(results) and submission <= retries


# ------------------------------------------------------------------ results out

def results_batcher(journal: Journal, publish: Publish, interval_s: float = FLUSH_INTERVAL_S) -> ResultsBatcher:
    """The sender's batcher (services/common/batching.py): journals the finished hand-offs of each flush
    before publishing it, and retries a failed flush (journal writes are idempotent)."""
    return ResultsBatcher(publish, interval_s=interval_s, before_publish=journal.finish)


# ------------------------------------------------------------------ claims

@dataclass
class ClaimReport:
    submitted: int = 0  # items submitted in this claim
    replayed: int = 0  # journalled done before: stored results published again
    skipped: int = 0  # journalled handed_off before: left alone (they time out)
    refused: int = 0  # the fence refused them at their first submission: not this sender's to send
    refused_retries: int = 0  # the fence refused their pre-send retry (a hold or the deadline took them back)


# The `provider` label of the provider metrics, by adapter class.
PROVIDER_LABELS = {"TwilioAdapter": "twilio", "SendGridAdapter": "sendgrid", "SmtpAdapter": "smtp",
                   "InProcessSimulator": "inprocess"}


class Dispatcher:
    """Works claims (`process`). `breaker_options` go to each provider's `ProviderBreaker` (threshold,
    probe backoff, clock and sleep: tests compress time with them)."""

    def __init__(self, settings: Settings, journal: Journal, adapters: Mapping[str, ProviderAdapter],
                 results: ResultsBatcher, *, fence: HandoffFence, max_in_flight: int = MAX_IN_FLIGHT,
                 limiters: Mapping[str, TokenBucket] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, rand: Callable[[], float] = random.random,
                 breaker_options: Mapping[str, Any] | None = None):
        self._settings = settings
        self._retries = settings.presend_retries
        self._backoff_s = settings.presend_backoff_s
        self._journal = journal
        self._fence = fence
        self._clock = time.time  # the fence's deadlines are wall-clock times
        self._adapters = adapters
        self._results = results
        # One semaphore per channel: SMS waiting for its tokens must not hold the slots email needs.
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(max_in_flight))
        self._max_in_flight = max_in_flight
        self._limiters = limiters if limiters is not None else channel_limiters(settings)
        self._sleep = sleep
        self._rand = rand
        self._breaker_options = dict(breaker_options or {})
        # One breaker per provider, i.e. per adapter object (channels sharing an adapter share it).
        self._breakers: dict[int, ProviderBreaker] = {}
        self._claims_in_hand: dict[int, dict[str, int]] = defaultdict(dict)  # breaker -> campaign -> claims
        self._held: dict[int, set[str]] = defaultdict(set)  # breaker -> campaigns told `held: true`
        self._claims_working: set[str] = set()
        self._using: dict[int, int] = {}  # adapter -> claims working on it (a replaced one finishes them)
        self._idle = asyncio.Event()
        self._takes: list[tuple[str, list[str], asyncio.Future]] = []  # fence grants waiting for one commit
        self._taking: asyncio.Task | None = None
        for adapter in adapters.values():
            self._attach_fence(adapter)

    def _attach_fence(self, adapter: ProviderAdapter) -> None:
        """An adapter that sends on its own later (SMTP re-submissions) asks the same fence."""
        attach = getattr(adapter, "attach_fence", None)
        if attach is not None:
            attach(self._fence)

    # ------------------------------------------------------------------ circuit breakers

    def breaker(self, channel: str) -> ProviderBreaker:
        """The breaker of the provider `channel` sends through now (made on first use)."""
        return self._breaker_of(self._adapters[channel], channel)

    def _breaker_of(self, adapter: ProviderAdapter, channel: str) -> ProviderBreaker:
        key = id(adapter)
        breaker = self._breakers.get(key)
        if breaker is None:
            probe = getattr(adapter, "probe", None)
            if probe is None:
                async def probe() -> bool:  # an adapter that cannot look its account up: retry by time
                    return True
            breaker = ProviderBreaker(provider_name(self._settings, channel), probe,
                                      on_change=lambda held, reason: self._on_breaker(key, held, reason),
                                      **self._breaker_options)
            self._breakers[key] = breaker
        return breaker

    # ------------------------------------------------------------------ replacing an adapter

    def replace_adapter(self, channel: str, adapter: ProviderAdapter, settings: Settings) -> ProviderAdapter:
        """New claims of `channel` go to `adapter` (with a breaker of its own, named after `settings`);
        claims in flight finish on the old one, which is returned (`idle` says when it is done)."""
        old = self._adapters[channel]
        self._settings = settings
        self._attach_fence(adapter)
        self._adapters[channel] = adapter
        return old

    async def idle(self, adapter: ProviderAdapter) -> None:
        """Return once no claim works on `adapter` (the channels may have left it already)."""
        while self._using.get(id(adapter), 0) > 0:
            self._idle.clear()
            await self._idle.wait()

    async def retire(self, adapter: ProviderAdapter) -> None:
        """Forget a replaced adapter's breaker (stopping its probes) once nothing uses it."""
        key = id(adapter)
        breaker = self._breakers.pop(key, None)
        self._claims_in_hand.pop(key, None)
        self._held.pop(key, None)
        self._using.pop(key, None)
        if breaker is not None:
            await breaker.close()

    def _on_breaker(self, key: int, held: bool, reason: str) -> None:
        breaker = self._breakers[key]
        if held:
            waiting = [cid for cid, claims in self._claims_in_hand[key].items() if claims > 0]
        else:
            waiting = sorted(self._held.pop(key, set()))
        for campaign_id in waiting:
            self._hold_record(key, breaker, campaign_id, held, reason)

    def _hold_record(self, key: int, breaker: ProviderBreaker, campaign_id: str, held: bool, reason: str) -> None:
        if held:
            self._held[key].add(campaign_id)
            # Journalled before it is published: a sender restarted mid-outage must still say `held: false`.
            self._journal.remember_held(breaker.name, campaign_id)
        published = self._hold_announcement(campaign_id, breaker.name, held, reason)
        if not held:
            published.add_done_callback(lambda f: self._forget_hold(f, breaker.name, campaign_id))

    def _hold_announcement(self, campaign_id: str, provider: str, held: bool, reason: str) -> asyncio.Future:
        return self._results.add_record(campaign_id, SendingHold(
            hold_id=str(uuid.uuid4()), campaign_id=campaign_id, provider=provider, held=held, reason=reason,
            occurred_at=utc_now()))

    def resume_holds_of_earlier_run(self) -> int:
        """Tell every campaign a previous run of the sender left held that sending resumes (the breakers
        start closed; if the outage goes on, they open again and say `held: true` again). Returns how many."""
        held = self._journal.held_campaigns()
        for provider, campaign_id in held:
            published = self._hold_announcement(campaign_id, provider, False, RESUMED_AFTER_RESTART)
            published.add_done_callback(lambda f, p=provider, c=campaign_id: self._forget_hold(f, p, c))
        return len(held)

    def _forget_hold(self, published: asyncio.Future, provider: str, campaign_id: str) -> None:
        """Once a `held: false` is out, forget the journalled hold, unless the campaign was held again
        meanwhile (a breaker that reopened before the flush): that newer hold must survive a restart."""
        if published.cancelled() or published.exception() is not None:
            return
        held_again = any(breaker.name == provider and campaign_id in self._held[key]
                         for key, breaker in self._breakers.items())
        if not held_again:
            self._journal.forget_held(provider, campaign_id)

    def follow_hold(self, campaign_id: str, provider: str) -> None:
        """A campaign held by a sender (this one or another: `CampaignSendingHeld`): if this sender sends
        through that provider, its breaker probes too, and the first probe that succeeds anywhere tells the
        campaign `held: false` (the handler records a repeated one once)."""
        for channel, adapter in list(self._adapters.items()):
            breaker = self._breaker_of(adapter, channel)
            if breaker.name == provider:
                self._held[id(adapter)].add(campaign_id)
                breaker.held_elsewhere()

    def _claim_started(self, adapter: ProviderAdapter, channel: str, campaign_id: str) -> None:
        breaker = self._breaker_of(adapter, channel)
        key = id(adapter)
        in_hand = self._claims_in_hand[key]
        in_hand[campaign_id] = in_hand.get(campaign_id, 0) + 1
        if breaker.is_held and campaign_id not in self._held[key]:
            self._hold_record(key, breaker, campaign_id, True, HELD_REASON)

    def _claim_finished(self, adapter: ProviderAdapter, campaign_id: str) -> None:
        in_hand = self._claims_in_hand[id(adapter)]
        left = in_hand.get(campaign_id, 0) - 1
        if left > 0:
            in_hand[campaign_id] = left
        else:
            in_hand.pop(campaign_id, None)

    async def close(self) -> None:
        """Stop the breakers' probes (shutdown)."""
        await asyncio.gather(*(breaker.close() for breaker in self._breakers.values()))

    # ------------------------------------------------------------------ claims

    async def process(self, work: Mapping[str, Any], on_submitted: Callable[[], None] = lambda: None) -> ClaimReport:
        """Work one WorkClaimed record to the end: returns once every result of it is published.

        `on_submitted` is called once every item had its first submission (the claim loop's slot is free).
        """
        claim_id = work["claim_id"]
        report = ClaimReport()
        if claim_id in self._claims_working:
            # The same claim delivered again while this process still works it: nothing more to do here.
            on_submitted()
            return report
        self._claims_working.add(claim_id)
        try:
            return await self._process(work, on_submitted, report)
        finally:
            self._claims_working.discard(claim_id)

    async def _process(self, work: Mapping[str, Any], on_submitted: Callable[[], None],
                       report: ClaimReport) -> ClaimReport:
        campaign_id, claim_id, channel = work["campaign_id"], work["claim_id"], work["channel"]
        items = work.get("items") or []
        known = self._journal.begin(claim_id, campaign_id, (item["message_id"] for item in items))
        futures = []
        replay = [r for entry in known.values() if entry.state == "done" for r in entry.results or ()]
        report.replayed = sum(1 for entry in known.values() if entry.state == "done")
        report.skipped = len(known) - report.replayed
        if report.skipped:
            log.warning("claim %s: %d messages were handed off before without a known outcome; not resent",
                        claim_id, report.skipped)
        if replay:
            futures.append(self._results.add(campaign_id, replay))
        fresh = [item for item in items if item["message_id"] not in known]
        report.submitted = len(fresh)
        if not fresh:
            on_submitted()
            await asyncio.gather(*futures)
            return report

        adapter = self._adapters[channel]
        size = max(1, adapter.batch_size(channel))
        calls = [fresh[i:i + size] for i in range(0, len(fresh), size)]
        started: set[str] = set()  # message ids whose provider call began: never forgotten
        first_pass_left = len(calls)

        def first_submission_done() -> None:
            nonlocal first_pass_left
            first_pass_left -= 1
            if first_pass_left == 0:
                on_submitted()

        self._using[id(adapter)] = self._using.get(id(adapter), 0) + 1
        self._claim_started(adapter, channel, campaign_id)
        # The calls are taken in order by at most max_in_flight workers (no more can hold a slot): a task per
        # call would keep up to 1,000 tasks per claim alive, and a sender whose results wait on a slow broker
        # holds many claims (their tasks were most of its memory growing with the campaign).
        remaining = iter(calls)

        async def worker() -> list[asyncio.Future]:
            reports: list[asyncio.Future] = []
            for call in remaining:  # shared: each call is taken by one worker
                reports.extend(await self._send_call(adapter, work, call, started, first_submission_done, report))
            return reports

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(len(calls), self._max_in_flight))]
        try:
            for call_futures in await asyncio.gather(*tasks):
                futures.extend(call_futures)
            tasks.clear()
            await asyncio.gather(*futures)
        except BaseException:
            for task in tasks:
                task.cancel()
            # Journalled but never submitted (a stop before their turn): a redelivery may send them.
            self._journal.forget(claim_id, (item["message_id"] for item in fresh
                                            if item["message_id"] not in started))
            raise
        finally:
            if report.refused or report.refused_retries:  # once per claim (a claim has up to 1,000 calls)
                log.info("claim %s: the fence refused %d first submission(s) and %d pre-send retr(ies); not "
                         "submitted (another sender has them, or a hold or deadline took them back)",
                         claim_id, report.refused, report.refused_retries)
            self._claim_finished(adapter, campaign_id)
            self._using[id(adapter)] = self._using.get(id(adapter), 1) - 1
            if self._using[id(adapter)] <= 0:
                self._using.pop(id(adapter), None)
                self._idle.set()
        return report

    async def _send_call(self, adapter: ProviderAdapter, work: Mapping[str, Any], items: list[dict],
                         started: set[str], first_submission_done: Callable[[], None],
                         report: ClaimReport) -> list[asyncio.Future]:
        """One provider call for `items`, and its pre-send retries; returns the futures of its reports."""
        campaign_id, claim_id, channel = work["campaign_id"], work["claim_id"], work["channel"]
        history: dict[str, list[dict]] = {item["message_id"]: [] for item in items}
        costs = {item["message_id"]: item_cost(channel, work["template"], item) for item in items}
        bucket = self._limiters[channel]
        breaker = self._breaker_of(adapter, channel)  # the adapter's: a replacement has a breaker of its own
        futures = []
        pending = items
        submission = 0
        while pending:
            submission += 1
            cost = sum(costs[item["message_id"]] for item in pending)
            while True:
                await breaker.wait_closed()  # held: no slot, no tokens
                async with self._slots[channel]:
                    # Slot first, then tokens: the submission goes the moment it has paid (no paid-up queue
                    # that would burst past the bucket when slots free up). Cancelled while waiting here,
                    # nothing was sent: the messages stay forgettable.
                    if not breaker.allows():
                        continue
                    RATE_LIMITER_WAIT_SECONDS.labels(channel).observe(await bucket.acquire(cost) or 0.0)
                    if not breaker.allows():
                        continue  # opened while this one paid: held again
                    # The fence grants the hand-off, durably, right before the call; nothing is awaited
                    # between the grant and the submission (see _take).
                    granted = await self._fenced(self._take, claim_id, [item["message_id"] for item in pending])
                    if granted and not breaker.allows():  # opened while the grant was made: held again
                        await self._fenced(self._fence.give_back, claim_id, list(granted), uncount=True)
                        continue
                    refused = [item for item in pending if item["message_id"] not in granted]
                    if refused:
                        self._drop_refused(claim_id, refused, first=submission == 1, report=report)
                        pending = [item for item in pending if item["message_id"] in granted]
                    if not pending:
                        results = []
                        break
                    # `attempt` of an item = submissions before this one (the fence's count); the adapter
                    # reports attempt + 1. A wait for the breaker is not a submission: only a call made is.
                    batch = [{**item, "campaign_id": campaign_id, "claim_id": claim_id,
                              "attempt": granted[item["message_id"]] - 1} for item in pending]
                    started.update(item["message_id"] for item in pending)
                    results = await self._submit(adapter, channel, batch, work["template"])
                    break
            if not pending:
                if submission == 1:
                    first_submission_done()
                break
            breaker.record([item["message_id"] for item in pending], results)
            if submission == 1:
                first_submission_done()
            per_message: dict[str, list[dict]] = defaultdict(list)
            for result in results:
                per_message[result["message_id"]].append(result)
            retry, publish, done, given_up = [], [], [], []
            for item, submitted in zip(pending, batch):
                mid = item["message_id"]
                outcome = per_message.get(mid) or [make_result(mid, "no_answer", submitted["attempt"] + 1)]
                if should_retry(outcome, submission, self._retries):
                    retry.append(item)
                else:
                    if is_presend_error(outcome):
                        outcome[-1]["final"] = True  # the last one reported: failed / provider_error
                        given_up.append(mid)
                    done.append((mid, claim_id, history[mid] + outcome))
                history[mid].extend(outcome)
                publish.extend(outcome)
            # Nothing reached the provider: back to the claim (a crash during the back-off leaves them to
            # whoever works the claim next), or closed for good after the last try.
            await self._fenced(self._fence.give_back, claim_id, [item["message_id"] for item in retry])
            await self._fenced(self._fence.close, claim_id, given_up)
            futures.append(self._results.add(campaign_id, publish, done))
            pending = retry
            if pending:
                await self._sleep(backoff_delay(submission, self._backoff_s, self._rand))
        return futures

    # ------------------------------------------------------------------ test messages

    async def send_test(self, work: Mapping[str, Any]) -> str:
        """One test message (a TestMessageWork, SendTestMessage's): the provider path of a claim's messages (the
        channel's adapter, one of its slots, its tokens, the breaker, the fence under the command's id), once and
        never retried. Its outcome goes to the handler as a TestMessageResult, not as a message result: no
        status record. Returns once that is published; returns the outcome reported.

        Not sent, and said so: the breaker is open (`held`: not waited for, someone is waiting for the answer);
        the fence refuses it (`no_answer` if it was handed off before: a redelivery, a second sender, a restart
        after a crash mid-call; `not_sent` if never: its Sending limit passed). A pre-send error, a deferral, a
        hold or a refusal closes its fence row: nothing sends it later (no pre-send retry, no SMTP re-submission,
        no redelivery)."""
        campaign_id, command_id, channel = work["campaign_id"], work["command_id"], work["channel"]
        message_id = work["message_id"]
        item = {"message_id": message_id, "destination": work["destination"], "variables": work.get("variables") or {},
                "campaign_id": campaign_id, "claim_id": command_id}
        adapter = self._adapters[channel]
        breaker = self._breaker_of(adapter, channel)
        self._using[id(adapter)] = self._using.get(id(adapter), 0) + 1
        results: list[dict] | None = None
        try:
            async with self._slots[channel]:
                if breaker.allows():
                    wait_s = await self._limiters[channel].acquire(item_cost(channel, work["template"], item))
                    RATE_LIMITER_WAIT_SECONDS.labels(channel).observe(wait_s or 0.0)
                if not breaker.allows():
                    outcome = "held"
                else:
                    granted = await self._fenced(self._take, command_id, [message_id])
                    if message_id in granted:  # no await between the grant and the submission
                        results = await self._submit(adapter, channel, [{**item, "attempt": granted[message_id] - 1}],
                                                     work["template"])
                        outcome = "submitted"
                    else:
                        row = await self._fenced(self._fence.row, message_id)
                        outcome = "no_answer" if row is not None and row["submissions"] > 0 else "not_sent"
        finally:
            self._using[id(adapter)] = self._using.get(id(adapter), 1) - 1
            if self._using[id(adapter)] <= 0:
                self._using.pop(id(adapter), None)
                self._idle.set()
        answer: dict[str, Any] = {}
        if results is not None:
            breaker.record([message_id], results)
            answer = next((r for r in results if r["message_id"] == message_id), None) or make_result(
                message_id, "no_answer", 1)
            outcome = answer["outcome"]
        await self.report_test(work, outcome, answer)
        return outcome

    async def report_test(self, work: Mapping[str, Any], outcome: str, answer: Mapping[str, Any] | None = None) -> None:
        """Publish a test message's TestMessageResult (returns once it is out). Its fence row is closed first unless
        the provider took it or may have (`accepted`, `no_answer`): nothing sends it later."""
        campaign_id, command_id, message_id = work["campaign_id"], work["command_id"], work["message_id"]
        answer = answer or {}
        if outcome not in ("accepted", "no_answer"):
            await self._fenced(self._fence.close, command_id, [message_id])
        published = self._results.add_record(campaign_id, TestMessageResult(
            result_id=str(uuid.uuid4()), campaign_id=campaign_id, command_id=command_id, message_id=message_id,
            outcome=outcome, provider_code=answer.get("provider_code"),
            provider_message_id=answer.get("provider_message_id"), occurred_at=answer.get("occurred_at") or utc_now()))
        log.info("test message %s of campaign %s: %s", message_id, campaign_id, outcome)
        await published

    async def _take(self, claim_id: str, message_ids: list[str]) -> dict[str, int]:
        """The fence's grant for one provider call. On a local fence (SQLite) at once, on the event loop: no
        await between paying the tokens and submitting. On a server (PostgreSQL) together with the other
        calls waiting for theirs, in a worker thread (one statement and one commit for all: a round trip and
        a commit per call would cap the throughput). Either way the submission follows the grant with no
        await in between."""
        if self._fence.is_local:
            return self._fence.take(claim_id, message_ids, self._clock())
        future: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        self._takes.append((claim_id, message_ids, future))
        if self._taking is None or self._taking.done():
            self._taking = asyncio.ensure_future(self._take_waiting())
        return await future

    async def _take_waiting(self) -> None:
        while self._takes:
            batch, self._takes = self._takes, []
            try:
                granted = await asyncio.to_thread(self._fence.take_many, [(c, m) for c, m, _ in batch], self._clock())
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for claim_id, message_ids, future in batch:
                mine = {m: granted[m] for m in message_ids if m in granted}
                if not future.done():
                    future.set_result(mine)
                elif mine:  # its call was cancelled (a stop) while the grant was made: never submitted
                    await asyncio.to_thread(self._fence.give_back, claim_id, list(mine), uncount=True)

    async def _fenced(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A fence call, its store's transient faults waited out (back-off, no limit): failing the claim
        instead would cancel its calls in flight, and a give-back lost would leave a message that never
        reached the provider to time out."""
        failures = 0
        while True:
            try:
                result = call(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                wait_s = backoff_s(failures, first_wait_s=0.1, longest_wait_s=5.0)
                log.warning("hand-off fence unavailable (%r); trying again in %.1f s", exc, wait_s)
                await self._sleep(wait_s)

    def _drop_refused(self, claim_id: str, refused: list[dict], *, first: bool, report: ClaimReport) -> None:
        """Messages the fence did not grant: another sender has them, or they left `sending` under this claim
        (a hold, a retry, the deadline). No result: what happened to them is reported by whoever decided it."""
        mids = [item["message_id"] for item in refused]
        if first:
            report.refused += len(mids)
        else:
            report.refused_retries += len(mids)
        self._journal.forget(claim_id, mids)

    @staticmethod
    async def _submit(adapter: ProviderAdapter, channel: str, batch: list[dict], template: Any) -> list[dict]:
        provider = PROVIDER_LABELS.get(type(adapter).__name__, type(adapter).__name__.lower())
        started = time.perf_counter()
        try:
            results = await adapter.submit(channel, batch, template)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Unknown whether the request reached the provider: treat as handed off with no answer
            # (never retried; the message times out). Adapters classify the errors they know themselves.
            log.exception("provider call for %d %s messages failed", len(batch), channel)
            results = [make_result(item["message_id"], "no_answer", item["attempt"] + 1) for item in batch]
        PROVIDER_REQUEST_SECONDS.labels(provider).observe(time.perf_counter() - started)
        for result in results:  # per message: refusals and pre-send errors by the provider's code
            if result.get("outcome") in ("presend_error", "refused", "no_answer"):
                PROVIDER_ERRORS.labels(provider, str(result.get("provider_code") or result["outcome"])).inc()
        return results
