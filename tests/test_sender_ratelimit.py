"""Rate limiting in the sender (no broker): the token bucket on a fake clock and on the real one, costs,
claim sizes, and the Dispatcher paced by its buckets with the in-process simulator."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid

import pytest
from aiokafka import TopicPartition

from schemas import topics
from schemas.internal import template_digest
from services.common import jsoncodec
from services.common.settings import Settings
from services.sender.claims import ClaimBook, claim_size
from services.sender.journal import Journal, journal_path
from services.sender.ratelimit import (TokenBucket, channel_limiters, item_cost, mean_segments, sms_cost,
                                       submission_cost)
from tests.fakes import EMAIL_TEMPLATE, FakeClock, RecordingAdapter, dispatcher_harness, items, simulated_sender, work

ONE_SEGMENT = {"body": "Hi {{name}}"}
TWO_SEGMENTS = {"body": "x" * 200 + " {{name}}"}  # GSM-7, 161..306 septets


def bucket(rate: float, capacity: float | None = None) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(rate, capacity, clock=clock, sleep=clock.sleep), clock


# ---------------------------------------------------------------- the bucket on a fake clock

def test_burst_is_a_quarter_second_and_refills_at_the_rate():
    b, clock = bucket(100)
    assert b.capacity == 25
    assert all(b.try_acquire(1) for _ in range(25))  # the burst: a quarter second's worth
    assert not b.try_acquire(1)
    clock.now += 0.01  # one token's worth
    assert b.try_acquire(1) and not b.try_acquire(1)
    clock.now += 3600  # idle for an hour: still at most the capacity
    assert b.tokens == pytest.approx(25)
    assert sum(b.try_acquire(1) for _ in range(100)) == 25


async def test_steady_rate_sequential_and_concurrent():
    b, clock = bucket(100)
    for _ in range(1000):
        await b.acquire(1)
    assert clock.now == pytest.approx((1000 - 25) / 100)  # 9.75 s: the burst, then exactly the rate

    b, clock = bucket(100)
    done: list[tuple[int, float]] = []

    async def one(n: int) -> None:
        await b.acquire(1)
        done.append((n, clock.now))

    await asyncio.gather(*(one(n) for n in range(1000)))
    assert clock.now == pytest.approx(9.75)
    assert [n for n, _ in done] == list(range(1000))  # served in arrival order
    # No one-second window ever holds more than a second's worth plus the burst.
    times = [t for _, t in done]
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[i:] if u < t + 1.0)
        assert in_window <= 100 + 25


async def test_a_submission_larger_than_the_burst_waits_for_a_full_bucket_then_owes():
    b, clock = bucket(100)  # capacity 25
    assert await b.acquire(100) == 0  # full bucket: goes at once (burst = the cost of one submission)
    assert b.tokens == pytest.approx(-75)
    await b.acquire(1)
    assert clock.now == pytest.approx(0.76)  # the debt repaid, then one token
    b, clock = bucket(100)
    for _ in range(10):
        await b.acquire(100)
    assert clock.now == pytest.approx(9.0)  # 1,000 tokens at 100/s, the first call from the full bucket


async def test_a_large_waiter_is_not_starved_by_small_ones():
    b, clock = bucket(10, capacity=5)
    b.try_acquire(5)  # empty
    order = []

    async def take(name: str, cost: float) -> None:
        await b.acquire(cost)
        order.append(name)

    tasks = [asyncio.create_task(take("big", 5))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(take(f"small{n}", 1)) for n in range(5)]
    await asyncio.gather(*tasks)
    assert order[0] == "big"
    assert clock.now == pytest.approx(1.0)  # 5 tokens for big, then 5 for the small ones


async def test_a_cancelled_waiter_takes_no_tokens():
    b, clock = bucket(10, capacity=1)
    b.try_acquire(1)
    waiter = asyncio.create_task(b.acquire(1))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.now += 0.1
    assert b.try_acquire(1)  # the cancelled waiter neither took the token nor blocks the fast path


def test_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(10).try_acquire(-1)


# ---------------------------------------------------------------- the bucket on the real clock

async def test_real_clock_burst_then_rate():
    # How fast on this machine (the burst's time, the total's upper side): bench/sender_timings.py.
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    b = TokenBucket(200, sleep=sleep)  # burst 50
    started = time.monotonic()
    for _ in range(50):
        await b.acquire(1)
    assert waits == []  # the burst never waits
    for _ in range(100):
        await b.acquire(1)
    total = time.monotonic() - started
    assert total >= 0.48


# ---------------------------------------------------------------- costs and claim sizes

def test_costs():
    assert sms_cost(ONE_SEGMENT, {"name": "Ada"}) == 1
    assert sms_cost(TWO_SEGMENTS, {"name": "Ada"}) == 2
    assert sms_cost({"body": "{{note}}"}, {"note": "y" * 160}) == 1
    assert sms_cost({"body": "{{note}}"}, {"note": "y" * 161}) == 2  # the rendered text counts
    assert sms_cost({"body": "Привет {{name}}"}, {"name": "x" * 64}) == 2  # UCS-2: 70 units per segment
    assert item_cost("email", EMAIL_TEMPLATE, {"variables": {"name": "x" * 10_000}}) == 1
    items = [{"variables": {"name": f"n{n}"}} for n in range(7)]
    assert submission_cost("email", EMAIL_TEMPLATE, items) == 7  # a batched call of N costs N
    assert submission_cost("sms", TWO_SEGMENTS, items[:1]) == 2
    assert mean_segments(TWO_SEGMENTS, items) == 2
    assert mean_segments({"body": "{{v}}"}, [{"variables": {"v": "a"}}, {"variables": {"v": "b" * 200}}]) == 1.5
    assert mean_segments(TWO_SEGMENTS, []) == 2


def test_claim_size_in_messages():
    assert claim_size(Settings(sms_rate=100), "sms") == 200  # segments unknown: one each
    assert claim_size(Settings(sms_rate=100), "sms", 2) == 100
    assert claim_size(Settings(sms_rate=100), "sms", 1.5) == 133
    assert claim_size(Settings(sms_rate=1), "sms", 3) == 1  # at least one submission
    assert claim_size(Settings(email_rate=200), "email", 5) == 400  # segments mean nothing for email


def test_claim_book_and_journal_keep_the_segments(tmp_path):
    book = ClaimBook()
    book.activate("c1", "sms", 1, segments=3)
    book.learn_segments("c1", 2)
    book.learn_segments("c2", 9)  # not active: ignored
    (campaign, _), _ = book.due(now=0)
    assert campaign.segments == 2 and "c2" not in book.campaigns

    settings = Settings(data_dir=tmp_path)
    journal = Journal.open(settings)
    journal.learn_channel("c1", "sms")
    journal.learn_segments("c1", 2.0)
    assert journal.activate("c1", 1).segments == 2.0
    journal.close()
    reopened = Journal.open(settings)
    assert [(a.campaign_id, a.segments) for a in reopened.active_campaigns()] == [("c1", 2.0)]
    reopened.close()


def test_journal_from_before_the_segments_column_is_migrated(tmp_path):
    settings = Settings(data_dir=tmp_path)
    path = journal_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE campaigns (campaign_id TEXT PRIMARY KEY, channel TEXT, run_no INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE active_campaigns (campaign_id TEXT PRIMARY KEY, channel TEXT, run_no INTEGER NOT NULL);
        INSERT INTO campaigns VALUES ('c1', 'sms', 1);
        INSERT INTO active_campaigns VALUES ('c1', 'sms', 1);
    """)
    db.commit()
    db.close()
    journal = Journal.open(settings)
    assert [(a.campaign_id, a.run_no, a.segments) for a in journal.active_campaigns()] == [("c1", 1, None)]
    journal.learn_segments("c1", 4.0)
    assert journal.active_campaigns()[0].segments == 4.0
    journal.close()


