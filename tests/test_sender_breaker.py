"""The circuit breaker per provider (contract, "Sending rules"): the state machine on a fake clock, its
probe loop, and the Dispatcher through a provider outage (no broker)."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict

import pytest

from schemas import internal, topics
from services.common.settings import Settings
from services.sender.breaker import (HELD_REASON, RESUMED_REASON, BreakerState, ProviderBreaker, classify)
from services.sender.dispatch import RESUMED_AFTER_RESTART
from services.sender.journal import Journal
from services.sender.providers import InProcessSimulator, make_result
from tests import fakes
from tests.fakes import FakeClock, dispatcher_harness, simulated_sender, wait_for

ALWAYS_503 = "+12025550105"  # the simulator answers 503 to every submission


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


# ---------------------------------------------------------------- the state machine

def test_opens_after_ten_distinct_messages_in_a_row():
    state = BreakerState()
    messages = ids(10)
    assert not any(state.failure([mid], now=1.0) for mid in messages[:9])
    assert not state.is_open
    assert state.failure([messages[9]], now=2.0) is True
    assert state.is_open and state.next_probe_at == pytest.approx(2.5)
    assert state.failure(ids(1), now=2.1) is False  # already open: opened once


def test_one_message_failing_again_and_again_never_opens():
    state = BreakerState()
    mid = str(uuid.uuid4())
    assert not any(state.failure([mid], now=float(n)) for n in range(100))
    assert not state.is_open and len(state.streak) == 1
    # ... nor do 9 distinct messages failing any number of times.
    nine = ids(9)
    for _ in range(20):
        for other in nine[1:]:
            state.failure([other], now=0)
    assert not state.is_open and len(state.streak) == 9


def test_an_answer_resets_the_streak():
    state = BreakerState()
    for mid in ids(9):
        state.failure([mid], now=0)
    state.success()
    assert not any(state.failure([mid], now=0) for mid in ids(9))
    assert state.failure(ids(1), now=0) is True


def test_a_batched_call_counts_its_distinct_messages():
    state = BreakerState()
    assert state.failure(ids(4), now=0) is False
    assert state.failure(ids(6), now=0) is True


def test_probes_back_off_doubling_to_the_cap_and_a_success_closes():
    state = BreakerState(first_probe_s=0.5, max_probe_s=10)
    state.failure(ids(10), now=100.0)
    assert not state.probe_due(100.4) and state.probe_due(100.5)
    now, waits = 100.5, []
    for _ in range(7):
        assert state.probed(False, now) is False
        waits.append(state.next_probe_at - now)
        now = state.next_probe_at
    assert waits == pytest.approx([1, 2, 4, 8, 10, 10, 10])
    assert state.is_open
    assert state.probed(True, now) is True
    assert not state.is_open and not state.probe_due(now + 100) and not state.streak
    # Opening again starts the backoff from the beginning.
    state.failure(ids(10), now=500.0)
    assert state.next_probe_at == pytest.approx(500.5)


def test_classify_submission_results():
    assert classify([make_result("m", "presend_error", 1, provider_code="503")]) == "failure"
    assert classify([make_result("m", "accepted", 1), make_result("m", "sent", 1)]) == "success"
    assert classify([make_result("m", "refused", 1, provider_code="21211")]) == "success"  # it answered
    assert classify([make_result("m", "no_answer", 1)]) is None  # says nothing either way


# ---------------------------------------------------------------- the async wrapper on a fake clock

async def test_provider_breaker_holds_probes_with_backoff_and_resumes():
    clock = FakeClock()
    answers = iter([False, False, RuntimeError("connection refused"), True])
    changes: list[tuple[bool, str]] = []

    async def probe() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    breaker = ProviderBreaker("twilio", probe, on_change=lambda held, reason: changes.append((held, reason)),
                              clock=clock, sleep=clock.sleep)
    failed = [make_result("m", "presend_error", 1, provider_code="503")]
    for mid in ids(9):
        breaker.record([mid], failed)
    assert breaker.allows() and changes == []
    breaker.record(ids(1), failed)
    assert not breaker.allows() and changes == []  # paused; held once a probe fails
    waiter = asyncio.create_task(breaker.wait_closed())
    await asyncio.wait_for(waiter, 5)  # returns once a probe succeeds
    assert breaker.allows() and changes == [(True, HELD_REASON), (False, RESUMED_REASON)]
    assert breaker.probes == 4  # failed, failed, raised (counts as failed), succeeded
    assert clock.sleeps == pytest.approx([0.5, 1, 2, 4])
    assert clock.now == pytest.approx(7.5)
    await breaker.close()


async def test_a_burst_the_first_probe_shows_is_no_outage_is_paused_but_never_held():
    """Pre-send errors of 10 messages in a row, but the provider answers its account lookup: submissions
    waited for that probe, and nobody was told of a hold (which would send every claimed message back
    through the queue)."""
    clock = FakeClock()
    changes: list[tuple[bool, str]] = []

    async def probe() -> bool:
        return True

    breaker = ProviderBreaker("twilio", probe, on_change=lambda held, reason: changes.append((held, reason)),
                              clock=clock, sleep=clock.sleep)
    for mid in ids(10):
        breaker.record([mid], [make_result(mid, "presend_error", 1, provider_code="503")])
    assert not breaker.allows()
    await asyncio.wait_for(breaker.wait_closed(), 5)
    assert breaker.allows() and breaker.probes == 1 and changes == [] and not breaker.is_held
    await breaker.close()


async def test_provider_breaker_without_failures_never_probes():
    async def probe() -> bool:
        raise AssertionError("no probe while closed")

    breaker = ProviderBreaker("sendgrid", probe)
    for _ in range(50):
        breaker.record(["one-message"], [make_result("one-message", "presend_error", 1, provider_code="503")])
    await breaker.wait_closed()  # at once
    assert breaker.allows() and breaker.probes == 0
    await breaker.close()


# ---------------------------------------------------------------- through the Dispatcher

class FlakyProvider:
    """The simulator, with an outage switch: while `down`, every call answers 503 and the account lookup
    fails. Records each call and whether the breaker let one through while open (it must not)."""

    def __init__(self, settings: Settings):
        self.sim = InProcessSimulator(settings)
        self.down = False
        self.submitted: dict[str, int] = defaultdict(int)
        self.calls_while_open = 0
        self.probes = 0
        self.breaker: ProviderBreaker | None = None

    def batch_size(self, channel: str) -> int:
        return self.sim.batch_size(channel)

    async def probe(self) -> bool:
        self.probes += 1
        return not self.down

    async def submit(self, channel, items, template):
        if self.breaker is not None and self.breaker.is_open:
            self.calls_while_open += 1
        for it in items:
            self.submitted[it["message_id"]] += 1
        if self.down:
            return [make_result(it["message_id"], "presend_error", it["attempt"] + 1, provider_code="503")
                    for it in items]
        return await self.sim.submit(channel, items, template)


@contextlib.asynccontextmanager
async def dispatcher_for(tmp_path, **settings_kw):
    settings = Settings(data_dir=tmp_path, sms_rate=1e6, email_rate=1e6, presend_backoff_s=0.05,
                        sms_provider="twilio", email_provider="sendgrid", **settings_kw)
    sms, email = FlakyProvider(settings), FlakyProvider(settings)
    async with dispatcher_harness(settings, {"sms": sms, "email": email},
                                  breaker_options={"first_probe_s": 0.05, "max_probe_s": 0.2}) as h:
        sms.breaker, email.breaker = h.dispatcher.breaker("sms"), h.dispatcher.breaker("email")
        yield h.dispatcher, sms, email, h.published.results, h.published.holds


def work(channel: str, destinations: list[str], campaign_id: str | None = None) -> dict:
    return fakes.work(channel, fakes.items(destinations), campaign_id=campaign_id)


def per_message(published) -> dict[str, list[dict]]:
    seen = defaultdict(list)
    for _, results in published:
        for r in results:
            seen[r["message_id"]].append(r)
    return seen


def holds_of(holds: list[dict], campaign_id: str) -> list[tuple[str, bool, str]]:
    return [(h["provider"], h["held"], h["reason"]) for h in holds if h["campaign_id"] == campaign_id]


async def test_an_outage_holds_sending_and_every_message_is_delivered_after_it(tmp_path):
    async with dispatcher_for(tmp_path) as (dispatcher, sms, email, published, holds):
        sms.down = True
        first = work("sms", [f"+1202555{1000 + n:04d}" for n in range(20)] + [ALWAYS_503])
        second = work("sms", [f"+1202555{2000 + n:04d}" for n in range(10)])
        tasks = [asyncio.create_task(dispatcher.process(first)), asyncio.create_task(dispatcher.process(second))]
        await wait_for(lambda: sms.breaker.is_open)
        # A claim arriving while the provider is held: its campaign is told too, and nothing is sent.
        late = work("sms", [f"+1202555{3000 + n:04d}" for n in range(5)])
        tasks.append(asyncio.create_task(dispatcher.process(late)))
        # Email goes through another provider: not held.
        mail = work("email", [f"user{n}@example.com" for n in range(30)])
        assert (await asyncio.wait_for(dispatcher.process(mail), 5)).submitted == 30

        # Longer than the pre-send retries would last without the breaker (0.05 + 0.1 + 0.2 s of backoff).
        await asyncio.sleep(1.0)
        assert sms.breaker.is_open and sms.probes >= 3
        assert not any(r.get("final") for rs in per_message(published).values() for r in rs)
        sms.down = False
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await wait_for(lambda: len(holds) == 6)

        assert sms.calls_while_open == 0
        seen = per_message(published)
        for claim in (first, second, late):
            for it in claim["items"]:
                results = seen[it["message_id"]]
                attempts = sorted({r["attempt"] for r in results})
                # Held submissions are not submissions: the attempts are the calls made, 1, 2, ... in order.
                assert attempts == list(range(1, sms.submitted[it["message_id"]] + 1))
                if it["destination"] == ALWAYS_503:
                    # Still fails after its retries (4 submissions), the outage or not.
                    assert [(r["outcome"], r["attempt"], r["final"]) for r in results] == [
                        ("presend_error", n, n == 4) for n in range(1, 5)]
                else:
                    assert [r["outcome"] for r in results][-3:] == ["accepted", "sent", "delivered"]
                    assert not any(r.get("final") for r in results)  # nobody ends provider_error
                    assert sms.submitted[it["message_id"]] <= 2  # failed once at most, then held
        for claim in (first, second, late):
            assert holds_of(holds, claim["campaign_id"]) == [("twilio", True, HELD_REASON),
                                                              ("twilio", False, RESUMED_REASON)]
        assert holds_of(holds, mail["campaign_id"]) == []
        assert all(set(h) == {"type", "hold_id", "campaign_id", "provider", "held", "reason", "occurred_at"}
                   and h["type"] == "SendingHold" for h in holds)
        assert len({h["hold_id"] for h in holds}) == 6
        model = getattr(internal, "SendingHold", None)  # the handler's side of the record
        for h in holds if model is not None else ():
            model.model_validate(h)
        assert email.probes == 0 and not email.breaker.is_open


async def test_a_hold_another_sender_decided_is_probed_here_too_and_lifted_by_whichever_probe_succeeds(tmp_path):
    """Several senders: one's probe failed and the campaign shows it is held (CampaignSendingHeld). This one
    pauses that provider's submissions and probes too; its probe succeeding lifts the hold for the campaign,
    even if the sender that decided it never comes back."""
    async with dispatcher_for(tmp_path) as (dispatcher, sms, email, published, holds):
        campaign_id = str(uuid.uuid4())
        sms.down = True
        dispatcher.follow_hold(campaign_id, "twilio")
        dispatcher.follow_hold(campaign_id, "no-such-provider")  # not this sender's provider: nothing
        assert sms.breaker.is_open and not email.breaker.is_open
        await wait_for(lambda: sms.probes >= 2)  # the provider is still down here too
        assert holds_of(holds, campaign_id) == []
        sms.down = False
        await wait_for(lambda: holds_of(holds, campaign_id) == [("twilio", False, RESUMED_REASON)])
        assert not sms.breaker.is_open and sms.calls_while_open == 0


async def test_a_sender_restarted_during_an_outage_still_tells_its_held_campaigns_that_sending_resumes(tmp_path):
    claim = work("sms", [f"+1202555{1000 + n:04d}" for n in range(12)])
    async with dispatcher_for(tmp_path) as (dispatcher, sms, _, _published, holds):
        sms.down = True
        task = asyncio.create_task(dispatcher.process(claim))
        await wait_for(lambda: holds_of(holds, claim["campaign_id"]) == [("twilio", True, HELD_REASON)])
        task.cancel()  # the process dies mid-outage: nobody says `held: false`
        await asyncio.gather(task, return_exceptions=True)
    assert Journal(tmp_path / "sender-journal.db").held_campaigns() == [("twilio", claim["campaign_id"])]

    async with dispatcher_for(tmp_path) as (dispatcher, _sms, _, _published, holds):  # the restart
        assert dispatcher.resume_holds_of_earlier_run() == 1
        await wait_for(lambda: holds_of(holds, claim["campaign_id"]) == [("twilio", False, RESUMED_AFTER_RESTART)])
        await wait_for(lambda: Journal(tmp_path / "sender-journal.db").held_campaigns() == [])
        assert dispatcher.resume_holds_of_earlier_run() == 0  # told once, not at every start


async def test_a_hold_renewed_before_its_release_was_flushed_is_still_journalled(tmp_path):
    # held: true, held: false queued, the breaker reopens (held: true again) before the flush: when the
    # `held: false` goes out, the newer hold must stay journalled for a restart to release it.
    async with dispatcher_for(tmp_path) as (dispatcher, sms, _, _published, _holds):
        campaign_id, key = str(uuid.uuid4()), id(sms)
        breaker = dispatcher.breaker("sms")
        dispatcher._hold_record(key, breaker, campaign_id, True, HELD_REASON)
        released = dispatcher._hold_announcement(campaign_id, breaker.name, False, RESUMED_REASON)
        await asyncio.wait_for(released, 5)
        dispatcher._forget_hold(released, breaker.name, campaign_id)
        assert dispatcher._journal.held_campaigns() == [(breaker.name, campaign_id)]  # still held in memory
        dispatcher._held[key].discard(campaign_id)
        dispatcher._forget_hold(released, breaker.name, campaign_id)
        assert dispatcher._journal.held_campaigns() == []


async def test_one_destination_that_always_fails_never_opens_the_breaker(tmp_path):
    async with dispatcher_for(tmp_path) as (dispatcher, sms, _, published, holds):
        alone = work("sms", [ALWAYS_503])
        await dispatcher.process(alone)
        mixed = work("sms", [ALWAYS_503] + [f"+1202555{1000 + n:04d}" for n in range(30)])
        await dispatcher.process(mixed)
        for claim in (alone, mixed):
            failing = claim["items"][0]
            assert [(r["outcome"], r["attempt"], r["final"]) for r in per_message(published)[failing["message_id"]]] \
                == [("presend_error", n, n == 4) for n in range(1, 5)]
            assert sms.submitted[failing["message_id"]] == 4
        assert sms.probes == 0 and holds == [] and not sms.breaker.is_open


async def test_held_submissions_pay_no_tokens(tmp_path):
    async with dispatcher_for(tmp_path) as (dispatcher, sms, _, __, ___):
        bucket = dispatcher._limiters["sms"]
        paid = []
        original = bucket.acquire

        async def spy(cost=1):
            paid.append(cost)
            return await original(cost)

        bucket.acquire = spy
        sms.down = True
        task = asyncio.create_task(dispatcher.process(work("sms", [f"+1202555{1000 + n:04d}" for n in range(15)])))
        await wait_for(lambda: sms.breaker.is_open)
        await asyncio.sleep(0.5)  # held a while: several probes, no payments
        held_payments = len(paid)
        assert held_payments == sum(sms.submitted.values())
        sms.down = False
        await asyncio.wait_for(task, 10)
        assert len(paid) == sum(sms.submitted.values())  # one payment per call made, none while held


# ---------------------------------------------------------------- the sender's wiring

async def test_sender_publishes_hold_records_and_runs_the_adapters_background_work(tmp_path):
    settings = Settings(data_dir=tmp_path, sim_late_receipt_s=1.1, sms_provider="inprocess", email_provider="inprocess")
    async with simulated_sender(settings) as (sender, producer):
        for channel, adapter in sender.adapters.items():
            sender._start_background(adapter, channel)
        assert len(sender._background) == 1  # one simulator serves both channels: it runs once
        cid = str(uuid.uuid4())
        hold = internal.SendingHold(hold_id=str(uuid.uuid4()), campaign_id=cid, provider="inprocess", held=True,
                                    reason=HELD_REASON, occurred_at="2026-01-01T00:00:00.000000Z")
        await asyncio.wait_for(sender.results.add_record(cid, hold), 5)
        assert (topics.SENDER_RESULTS, cid.encode(), hold.model_dump(mode="json")) in producer.sent

        # Digit 7: `sent` now, the late `delivered` through run_retries -> the batcher -> SenderResults.
        claim = work("sms", ["+12025550107"], campaign_id=cid)
        await sender.dispatcher.process(claim)
        mid = claim["items"][0]["message_id"]

        def outcomes_sent() -> list[str]:
            return [r["outcome"] for topic, _, value in producer.sent if value["type"] == "SenderResults"
                    for r in value["results"] if r["message_id"] == mid]

        assert outcomes_sent() == ["accepted", "sent"]
        await wait_for(lambda: outcomes_sent() == ["accepted", "sent", "delivered"], 5)
