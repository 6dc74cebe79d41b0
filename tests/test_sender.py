"""The sender without a broker: simulator outcomes, journal, pre-send retries, claim bookkeeping, speed."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid

import pytest
from aiokafka import TopicPartition
from pydantic import ValidationError

from schemas import topics
from schemas.internal import SenderResult, SenderResults
from services.common import jsoncodec, records
from services.common.fence import ClaimedMessage, open_fence
from services.common.settings import Settings
from services.sender.app import OffsetTracker
from services.sender.claims import ClaimBook, claim_size
from services.sender.dispatch import backoff_delay, results_batcher
from services.sender.journal import Journal
from services.sender.providers import InProcessSimulator, _real_adapter, adapters_for
from tests.fakes import (EMAIL_TEMPLATE, SMS_TEMPLATE, Published, RecordingAdapter, dispatcher_harness, wait_for,
                         simulated_sender, work)


def item(destination: str, attempt: int = 0, row: int = 1) -> dict:
    return {"message_id": str(uuid.uuid4()), "row": row, "destination": destination,
            "variables": {"name": "Ada"}, "attempt": attempt}


def outcomes(results: list[dict]) -> list[tuple]:
    return [(r["outcome"], r["provider_code"]) for r in results]


# ---------------------------------------------------------------- simulator

ACCEPTED_SENT = [("accepted", None), ("sent", None)]
DELIVERED_SMS = ACCEPTED_SENT + [("delivered", None)]
P503 = [("presend_error", "503")]
DELIVERED_EMAIL = [("accepted", None), ("delivered", None)]


@pytest.mark.parametrize("destination, expected", [
    ("+15005550001", [("refused", "21211")]),
    ("+15005550002", [("refused", "21612")]),
    ("+15005550003", [("refused", "21408")]),
    ("+15005550004", [("refused", "21610")]),
    ("+15005550009", [("refused", "21614")]),
    ("+12025550100", DELIVERED_SMS),
    ("+14155550101", ACCEPTED_SENT),
    ("+12025550102", ACCEPTED_SENT + [("undelivered", "30003")]),
    ("+12025550103", ACCEPTED_SENT + [("failed", "30007")]),
    ("+12025550104", P503),  # first submission; see the sequence test below
    ("+12025550105", P503),
    ("+12025550106", [("no_answer", None)]),
    ("+12025550107", ACCEPTED_SENT),
    ("+15005550006", DELIVERED_SMS),  # Twilio's valid test number: any other number
    ("+447700900123", DELIVERED_SMS),
    ("+12025550118", DELIVERED_SMS),  # not the fictional 555-010d range
])
async def test_simulator_sms(destination, expected):
    sim = InProcessSimulator(Settings())
    it = item(destination)
    results = await sim.submit("sms", [it], SMS_TEMPLATE)
    assert outcomes(results) == expected
    for r in results:
        SenderResult.model_validate(r)  # the SenderResults result shape
        assert r["message_id"] == it["message_id"] and r["attempt"] == 1
    accepted = expected[0][0] == "accepted"
    assert all((r["provider_message_id"] or "").startswith("SM") == accepted for r in results)


@pytest.mark.parametrize("destination, expected", [
    ("success@simulator.amazonses.com", DELIVERED_EMAIL),
    ("success+label@simulator.amazonses.com", DELIVERED_EMAIL),
    ("ooto@simulator.amazonses.com", DELIVERED_EMAIL),
    ("bounce@simulator.amazonses.com", [("accepted", None), ("bounced", "550")]),
    ("suppressionlist@simulator.amazonses.com", [("accepted", None), ("bounced", "550")]),
    ("complaint@simulator.amazonses.com", DELIVERED_EMAIL + [("spamreport", None)]),  # within the second
    ("ann+fail503x2@example.com", P503),  # first submission; see the sequence test below
    ("ann+fail503@example.com", P503),
    ("ann+noanswer@example.com", [("no_answer", None)]),
    ("ann+defer@example.com", [("accepted", None), ("deferred", None)]),  # delivered 2 deferral intervals later
    ("ann+deferforever@example.com", [("accepted", None), ("deferred", None)]),  # repeated deferrals: not reported
    ("ann@example.com", DELIVERED_EMAIL),
])
async def test_simulator_email(destination, expected):
    results = await InProcessSimulator(Settings()).submit("email", [item(destination)], EMAIL_TEMPLATE)
    assert outcomes(results) == expected
    for r in results:
        SenderResult.model_validate(r)


async def test_simulator_counts_submissions_per_message():
    sim = InProcessSimulator(Settings())
    sms, email = item("+12025550104"), item("bob+fail503x2@example.com")
    seen_sms, seen_email = [], []
    for n in range(3):
        seen_sms.append(outcomes(await sim.submit("sms", [{**sms, "attempt": n}], SMS_TEMPLATE)))
        seen_email.append(outcomes(await sim.submit("email", [{**email, "attempt": n}], EMAIL_TEMPLATE)))
    assert seen_sms == [P503, P503, DELIVERED_SMS]
    assert seen_email == [P503, P503, DELIVERED_EMAIL]
    # Another message to the same destination counts on its own.
    assert outcomes(await sim.submit("sms", [item("+12025550104")], SMS_TEMPLATE)) == P503


async def test_simulator_reports_later_receipts_through_run_retries():
    """Receipts due after the contract's second come later (SMS digit 7, a `+defer` email's delivery);
    a deferral repeated changes nothing and is not reported; with compressed time all come at once."""
    sim = InProcessSimulator(Settings(sim_late_receipt_s=1.2, sim_defer_interval_s=0.6))
    stop = asyncio.Event()
    later: list[tuple[str, list[dict]]] = []

    async def publish(records):
        later.extend(records)

    runner = asyncio.create_task(sim.run_retries(stop, publish))
    await asyncio.sleep(0)
    try:
        cid = str(uuid.uuid4())
        sms, email = {**item("+12025550107"), "campaign_id": cid}, {**item("ann+defer@example.com"), "campaign_id": cid}
        now_sms = await sim.submit("sms", [sms], SMS_TEMPLATE)
        now_email = await sim.submit("email", [email], EMAIL_TEMPLATE)
        assert outcomes(now_sms) == ACCEPTED_SENT
        assert outcomes(now_email) == [("accepted", None), ("deferred", None)]
        assert sim.pending_receipts == 2
        await asyncio.sleep(1.6)
        assert sorted((c, r["message_id"], r["outcome"], r["attempt"]) for c, rs in later for r in rs) == sorted([
            (cid, sms["message_id"], "delivered", 1), (cid, email["message_id"], "delivered", 1)])
        assert {r["provider_message_id"] for _, rs in later for r in rs} == {
            now_sms[0]["provider_message_id"], now_email[0]["provider_message_id"]}
        await sim.submit("sms", [{**sms, "message_id": str(uuid.uuid4())}], SMS_TEMPLATE)
        assert sim.pending_receipts == 1
    finally:
        stop.set()
        await runner
    assert sim.pending_receipts == 0  # cancelled with the sender
    assert await sim.probe() is True

    fast = InProcessSimulator(Settings(sim_defer_interval_s=0.1))
    assert outcomes(await fast.submit("email", [item("bo+defer@example.com")], EMAIL_TEMPLATE)) == [
        ("accepted", None), ("deferred", None), ("delivered", None)]


async def test_simulator_email_submission_outcome_applies_to_the_whole_call():
    sim = InProcessSimulator(Settings())
    call = [item("ann@example.com"), item("bob+fail503@example.com"), item("success@simulator.amazonses.com")]
    results = await sim.submit("email", call, EMAIL_TEMPLATE)
    assert [r["message_id"] for r in results] == [i["message_id"] for i in call]
    assert all(outcomes([r]) == P503 for r in results)


async def test_adapters_for_follows_the_provider_settings(tmp_path):
    from services.sender.sendgrid import SendGridAdapter
    from services.sender.smtp import SmtpAdapter
    from services.sender.twilio import TwilioAdapter

    inprocess = adapters_for(Settings(data_dir=tmp_path, sms_provider="inprocess", email_provider="inprocess"))
    assert isinstance(inprocess["sms"], InProcessSimulator) and inprocess["sms"] is inprocess["email"]
    default = adapters_for(Settings(data_dir=tmp_path))  # the real protocols, against the HTTP simulator
    assert isinstance(default["sms"], TwilioAdapter) and isinstance(default["email"], SendGridAdapter)
    await default["sms"].close()
    await default["email"].close()

    real = adapters_for(Settings(data_dir=tmp_path, sms_provider="twilio", email_provider="sendgrid"))
    smtp = adapters_for(Settings(data_dir=tmp_path / "smtp", sms_provider="inprocess", email_provider="smtp"))
    try:
        assert isinstance(real["sms"], TwilioAdapter) and isinstance(real["email"], SendGridAdapter)
        assert isinstance(smtp["sms"], InProcessSimulator) and isinstance(smtp["email"], SmtpAdapter)
    finally:
        for adapter in (real["sms"], real["email"], smtp["email"]):
            await adapter.close()
    with pytest.raises(RuntimeError, match="not available"):
        _real_adapter("no_such_module", "NoAdapter", Settings())


# ---------------------------------------------------------------- dispatcher harness

@contextlib.asynccontextmanager
async def harness(tmp_path, **settings_kw):
    settings = Settings(data_dir=tmp_path, **settings_kw)
    adapter = RecordingAdapter(settings)
    sleeps: list[float] = []

    async def sleep(seconds):
        sleeps.append(seconds)
        await asyncio.sleep(seconds)

    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter}, sleep=sleep) as h:
        yield h.dispatcher, h.journal, adapter, h.published.results, sleeps


def all_results(published, campaign_id=None) -> list[dict]:
    return [r for cid, results in published if campaign_id in (None, cid) for r in results]


# ---------------------------------------------------------------- journal

async def test_redelivered_claim_submits_nothing_twice_and_republishes_stored_results(tmp_path):
    async with harness(tmp_path) as (dispatcher, journal, adapter, published, _):
        items = [item(f"+1202555{n:04d}", row=n) for n in range(1, 21)]
        claim = work("sms", items)
        first = await dispatcher.process(claim)
        assert first.submitted == 20
        first_results = all_results(published)
        assert len(first_results) == 60  # accepted, sent, delivered each
        for it in items:
            entry = journal.handoff(it["message_id"], claim["claim_id"])
            assert entry.state == "done" and outcomes(entry.results) == DELIVERED_SMS

        published.clear()
        again = await dispatcher.process(claim)  # the same WorkClaimed, redelivered
        assert (again.submitted, again.replayed, again.skipped) == (0, 20, 0)
        assert all(n == 1 for n in adapter.submitted.values())
        assert sorted(map(str, all_results(published))) == sorted(map(str, first_results))


async def test_a_message_another_sender_handed_off_is_neither_sent_nor_reported(tmp_path):
    """Two senders work the same claim (a rebalance, a redelivery after a crash): the fence they share
    grants each message to one of them."""
    async with harness(tmp_path) as (dispatcher, journal, adapter, published, _):
        taken, fresh = item("+12025550100"), item("+12025550100", row=2)
        claim = work("sms", [taken, fresh])
        other_sender = open_fence(Settings(data_dir=tmp_path))  # its own connection to the shared fence
        try:
            # The relay opened the claim (the harness opens it again, as version 1: no change); the other
            # sender takes one message before this one works the claim.
            other_sender.open_claim(campaign_id=claim["campaign_id"], claim_id=claim["claim_id"], claim_version=1,
                                    deadline=time.time() + 60,
                                    messages=[ClaimedMessage(taken["message_id"], 0),
                                              ClaimedMessage(fresh["message_id"], 0)])
            assert other_sender.take(claim["claim_id"], [taken["message_id"]], time.time()) == {taken["message_id"]: 1}
            report = await dispatcher.process(claim)
        finally:
            other_sender.close_connection()
        assert (report.submitted, report.refused) == (2, 1)
        assert taken["message_id"] not in adapter.submitted and adapter.submitted[fresh["message_id"]] == 1
        assert {r["message_id"] for r in all_results(published)} == {fresh["message_id"]}


async def test_a_sender_killed_during_a_presend_backoff_leaves_the_message_to_the_next_one(tmp_path):
    """Contract v1.1 / issue 10: a definite pre-send error means nothing was handed off, so the fence gives the
    message back before the back-off; a sender killed then does not lose it to `timed_out`: whoever works
    the claim next sends it, and the attempts go on from the submissions made."""
    simulator = RecordingAdapter(Settings(data_dir=tmp_path))  # one provider both senders talk to
    it = item("+12025550104")  # 503 to the first two submissions, then delivered
    claim = work("sms", [it])
    slow = Settings(data_dir=tmp_path, presend_backoff_s=60)
    async with dispatcher_harness(slow, {"sms": simulator, "email": simulator}) as first:
        working = asyncio.create_task(first.dispatcher.process(claim))
        await wait_for(lambda: simulator.submitted.get(it["message_id"]) == 1)
        await wait_for(lambda: first.fence.row(it["message_id"])["state"] == "open")  # given back
        working.cancel()  # killed during its 60 s back-off
        with pytest.raises(asyncio.CancelledError):
            await working
    quick = Settings(data_dir=tmp_path, presend_backoff_s=0.01)
    async with dispatcher_harness(quick, {"sms": simulator, "email": simulator}) as second:
        await second.dispatcher.process(claim)  # the claim, redelivered to another sender
        results = all_results(second.published.results)
    assert simulator.submitted[it["message_id"]] == 3
    assert [(r["outcome"], r["attempt"]) for r in results] == [
        ("presend_error", 2), ("accepted", 3), ("sent", 3), ("delivered", 3)]


async def test_a_fence_store_outage_is_waited_out_inside_the_claim(tmp_path):
    """The fence's store goes away for a moment (a PostgreSQL restart): the claim waits at the fence, its
    other calls go on, and nothing is lost or sent twice."""
    import psycopg

    async with harness(tmp_path, presend_backoff_s=0.01) as (dispatcher, journal, adapter, published, sleeps):
        fence = dispatcher._fence
        real_take, real_give_back = fence.take_many, fence.give_back
        failures = {"take": 2, "give_back": 1}

        def flaky(name, real):
            def call(*args, **kwargs):
                if failures[name] > 0:
                    failures[name] -= 1
                    raise psycopg.OperationalError("the connection was lost")
                return real(*args, **kwargs)
            return call

        fence.take_many, fence.give_back = flaky("take", real_take), flaky("give_back", real_give_back)
        items = [item("+12025550100"), item("+12025550104", row=2)]  # the second: 503 twice, then delivered
        await dispatcher.process(work("sms", items))
    assert failures == {"take": 0, "give_back": 0}
    assert adapter.submitted == {items[0]["message_id"]: 1, items[1]["message_id"]: 3}
    assert [r["outcome"] for r in all_results(published) if r["message_id"] == items[1]["message_id"]] == [
        "presend_error", "presend_error", "accepted", "sent", "delivered"]


async def test_calls_take_their_grants_together_from_a_postgresql_fence(tmp_path, postgres_dsn):
    """On PostgreSQL the concurrent calls' grants are taken together (one statement, one commit), in a worker
    thread: every message still goes once, with its submission number."""
    from tests.conftest import fresh_postgres_database

    settings = Settings(data_dir=tmp_path, event_store="postgres", postgres_dsn=fresh_postgres_database(),
                        presend_backoff_s=0.01, sms_rate=1e6)
    adapter = RecordingAdapter(settings)
    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter}) as h:
        assert not h.fence.is_local
        batches: list[int] = []
        real = h.fence.take_many

        def counting(requests, now):
            batches.append(len(requests))
            return real(requests, now)

        h.fence.take_many = counting
        items = [item(f"+1202555{n:04d}", row=n) for n in range(1, 101)] + [item("+12025550104", row=101)]
        report = await h.dispatcher.process(work("sms", items))
        results = all_results(h.published.results)
    assert report.submitted == 101 and sum(adapter.submitted.values()) == 103  # +12025550104: 503 twice
    assert all(n == 1 for m, n in adapter.submitted.items() if m != items[-1]["message_id"])
    assert [r["attempt"] for r in results if r["message_id"] == items[-1]["message_id"]] == [1, 2, 3, 3, 3]
    assert len(batches) < 101 and max(batches) > 1  # gathered


async def test_claimed_but_never_submitted_message_is_sent_after_a_crash(tmp_path):
    # A crash after the claim was journalled but before this message's turn: it never left the process.
    async with harness(tmp_path) as (dispatcher, journal, adapter, published, _):
        waiting = item("+12025550100")
        claim = work("sms", [waiting])
        journal.begin(claim["claim_id"], claim["campaign_id"], [waiting["message_id"]])
        report = await dispatcher.process(claim)
        assert (report.submitted, report.skipped) == (1, 0)
        assert adapter.submitted[waiting["message_id"]] == 1
        assert journal.handoff(waiting["message_id"], claim["claim_id"]).state == "done"


async def test_same_message_in_a_new_claim_is_sent_again(tmp_path):
    # A retry run claims the message again: a new claim_id is a new hand-off.
    async with harness(tmp_path) as (dispatcher, journal, adapter, published, _):
        it = item("+12025550100")
        await dispatcher.process(work("sms", [it]))
        await dispatcher.process(work("sms", [{**it, "attempt": 1}]))
        assert adapter.submitted[it["message_id"]] == 2
        assert [r["attempt"] for r in all_results(published) if r["outcome"] == "accepted"] == [1, 2]


async def test_the_fence_grants_the_hand_off_before_the_provider_call(tmp_path):
    async with harness(tmp_path) as (dispatcher, journal, adapter, published, _):
        it = item("+12025550100", attempt=2)
        claim = work("sms", [it])
        fence = open_fence(Settings(data_dir=tmp_path))
        seen = []
        original = adapter.submit

        async def spying_submit(channel, items, template):
            seen.append(fence.row(it["message_id"]))
            return await original(channel, items, template)

        adapter.submit = spying_submit
        try:
            await dispatcher.process(claim)
        finally:
            fence.close_connection()
        assert (seen[0]["state"], seen[0]["claim_id"], seen[0]["submissions"]) == ("handed_off", claim["claim_id"], 3)


async def test_stopped_claim_forgets_messages_never_submitted(tmp_path):
    # Rates far above the test's pace: the 64 slots bound the calls here, not the token bucket
    # (a message cancelled while waiting for its tokens is forgotten too: test_sender_ratelimit.py).
    async with harness(tmp_path, sms_rate=1e6) as (dispatcher, journal, adapter, published, _):
        release = asyncio.Event()
        original = adapter.submit

        async def slow_submit(channel, items, template):
            await release.wait()
            return await original(channel, items, template)

        adapter.submit = slow_submit
        items = [item("+12025550100", row=n) for n in range(1, 101)]  # more than the 64 slots
        claim = work("sms", items)
        task = asyncio.create_task(dispatcher.process(claim))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        states = [journal.handoff(it["message_id"], claim["claim_id"]) for it in items]
        assert sum(s is not None for s in states) == 64  # the calls that began stay journalled
        assert sum(s is None for s in states) == 36  # the others may be sent when the claim comes again
        fence = open_fence(Settings(data_dir=tmp_path))
        try:
            fenced = collections.Counter(fence.row(it["message_id"])["state"] for it in items)
        finally:
            fence.close_connection()
        assert fenced == {"handed_off": 64, "open": 36}  # the fence agrees: only the 36 may be handed off


def test_journal_campaigns(tmp_path):
    settings = Settings(data_dir=tmp_path)
    journal = Journal.open(settings)
    cid = str(uuid.uuid4())
    journal.learn_channel(cid, "email")
    active = journal.activate(cid, 1)
    assert active.channel == "email" and active.run_no == 1
    assert journal.activate(cid, 1) is None  # a redelivered CampaignRunStarted
    journal.end(cid)
    assert journal.activate(cid, 1) is None and journal.reactivate(cid) is None  # ... even after it ended
    assert journal.activate(cid, 2).run_no == 2  # a retry
    journal.close()
    reopened = Journal.open(settings)  # a restart resumes the active campaigns
    assert [(a.campaign_id, a.channel, a.run_no) for a in reopened.active_campaigns()] == [(cid, "email", 2)]
    reopened.close()


# ---------------------------------------------------------------- pre-send retries

async def test_presend_retry_sequence_ends_final(tmp_path):
    async with harness(tmp_path, presend_backoff_s=0.01, presend_retries=3) as (dispatcher, _, __, published, sleeps):
        it = item("+12025550105")
        await dispatcher.process(work("sms", [it]))
        results = all_results(published)
        assert [(r["outcome"], r["attempt"], r["provider_code"], r["final"]) for r in results] == [
            ("presend_error", 1, "503", False), ("presend_error", 2, "503", False),
            ("presend_error", 3, "503", False), ("presend_error", 4, "503", True)]
        assert len(sleeps) == 3
        for n, slept in enumerate(sleeps, start=1):  # doubling, jittered by +-25 %
            assert 0.01 * 2 ** (n - 1) * 0.75 <= slept <= 0.01 * 2 ** (n - 1) * 1.25


async def test_presend_retry_then_accepted_counts_from_known_attempts(tmp_path):
    async with harness(tmp_path, presend_backoff_s=0.01) as (dispatcher, _, __, published, ___):
        sms, email = item("+12025550104", attempt=2), item("cy+fail503x2@example.com")
        await dispatcher.process(work("sms", [sms]))
        await dispatcher.process(work("email", [email]))
        assert [(r["outcome"], r["attempt"]) for r in all_results(published) if r["message_id"] == sms["message_id"]] \
            == [("presend_error", 3), ("presend_error", 4), ("accepted", 5), ("sent", 5), ("delivered", 5)]
        assert [(r["outcome"], r["attempt"]) for r in all_results(published) if r["message_id"] == email["message_id"]] \
            == [("presend_error", 1), ("presend_error", 2), ("accepted", 3), ("delivered", 3)]


async def test_no_answer_and_refusals_are_never_retried(tmp_path):
    async with harness(tmp_path, presend_backoff_s=0.01) as (dispatcher, _, adapter, published, sleeps):
        items = [item("+12025550106"), item("+15005550001"), item("dee+noanswer@example.com")]
        await dispatcher.process(work("sms", items[:2]))
        await dispatcher.process(work("email", items[2:]))
        assert all(adapter.submitted[it["message_id"]] == 1 for it in items) and not sleeps


async def test_presend_retries_zero_means_one_submission(tmp_path):
    async with harness(tmp_path, presend_retries=0) as (dispatcher, _, __, published, ___):
        await dispatcher.process(work("sms", [item("+12025550105")]))
        assert [(r["attempt"], r["final"]) for r in all_results(published)] == [(1, True)]


async def test_failing_adapter_call_is_no_answer(tmp_path):
    async with harness(tmp_path) as (dispatcher, journal, adapter, published, _):
        async def broken(channel, items, template):
            raise RuntimeError("connection reset after the request was written")

        adapter.submit = broken
        it = item("+12025550100")
        await dispatcher.process(work("sms", [it]))
        assert outcomes(all_results(published)) == [("no_answer", None)]


def test_backoff_delay():
    assert backoff_delay(1, 1.0, lambda: 0.5) == 1.0
    assert backoff_delay(3, 1.0, lambda: 0.0) == 4 * 0.75
    assert backoff_delay(2, 0.5, lambda: 1.0) == 1.0 * 1.25


# ---------------------------------------------------------------- claim bookkeeping

def test_claim_size():
    assert claim_size(Settings(sms_rate=100), "sms") == 200
    assert claim_size(Settings(email_rate=1000), "email") == 1000  # capped
    assert claim_size(Settings(sms_rate=0.2), "sms") == 1  # at least one submission
    assert claim_size(Settings(sms_rate=3, email_rate=50), None) == 6  # unknown channel: the slower one


def test_claim_book_keeps_two_outstanding_and_reissues_after_timeout():
    book = ClaimBook(max_outstanding=2, timeout_s=10)
    book.activate("c1", "sms", 1)
    first = [claim for _, claim in book.due(now=0)]
    assert len(first) == 2 and book.due(now=1) == []
    book.answered("c1", first[0], run_no=1, empty=False)
    assert book.due(now=2) == []  # answered but not yet submitted: still holds its slot
    book.submitted("c1", first[0])
    assert len(book.due(now=3)) == 1
    # first[1] was never answered: after the timeout another claim replaces it
    again = book.due(now=10.5)
    assert len(again) == 1 and again[0][1] not in first


def test_claim_book_empty_answer_drains_to_one_poll_now_and_then():
    """Messages can come back to the queue with no campaign event (the Sending limit re-queues a claimed
    message nobody handed off): a drained campaign is asked once every drain_poll_s until it is final."""
    book = ClaimBook(drain_poll_s=2.0)
    book.activate("c1", "email", 1)
    a, b = (claim for _, claim in book.due(now=0))
    book.answered("c1", a, run_no=1, empty=False)  # answers come in the order the handler made them
    book.answered("c1", b, run_no=1, empty=True)
    assert book.due(now=1) == []  # draining, and a is still in hand
    book.submitted("c1", a)
    [(_, poll)] = book.due(now=1.5)  # nothing outstanding: one claim asks again
    assert book.due(now=2) == []
    book.answered("c1", poll, run_no=1, empty=True)
    assert book.due(now=3) == [] and len(book.due(now=3.5)) == 1  # 2 s after the last poll
    [poll] = list(book.campaigns["c1"].requested)
    book.answered("c1", poll, run_no=1, empty=False)  # it found re-queued messages: full pace again
    book.submitted("c1", poll)
    assert len(book.due(now=4)) == 2


def test_claim_book_stale_empty_answer_and_retry_restart_claiming():
    book = ClaimBook()
    book.activate("c1", "sms", 1)
    a, b = (claim for _, claim in book.due(now=0))
    book.activate("c1", "sms", 2)  # RetryStarted seen before the answers of run 1
    book.answered("c1", a, run_no=1, empty=True)
    assert not book.campaigns["c1"].draining  # stale: claimed before the retry
    book.answered("c1", b, run_no=2, empty=True)
    assert book.campaigns["c1"].draining
    book.activate("c1", "sms", 3)
    assert not book.campaigns["c1"].draining and len(book.due(now=1)) == 2


def test_claim_book_pauses_a_held_campaign_and_resumes_it_even_drained():
    book = ClaimBook()
    book.activate("c1", "sms", 1)
    a, b = (claim for _, claim in book.due(now=0))
    book.hold("c1")  # CampaignSendingHeld, whichever sender's breaker opened
    book.answered("c1", a, run_no=1, empty=False)
    book.submitted("c1", a)
    assert book.due(now=1) == []  # a slot is free, but no claims while held
    book.answered("c1", b, run_no=1, empty=True)  # the queue was empty before the hold returned messages
    assert book.resume("c1") and len(book.due(now=2)) == 2  # claims again: the hold re-queued what it returned
    assert book.resume("gone") is False


async def test_a_resumed_campaign_is_claimed_again_unless_it_ended(tmp_path):
    async with simulated_sender(Settings(data_dir=tmp_path)) as (sender, producer):
        cid, ended = str(uuid.uuid4()), str(uuid.uuid4())
        for campaign_id in (cid, ended):
            sender.on_campaign_event({"type": "CampaignCreated", "campaign_id": campaign_id, "channel": "sms",
                                      "template": SMS_TEMPLATE})
            sender.on_campaign_event({"type": "CampaignRunStarted", "campaign_id": campaign_id, "run_no": 1})
        sender.book.remove(cid)  # (a restart that lost the book's state)
        sender.on_campaign_event({"type": "CampaignStatusChanged", "campaign_id": ended, "status": "complete"})
        assert [a.campaign_id for a in sender.journal.active_campaigns()] == [cid]
        for campaign_id in (cid, ended):
            sender.on_campaign_event({"type": "CampaignSendingHeld", "campaign_id": campaign_id, "provider": "inprocess"})
            sender.on_campaign_event({"type": "CampaignSendingResumed", "campaign_id": campaign_id,
                                      "provider": "inprocess"})
        assert [a.campaign_id for a in sender.journal.active_campaigns()] == [cid]  # the ended one stays ended
        await sender._request_claims(sender.book.due(0.0))
        assert [request["campaign_id"] for request in producer.values(topics.CLAIM_REQUESTS)] == [cid, cid]


async def test_a_hold_seen_before_a_restart_still_pauses_claims_after_it(tmp_path):
    """The CampaignSendingHeld read before a restart does not come again: the journal keeps it."""
    cid = str(uuid.uuid4())
    async with simulated_sender(Settings(data_dir=tmp_path)) as (sender, _):
        sender.on_campaign_event({"type": "CampaignRunStarted", "campaign_id": cid, "run_no": 1})
        sender.on_campaign_event({"type": "CampaignSendingHeld", "campaign_id": cid, "provider": "twilio"})
    async with simulated_sender(Settings(data_dir=tmp_path)) as (restarted, _):
        assert restarted.book.campaigns[cid].held and restarted.book.due(0.0) == []
        restarted.on_campaign_event({"type": "CampaignSendingResumed", "campaign_id": cid, "provider": "twilio"})
        assert len(restarted.book.due(0.0)) == 2 and restarted.journal.holds_seen() == []


def test_claim_book_claims_only_for_owned_campaigns_and_disowns_on_a_revoke():
    book = ClaimBook()
    book.activate("mine", "sms", 1)
    book.activate("theirs", "sms", 1)
    owned = {"mine"}
    issued = book.due(now=0, owns=owned.__contains__)
    assert {campaign.campaign_id for campaign, _ in issued} == {"mine"}
    [a, _] = [claim for _, claim in issued]
    book.answered("mine", a, run_no=1, empty=False)  # one answered and in hand, one requested
    owned.clear()  # a rebalance took its partition: the answers go to the new owner
    book.disown(owned.__contains__)
    assert book.campaigns["mine"].outstanding == 0 and book.due(now=1, owns=owned.__contains__) == []
    owned.add("mine")  # ... and gave it back
    assert len(book.due(now=2, owns=owned.__contains__)) == 2


async def test_a_sender_claims_for_the_campaigns_of_its_work_partitions_only(tmp_path):
    """The relay keys WorkClaimed by campaign id with Kafka's default partitioner: the sender owning that
    partition gets the answers, so it is the one that claims."""
    from aiokafka.partitioner import DefaultPartitioner

    async with simulated_sender(Settings(data_dir=tmp_path)) as (sender, producer):
        campaigns = [str(uuid.uuid4()) for _ in range(16)]
        for cid in campaigns:
            sender.on_campaign_event({"type": "CampaignCreated", "campaign_id": cid, "channel": "email",
                                      "template": EMAIL_TEMPLATE})
            sender.on_campaign_event({"type": "CampaignRunStarted", "campaign_id": cid, "run_no": 1})
        assert sender.book.due(0.0, sender.owns) == []  # no partition assigned yet: nobody's campaigns
        work = [TopicPartition(topics.SENDER_WORK, p) for p in range(8)]
        sender.own(work[:3], set(range(8)))
        partition = {cid: DefaultPartitioner()(cid.encode(), list(range(8)), list(range(8))) for cid in campaigns}
        mine = {cid for cid in campaigns if partition[cid] < 3}
        assert mine and {c.campaign_id for c, _ in sender.book.due(0.0, sender.owns)} == mine
        sender.disown(work[:3])
        assert not any(sender.owns(cid) for cid in campaigns)
        sender.own(work, set(range(8)))
        assert all(sender.owns(cid) for cid in campaigns)


async def test_a_stopped_campaign_is_no_longer_claimed_for(tmp_path):
    async with simulated_sender(Settings(data_dir=tmp_path)) as (sender, _):
        cid = str(uuid.uuid4())
        sender.on_campaign_event({"type": "CampaignRunStarted", "campaign_id": cid, "run_no": 1})
        sender.on_campaign_event({"type": "CampaignStopped", "campaign_id": cid})
        assert cid not in sender.book.campaigns and sender.journal.active_campaigns() == []
        sender.on_campaign_event({"type": "CampaignRunStarted", "campaign_id": cid, "run_no": 2})  # run again
        assert [a.run_no for a in sender.journal.active_campaigns()] == [2]


def test_consumer_groups_are_named_by_the_deployment():
    assert Settings().group_id("sender-work") == "outreach-sender-work"
    assert Settings(deployment="blue").group_id("sender-work") == "blue-sender-work"
    for bad in ("", "Blue", "-x", "a b", "x" * 49):
        with pytest.raises(ValidationError):
            Settings(deployment=bad)


def test_journal_keeps_the_campaign_event_positions_per_instance(tmp_path):
    first, second = Settings(data_dir=tmp_path), Settings(data_dir=tmp_path, instance_name="1")
    assert Journal.open(first).event_positions() == {}
    journal = Journal.open(first)
    journal.save_event_positions({0: 12, 3: 4})
    journal.save_event_positions({3: 9})
    journal.close()
    assert Journal.open(first).event_positions() == {0: 12, 3: 9}
    assert Journal.open(second).event_positions() == {}  # its own file: sender-journal-1.db
    assert sorted(p.name for p in tmp_path.glob("sender-journal*.db")) == ["sender-journal-1.db",
                                                                          "sender-journal.db"]
    with pytest.raises(ValidationError):
        Settings(instance_name="../elsewhere")


def test_offset_tracker_commits_the_finished_prefix():
    tp = TopicPartition("t", 0)
    tracker = OffsetTracker()
    for offset in (5, 6, 7):
        tracker.begin(tp, offset)
    tracker.finish(tp, 6)
    assert tracker.committable() == {}
    tracker.finish(tp, 5)
    assert tracker.committable() == {tp: 7}
    tracker.finish(tp, 7)
    assert tracker.committable() == {tp: 8} and tracker.committable() == {}


# ---------------------------------------------------------------- many claims at once

async def test_many_concurrent_claims_report_every_message_once(tmp_path):
    """Thirty claims worked at once (speed is the benchmark's business: bench/run_bench.py)."""
    async with harness(tmp_path, sms_rate=1e6, email_rate=1e6) as (dispatcher, _, __, published, ___):
        claims = [work("sms", [item(f"+1202555{1000 + n:04d}", row=n + 1) for n in range(200)]) for _ in range(25)]
        claims += [work("email", [item(f"user{n}@example.com", row=n + 1) for n in range(1000)]) for _ in range(5)]
        total = sum(len(c["items"]) for c in claims)
        await asyncio.gather(*(dispatcher.process(c) for c in claims))
        accepted = [r["message_id"] for r in all_results(published) if r["outcome"] == "accepted"]
        assert len(accepted) == len(set(accepted)) == total


# ---------------------------------------------------------------- typed records only

async def test_the_sender_sends_only_records_built_as_their_models(tmp_path):
    # The fake producer decodes every record it is handed with its topic's model.
    async with simulated_sender(Settings(data_dir=tmp_path)) as (sender, producer):
        hand_built = {"type": "ClaimRequest", "claim_id": str(uuid.uuid4()), "campaign_id": str(uuid.uuid4()),
                      "max_messages": 1, "requested_at": "2026-01-01T00:00:00.000000Z"}
        with pytest.raises(TypeError):
            records.encode(hand_built)
        with pytest.raises(TypeError):
            await sender._send(topics.CLAIM_REQUESTS, [(hand_built["campaign_id"], hand_built)])
        with pytest.raises(ValidationError):  # an invalid record fails where it is made
            SenderResults(result_id=str(uuid.uuid4()), campaign_id="not-an-id", results=[])
        with pytest.raises(ValidationError):
            sender.results.add(str(uuid.uuid4()), [{"message_id": str(uuid.uuid4()), "outcome": "lost"}])
        assert producer.sent == []

        cid = str(uuid.uuid4())
        sender.on_campaign_event({"type": "CampaignCreated", "campaign_id": cid, "channel": "sms",
                                  "template": SMS_TEMPLATE})
        sender.on_campaign_event({"type": "CampaignRunStarted", "campaign_id": cid, "run_no": 1})
        await sender._request_claims(sender.book.due(0.0))
        [(topic, key, request)] = producer.sent[:1]
        assert (topic, key, request["type"], request["campaign_id"]) == (
            topics.CLAIM_REQUESTS, cid.encode(), "ClaimRequest", cid)


async def test_a_work_record_its_model_rejects_is_skipped_and_its_offset_committable(tmp_path):
    tp = TopicPartition(topics.SENDER_WORK, 0)
    async with simulated_sender(Settings(data_dir=tmp_path)) as (sender, _):
        for offset, value in enumerate([b"not json", jsoncodec.dumps({"type": "WorkClaimed", "items": []})]):
            sender.tracker.begin(tp, offset)
            sender._start_job(tp, type("Record", (), {"value": value, "offset": offset})())
        assert not sender.jobs and sender.tracker.committable() == {tp: 2}


async def test_a_failed_results_flush_is_retried_in_order_until_it_passes(tmp_path):
    published = Published()
    failures = [ConnectionError("broker down"), ConnectionError("still down")]

    async def flaky_publish(keyed):
        if failures:
            raise failures.pop(0)
        await published(keyed)

    journal = Journal.open(Settings(data_dir=tmp_path))
    batcher = results_batcher(journal, flaky_publish, interval_s=0.01)
    stop = asyncio.Event()
    flusher = asyncio.create_task(batcher.run(stop))
    try:
        campaign_id, first, second = str(uuid.uuid4()), item("+12025550100"), item("+12025550100")
        results = [SenderResult(message_id=it["message_id"], outcome="accepted", attempt=1,
                                occurred_at="2026-01-01T00:00:00.000000Z") for it in (first, second)]
        done = [batcher.add(campaign_id, [results[0]]), batcher.add(campaign_id, [results[1]])]
        await asyncio.wait_for(asyncio.gather(*done), 10)
        assert failures == []
        assert [(cid, [r["message_id"] for r in rs]) for cid, rs in published.results] == [
            (campaign_id, [first["message_id"], second["message_id"]])]  # one record, in the order added
    finally:
        stop.set()
        await flusher
        journal.close()