async def test_sender_sizes_sms_claims_by_the_template_then_by_the_rendered_messages(tmp_path):
    settings = Settings(data_dir=tmp_path, sms_rate=100, email_rate=1e6)
    async with simulated_sender(settings) as (sender, producer):
        cid = str(uuid.uuid4())
        base = {"event_id": str(uuid.uuid4()), "campaign_id": cid, "sequence": 1,
                "occurred_at": "2026-01-01T00:00:00.000000Z", "causation_id": str(uuid.uuid4())}
        sender.on_campaign_event({**base, "type": "CampaignCreated", "channel": "sms", "template": ONE_SEGMENT})
        sender.on_campaign_event({**base, "type": "TemplateUpdated", "template": TWO_SEGMENTS})
        sender.on_campaign_event({**base, "type": "CampaignRunStarted", "run_no": 1})
        await sender._request_claims(sender.book.due(time.monotonic()))
        sizes = [value["max_messages"] for value in producer.values(topics.CLAIM_REQUESTS)]
        assert sizes == [100, 100]  # 2 s x 100 segments/s / 2 segments per message

        # The contacts' values make each message 3 segments: the next claims are smaller.
        items = [{"message_id": str(uuid.uuid4()), "row": n + 1, "destination": f"+1202555{1000 + n:04d}",
                  "variables": {"name": "y" * 250}, "attempt": 0} for n in range(3)]
        claim_id = next(iter(sender.book.campaigns[cid].requested))
        work = {"type": "WorkClaimed", "event_id": str(uuid.uuid4()), "claim_id": claim_id, "campaign_id": cid,
                "channel": "sms", "run_no": 1, "template_digest": template_digest(TWO_SEGMENTS), "items": items,
                "remaining_queued": 9,
                "holds_channel": True}
        record = type("Record", (), {"value": jsoncodec.dumps(work), "offset": 0})()
        sender._start_job(TopicPartition("w", 0), record)
        await asyncio.gather(*sender.jobs)
        assert sender.book.campaigns[cid].segments == 3
        producer.sent.clear()
        await sender._request_claims(sender.book.due(time.monotonic()))
        assert [value["max_messages"] for value in producer.values(topics.CLAIM_REQUESTS)] == [66]


# ---------------------------------------------------------------- through the Dispatcher

@contextlib.asynccontextmanager
async def dispatcher_for(tmp_path, clock: FakeClock | None = None, **settings_kw):
    settings = Settings(data_dir=tmp_path, **settings_kw)
    adapter = RecordingAdapter(settings, clock or time.monotonic)
    limiters = channel_limiters(settings, clock=clock, sleep=clock.sleep) if clock else None
    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter}, limiters=limiters) as h:
        yield h.dispatcher, h.journal, adapter, h.published.results


def max_in_window(times: list[float], weights: list[int], window: float = 1.0) -> int:
    return max(sum(w for u, w in zip(times, weights) if t <= u < t + window) for t in times)


async def test_500_one_segment_sms_at_50_per_second_take_about_ten_seconds(tmp_path):
    async with dispatcher_for(tmp_path, sms_rate=50) as (dispatcher, _, adapter, published):
        sms = items([f"+1202555{1000 + n:04d}" for n in range(500)])
        claims = [work("sms", sms[i:i + 100], ONE_SEGMENT) for i in range(0, 500, 100)]  # 2 s claims
        started = time.monotonic()
        await asyncio.gather(*(dispatcher.process(c) for c in claims))
        elapsed = time.monotonic() - started
        times = [t - started for t, _ in adapter.calls]
        busiest = max_in_window(times, [n for _, n in adapter.calls])
        print(f"\n500 one-segment SMS at 50 segments/s: {elapsed:.2f} s (ideal 9.75); "
              f"busiest second {busiest} submissions; first 13 within {times[12] * 1000:.1f} ms")
        assert len(adapter.calls) == 500 and all(n == 1 for n in adapter.submitted.values())
        assert len({r["message_id"] for _, rs in published for r in rs}) == 500
        assert 9.5 <= elapsed  # the upper side is measured by bench/sender_timings.py
        assert busiest <= 50 + 12.5 + 1  # a second's worth plus the burst (and one for timer slack)


async def test_two_segment_sms_costs_two_tokens(tmp_path):
    clock = FakeClock()
    async with dispatcher_for(tmp_path, clock, sms_rate=20) as (dispatcher, _, adapter, __):
        costs = []
        bucket_ = dispatcher._limiters["sms"]
        original = bucket_.acquire

        async def spy(cost=1):
            costs.append(cost)
            return await original(cost)

        bucket_.acquire = spy
        await dispatcher.process(work("sms", items([f"+1202555{1000 + n:04d}" for n in range(20)]), TWO_SEGMENTS))
        assert costs == [2] * 20
        assert clock.now == pytest.approx((40 - 5) / 20)  # 40 segments at 20/s after a burst of 5
    clock = FakeClock()
    async with dispatcher_for(tmp_path / "one", clock, sms_rate=20) as (dispatcher, _, __, ___):
        await dispatcher.process(work("sms", items([f"+1202555{1000 + n:04d}" for n in range(20)]), ONE_SEGMENT))
        assert clock.now == pytest.approx((20 - 5) / 20)  # the same messages in one segment each


async def test_email_rate_holds_for_batched_calls(tmp_path):
    clock = FakeClock()
    async with dispatcher_for(tmp_path, clock, email_rate=100, email_batch=50) as (dispatcher, _, adapter, __):
        emails = items([f"user{n}@example.com" for n in range(300)])
        await asyncio.gather(dispatcher.process(work("email", emails[:150], EMAIL_TEMPLATE)),
                             dispatcher.process(work("email", emails[150:], EMAIL_TEMPLATE)))
        assert [n for _, n in adapter.calls] == [50] * 6  # each call costs its 50 recipients
        times = [t for t, _ in adapter.calls]
        assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])  # 50 recipients / 100 per s apart
        assert max_in_window(times, [50] * 6) <= 100 + 50  # a second's worth + one submission's burst


async def test_email_rate_on_the_real_clock(tmp_path):
    async with dispatcher_for(tmp_path, email_rate=200, email_batch=50) as (dispatcher, _, adapter, __):
        started = time.monotonic()
        await dispatcher.process(work("email", items([f"user{n}@example.com" for n in range(400)]), EMAIL_TEMPLATE))
        elapsed = time.monotonic() - started
        print(f"\n400 emails in calls of 50 at 200/s: {elapsed:.2f} s (ideal 1.75)")
        assert len(adapter.calls) == 8
        assert 1.7 <= elapsed  # the upper side is measured by bench/sender_timings.py


async def test_presend_resubmissions_pay_tokens(tmp_path):
    clock = FakeClock()
    async with dispatcher_for(tmp_path, clock, sms_rate=4, presend_backoff_s=0) as (dispatcher, _, adapter, published):
        it = items(["+12025550104"], {"name": "Ada"})  # 503, 503, then accepted
        await dispatcher.process(work("sms", it, ONE_SEGMENT))
        assert adapter.submitted[it[0]["message_id"]] == 3
        assert clock.now == pytest.approx(2 * 1 / 4)  # burst of 1 (one submission), then 1 token each at 4/s
        assert [r["outcome"] for _, rs in published for r in rs][-3:] == ["accepted", "sent", "delivered"]


async def test_messages_cancelled_while_waiting_for_tokens_are_forgotten(tmp_path):
    async with dispatcher_for(tmp_path, sms_rate=10) as (dispatcher, journal, adapter, _):
        claim = work("sms", items([f"+1202555{1000 + n:04d}" for n in range(20)]), ONE_SEGMENT)
        task = asyncio.create_task(dispatcher.process(claim))
        await asyncio.sleep(0.25)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        states = [journal.handoff(it["message_id"], claim["claim_id"]) for it in claim["items"]]
        sent = set(adapter.submitted)
        assert 2 <= len(sent) <= 6  # burst of 2.5, then 10/s for 0.25 s
        assert {it["message_id"] for it, s in zip(claim["items"], states) if s is not None} == sent


async def test_sms_waiting_for_tokens_does_not_hold_emails_slots(tmp_path):
    async with dispatcher_for(tmp_path, sms_rate=1, email_rate=1e6, email_batch=1) as (dispatcher, _, adapter, __):
        sms = asyncio.create_task(dispatcher.process(
            work("sms", items([f"+1202555{1000 + n:04d}" for n in range(200)]), ONE_SEGMENT)))
        await asyncio.sleep(0.05)  # 64 SMS hold their channel's slots, waiting for tokens
        try:
            report = await asyncio.wait_for(dispatcher.process(
                work("email", items([f"user{n}@example.com" for n in range(100)]), EMAIL_TEMPLATE)), 5)
            assert report.submitted == 100
        finally:
            sms.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sms
