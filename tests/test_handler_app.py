"""The command handler's use cases on both event stores (no broker): rules, answers, stored records."""
from __future__ import annotations

import uuid

from schemas import topics
from schemas.times import utc_now
from schemas.events import CAMPAIGN_EVENT_ADAPTER, MessageStatusChanged
from schemas.internal import ClaimRequest, SenderResults, SendingHold, WorkClaimed
from services.common import ids, jsoncodec, records
from services.common.settings import get_settings
from services.command_handler import wire
from services.command_handler.application import OutreachApp
from services.command_handler.domain.model import Campaign
from services.command_handler.handlers import DeadLetter
from tests.handler_driver import Driver, sender_result

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}


def sms_contacts(n, start_row=2):
    return [{"row": start_row + i, "destination": f"+1202555{i:04d}", "variables": {"name": f"P{i}"}}
            for i in range(n)]


def ready_sms_campaign(d: Driver, n=5, body="Hi {{name}}") -> str:
    cid = str(uuid.uuid4())
    d.send("CreateCampaign", cid, name="c", channel="sms", template={"body": body})
    d.send("AddContacts", cid, chunk_no=0, contacts=sms_contacts(n), last_chunk=True)
    return cid


def test_create_add_contacts_ready_with_invalid_rows_and_duplicates(app):
    d = Driver(app)
    cid = str(uuid.uuid4())
    [created] = d.send("CreateCampaign", cid, name="Spring", channel="sms", template={"body": "Hi {{name}} {{x}}"})
    assert created["type"] == "CampaignCreated" and created["sequence"] > 0
    chunk0 = sms_contacts(3) + [{"row": 9, "destination": "12025550000", "variables": {}},
                                {"row": 10, "destination": "", "variables": {}},
                                {"row": 11, "destination": "+12025550000", "variables": {}}]
    [added] = d.send("AddContacts", cid, chunk_no=0, contacts=chunk0, last_chunk=False)
    assert (added["valid"], added["invalid"]) == (3, 3)
    assert {r["row"]: r["reason"] for r in added["invalid_rows"]} == {
        9: "invalid_e164", 10: "missing_destination", 11: "duplicate_destination"}
    answers = d.send("AddContacts", cid, chunk_no=1, contacts=[{"row": 20, "destination": "+12025559999",
                                                               "variables": {"name": "Z"}}], last_chunk=True)
    assert [a["type"] for a in answers] == ["ContactsAdded", "CampaignReady", "CampaignStatusChanged"]
    assert answers[1]["message_count"] == 4
    summary = answers[1]["summary"]
    assert summary["preview"] == "Hi P0 {{x}}" and summary["encoding"] == "GSM-7"
    assert summary["missing_variables_count"] == 4
    status = answers[2]
    assert (status["previous_status"], status["status"]) == ("created", "ready")
    assert status["counts"]["total"] == 4 and status["counts"]["waiting"] == 4
    for a in answers:
        CAMPAIGN_EVENT_ADAPTER.validate_python(a)
    sequences = [a["sequence"] for a in answers]
    assert sequences == sorted(sequences) and len(set(sequences)) == 3


def test_chunk_rules_repeat_gap_closed(app):
    d = Driver(app)
    cid = str(uuid.uuid4())
    d.send("CreateCampaign", cid, name="c", channel="sms", template={"body": "x"})
    [first] = d.send("AddContacts", cid, chunk_no=0, contacts=sms_contacts(2), last_chunk=False)
    [again] = d.send("AddContacts", cid, chunk_no=0, contacts=sms_contacts(5), last_chunk=False)
    assert again["type"] == "ContactsAdded" and again["valid"] == first["valid"] == 2
    assert again["event_id"] != first["event_id"]
    [gap] = d.send("AddContacts", cid, chunk_no=2, contacts=sms_contacts(1, 50), last_chunk=True)
    assert (gap["type"], gap["reason"]) == ("CommandRejected", "invalid_command")
    d.send("AddContacts", cid, chunk_no=1, contacts=sms_contacts(1, 60), last_chunk=True)
    [closed] = d.send("AddContacts", cid, chunk_no=2, contacts=sms_contacts(1, 70), last_chunk=True)
    assert closed["reason"] == "contacts_closed"


def test_run_needs_disclaimer_and_ready_and_free_channel(app):
    d = Driver(app)
    cid = ready_sms_campaign(d)
    [refused] = d.send("RunCampaign", cid, disclaimer={**ALL_TRUE, "opt_out": False})
    assert refused["reason"] == "disclaimer_not_accepted"
    [refused] = d.send("RunCampaign", cid)
    assert refused["reason"] == "disclaimer_not_accepted"
    assert app.campaign_view(cid)["status"] == "ready"
    assert not [r for r in d.last if r["topic"] == topics.MESSAGE_STATUS]  # nothing queued

    started, changed = d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    assert started["type"] == "CampaignRunStarted" and started["run_no"] == 1 and started["message_count"] == 5
    assert changed["status"] == "in_progress" and changed["counts"]["queued"] == 5
    queued = [r["value"] for r in d.last if r["topic"] == topics.MESSAGE_STATUS]
    assert len(queued) == 5 and {(q["previous_status"], q["status"], q["run_no"]) for q in queued} == {("waiting", "queued", 1)}

    other = ready_sms_campaign(d)
    [busy] = d.send("RunCampaign", other, disclaimer=ALL_TRUE)
    assert busy["reason"] == "channel_busy"
    [not_ready] = d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    assert not_ready["reason"] == "campaign_not_ready"

    email = str(uuid.uuid4())
    d.send("CreateCampaign", email, name="e", channel="email",
           template={"subject": "s", "html": "<p>h</p>", "from_email": "a@example.com", "from_name": "A",
                     "attachments": []})
    d.send("AddContacts", email, chunk_no=0,
           contacts=[{"row": 1, "destination": "x@example.com", "variables": {}}], last_chunk=True)
    email_started = d.send("RunCampaign", email, disclaimer=ALL_TRUE)
    assert email_started[0]["type"] == "CampaignRunStarted"  # one SMS and one email may run together


def test_precedence_unknown_campaign_and_invalid_command(app):
    d = Driver(app)
    missing = str(uuid.uuid4())
    [r] = d.send("RunCampaign", missing, disclaimer=ALL_TRUE)
    assert (r["reason"], r["sequence"]) == ("unknown_campaign", 0)
    [r] = d.send("RunCampaign", missing, disclaimer={"consent": "yes"})
    assert r["reason"] == "invalid_command"  # needs no campaign state: comes before unknown_campaign
    [r] = d.send("Explode", missing)
    assert r["reason"] == "invalid_command" and r["command_type"] == "Explode"


def test_claims_results_complete_and_release_channel(app):
    d = Driver(app)
    cid = ready_sms_campaign(d, n=5)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    d.new_records()
    assert app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=3) == 3
    work = [r["value"] for r in d.new_records() if r["topic"] == topics.SENDER_WORK]
    assert len(work) == 1 and len(work[0]["items"]) == 3 and work[0]["remaining_queued"] == 2
    claim2 = str(uuid.uuid4())
    assert app.claim(claim_id=claim2, campaign_id=cid, max_messages=3) == 2
    assert app.claim(claim_id=claim2, campaign_id=cid, max_messages=3) == 0  # a repeated claim claims nothing
    items = work[0]["items"] + [i for r in d.new_records() if r["topic"] == topics.SENDER_WORK
                                for i in r["value"]["items"]]
    assert app.campaign_view(cid)["holds_channel"]
    results = [sender_result(i["message_id"], o) for i in items for o in ("accepted", "sent", "delivered")]
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=results)
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=results)  # a duplicate changes nothing
    view = app.campaign_view(cid)
    assert view["status"] == "complete" and not view["holds_channel"]
    assert view["counts"]["delivered"] == 5
    statuses = [r["value"] for r in d.new_records() if r["topic"] == topics.MESSAGE_STATUS]
    assert len(statuses) == 10  # sent + delivered per message, once
    for s in statuses:
        MessageStatusChanged.model_validate(s)
    other = ready_sms_campaign(d)
    assert d.send("RunCampaign", other, disclaimer=ALL_TRUE)[0]["type"] == "CampaignRunStarted"


def test_stop_cancels_only_queued_and_retry_resumes(app):
    d = Driver(app)
    cid = ready_sms_campaign(d, n=6)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=2)
    [refused] = d.send("StopCampaign", cid)
    assert refused["reason"] == "stop_not_confirmed"
    stopped, *_ = d.send("StopCampaign", cid, confirmed=True)
    assert stopped["type"] == "CampaignStopped" and stopped["cancelled_count"] == 4
    view = app.campaign_view(cid)
    assert view["counts"]["sending"] == 2 and view["counts"]["cancelled"] == 4 and view["stopped"]
    assert view["status"] == "in_progress" and not view["holds_channel"]
    [again] = d.send("StopCampaign", cid, confirmed=True)
    assert again["reason"] == "campaign_not_running"
    [r] = d.send("RetryFailedMessages", cid)
    assert r["reason"] == "nothing_to_retry"  # cancelled ones come back only when asked
    [resumed] = d.send("RetryFailedMessages", cid, include_cancelled=True)  # still in progress: no status change
    assert (resumed["type"], resumed["run_no"], resumed["message_count"]) == ("RetryStarted", 2, 4)
    requeued = [r["value"] for r in d.last if r["topic"] == topics.MESSAGE_STATUS]
    assert {(r["previous_status"], r["status"], r["run_no"]) for r in requeued} == {("cancelled", "queued", 2)}
    assert app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10) == 4


def test_retry_rules(app):
    d = Driver(app)
    cid = ready_sms_campaign(d, n=3)
    [r] = d.send("RetryFailedMessages", cid)
    assert r["reason"] == "not_retryable"
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    mids = [ids.message_id(cid, row) for row in (2, 3, 4)]
    app.apply_results(result_id="r1", campaign_id=cid, results=[
        sender_result(mids[0], "refused", provider_code="30003"),
        sender_result(mids[1], "refused", provider_code="21610"),
    ])
    [busy] = d.send("RetryFailedMessages", cid)
    assert busy["reason"] == "channel_busy"  # itself still holds the channel: one message not yet accepted
    app.apply_results(result_id="r2", campaign_id=cid, results=[
        sender_result(mids[2], "accepted"), sender_result(mids[2], "sent"), sender_result(mids[2], "delivered")])
    view = app.campaign_view(cid)
    assert view["status"] == "complete_with_errors"
    assert (view["counts"]["failed"], view["counts"]["opted_out"], view["counts"]["delivered"]) == (1, 1, 1)
    [r] = d.send("RetryFailedMessages", cid, message_ids=[str(uuid.uuid4())])
    assert r["reason"] == "invalid_command"
    [r] = d.send("RetryFailedMessages", cid, message_ids=[mids[1]])
    assert r["reason"] == "nothing_to_retry"  # opted out: never re-queued
    started, changed = d.send("RetryFailedMessages", cid)
    assert (started["run_no"], started["message_count"]) == (2, 1)
    assert changed["status"] == "in_progress"


def test_repeated_command_is_answered_again_with_same_event_ids(app):
    d = Driver(app)
    cid = str(uuid.uuid4())
    command_id = str(uuid.uuid4())
    first = d.send("CreateCampaign", cid, command_id=command_id, name="c", channel="sms", template={"body": "x"})
    second = d.send("CreateCampaign", cid, command_id=command_id, name="c", channel="sms", template={"body": "x"})
    third = d.send("CreateCampaign", cid, command_id=command_id, name="other", channel="sms", template={"body": "y"})
    assert first == second == third and len(first) == 1
    [exists] = d.send("CreateCampaign", cid, name="c", channel="sms", template={"body": "x"})
    assert exists["reason"] == "campaign_exists"


def test_delete_rules(app):
    d = Driver(app)
    cid = ready_sms_campaign(d)
    deleted, changed = d.send("DeleteCampaign", cid)
    assert deleted["type"] == "CampaignDeleted" and changed["status"] == "deleted"
    [r] = d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    assert r["reason"] == "unknown_campaign"
    [r] = d.send("CreateCampaign", cid, name="c", channel="sms", template={"body": "x"})
    assert r["reason"] == "campaign_exists"
    running = ready_sms_campaign(d)
    d.send("RunCampaign", running, disclaimer=ALL_TRUE)
    [r] = d.send("DeleteCampaign", running)
    assert r["reason"] == "not_deletable"
    [r] = d.send("UpdateTemplate", running, template={"body": "y"})
    assert r["reason"] == "not_editable"


def test_racing_runs_one_wins_on_optimistic_concurrency(app, monkeypatch):
    """Two handler processes decide Run for two campaigns of one channel at once: the one that saves
    second read the lock before the first committed, so its save conflicts and is decided again."""
    import copy

    d = Driver(app)
    first, second = ready_sms_campaign(d), ready_sms_campaign(d)
    d.send("RunCampaign", ready_sms_campaign(d), disclaimer=ALL_TRUE)  # the lock exists...
    d.send("StopCampaign", [v for v in [app.repository.get(ids.channel_lock_id("sms")).holder]][0], confirmed=True)
    other_app = OutreachApp(get_settings())
    try:
        stale_lock = copy.deepcopy(other_app.repository.get(ids.channel_lock_id("sms")))  # ...and is free
        assert stale_lock.holder is None
        real_lock = other_app._lock
        calls = []

        def lock_read_before_the_other_commit(channel):
            calls.append(channel)
            return stale_lock if len(calls) == 1 else real_lock(channel)

        monkeypatch.setattr(other_app, "_lock", lock_read_before_the_other_commit)
        [won, _] = d.send("RunCampaign", first, disclaimer=ALL_TRUE)
        assert won["type"] == "CampaignRunStarted"
        lost = Driver(other_app)
        lost.position = d.position
        [answer] = lost.send("RunCampaign", second, disclaimer=ALL_TRUE)
        assert answer["reason"] == "channel_busy"
        assert len(calls) == 2  # decided twice: the first save hit the optimistic-concurrency conflict
        assert other_app.campaign_view(second)["status"] == "ready"
    finally:
        other_app.close()


def test_opt_outs_suppress_at_run_and_at_claim_and_start_opts_back_in(app):
    d = Driver(app)
    cid = ready_sms_campaign(d, n=4)
    contacts = sms_contacts(4)
    app.apply_opt_out(opt_out_id="o1", channel="sms", destination=contacts[0]["destination"], opted_out=True,
                      source="sms_stop")
    started, _ = d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    assert (started["message_count"], started["suppressed_count"]) == (3, 1)
    # Opts out after the run, before the claim: its queued message is not sent either.
    app.apply_opt_out(opt_out_id="o2", channel="sms", destination=contacts[1]["destination"], opted_out=True,
                      source="sms_stop")
    assert app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10) == 2
    view = app.campaign_view(cid)
    assert view["counts"]["opted_out"] == 2 and view["counts"]["sending"] == 2
    app.apply_opt_out(opt_out_id="o3", channel="sms", destination=contacts[0]["destination"], opted_out=False,
                      source="sms_start")
    assert contacts[0]["destination"] not in app.suppressed("sms")
    assert contacts[1]["destination"] in app.suppressed("sms") and not app.suppressed("email")


def test_21610_and_spam_reports_add_to_the_opt_out_list(app):
    d = Driver(app)
    cid = ready_sms_campaign(d, n=2)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    mid = ids.message_id(cid, 2)
    app.apply_results(result_id="r", campaign_id=cid,
                      results=[sender_result(mid, "refused", provider_code="21610")])
    assert sms_contacts(1)[0]["destination"] in app.suppressed("sms")
    assert app.campaign_view(cid)["counts"]["opted_out"] == 1


def test_email_outcomes_bounce_blocked_dropped_resubmitted_and_spam_report(app):
    d = Driver(app)
    cid = str(uuid.uuid4())
    d.send("CreateCampaign", cid, name="e", channel="email",
           template={"subject": "s", "html": "<p>h</p>", "from_email": "a@example.com", "from_name": "A",
                     "attachments": []})
    d.send("AddContacts", cid, chunk_no=0, last_chunk=True,
           contacts=[{"row": r, "destination": f"u{r}@example.com", "variables": {}} for r in range(1, 6)])
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    m = [ids.message_id(cid, r) for r in range(1, 6)]
    accepted = [sender_result(x, "accepted") for x in m]
    app.apply_results(result_id="a", campaign_id=cid, results=accepted + [
        sender_result(m[0], "bounced", None, "5.1.1"),
        sender_result(m[1], "blocked", None),
        sender_result(m[2], "dropped", None, "Unsubscribed Address"),
        sender_result(m[3], "deferred", None, "421"),
        sender_result(m[3], "resubmitted", 2, "421"),
        sender_result(m[4], "delivered", None),
        sender_result(m[4], "spamreport", None),
        sender_result(m[4], "sent", None),  # not an email outcome: ignored
    ])
    d.new_records()
    view = app.campaign_view(cid)
    c = view["counts"]
    assert (c["failed"], c["opted_out"], c["retrying"], c["delivered"]) == (2, 1, 1, 1)
    assert view["status"] == "active_retries" and not view["holds_channel"]
    assert "u5@example.com" in app.suppressed("email")
    block = app.repository.get(ids.block_id(cid, 0))
    assert block.reason[:2] == ["bounced", "blocked"] and block.attempt[3] == 2


def test_sending_hold_is_told_once_per_change(app):
    d = Driver(app)
    cid = ready_sms_campaign(d, n=1)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    d.new_records()
    for held in (True, True, False, False):
        app.apply_hold(hold_id=str(uuid.uuid4()), campaign_id=cid, provider="twilio", held=held, reason="outage")
    events = [r["value"]["type"] for r in d.new_records() if r["topic"] == topics.CAMPAIGN_EVENTS]
    assert events == ["CampaignSendingHeld", "CampaignSendingResumed"]


def stored_work(app, since: int) -> tuple[list, list]:
    """The stored WorkClaimed events after notification `since`, and the records the relay makes of them."""
    events, work = [], []
    for n in app.recorder.select_notifications(start=since + 1, limit=10_000):
        event = app.mapper.to_domain_event(n)
        if isinstance(event, Campaign.WorkClaimed):
            events.append(event)
            work += [r for r in wire.to_records(event) if r.topic == topics.SENDER_WORK]
    return events, work


def test_every_work_claimed_the_relay_publishes_is_one_its_model_accepts(app):
    """Each stored claim becomes exactly one WorkClaimed, built as the model and encoded by records.encode:
    the sender decodes the very bytes the relay sends (SMS and email templates, full and empty claims)."""
    d = Driver(app)
    since = app.recorder.max_notification_id() or 0
    sms = ready_sms_campaign(d, n=3)
    email = str(uuid.uuid4())
    d.send("CreateCampaign", email, name="e", channel="email",
           template={"subject": "Hi {{name}}", "html": "<p>h</p>", "from_email": "a@example.com", "from_name": "A",
                     "reply_to": "r@example.com",
                     "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "size_bytes": 10,
                                      "status": "complete"}]})
    d.send("AddContacts", email, chunk_no=0, last_chunk=True,
           contacts=[{"row": 1, "destination": "x@example.com", "variables": {"name": "X"}}])
    for cid in (sms, email):
        d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
        app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=2)
        app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=5)
        app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=5)  # nothing left: empty items
    events, work = stored_work(app, since)
    assert len(events) == 6 and len(work) == 6
    assert sorted(len(w.model.items) for w in work) == [0, 0, 0, 1, 1, 2]
    for record in work:
        assert records.decode(WorkClaimed, record.encoded()) == record.model
        assert record.key == record.model.campaign_id and record.value == jsoncodec.loads(record.encoded())


def test_a_work_claimed_its_model_refuses_is_not_published(caplog):
    """Caught where it is made: a stored claim that would make an invalid WorkClaimed (here an item whose
    message id is not a wire id) publishes no sender-work record, and says why."""
    campaign = Campaign(campaign_id=uuid.uuid4(), name="c", description=None, channel="sms",
                        template={"body": "x"}, created_by="alice", causation_id="x")
    campaign.add_contacts(chunk_no=0, valid_rows=[2], destinations=["+12025550000"], invalid_rows=[],
                          last_chunk=True, blocks=[], causation_id="x")
    campaign.start_run(accepted_by="alice", disclaimer=ALL_TRUE, queued=1, suppressed=0, causation_id="x")
    item = {"message_id": "not-a-wire-id", "row": 2, "destination": "+12025550000", "variables": {}, "attempt": 0}
    campaign.record_claim(claim_id=str(uuid.uuid4()), items=[item], suppressed=0, cursor=1, causation_id="c")
    claimed = campaign.pending_events[-1]
    assert isinstance(claimed, Campaign.WorkClaimed)
    assert [r for r in wire.to_records(claimed) if r.topic == topics.SENDER_WORK] == []
    assert "not publishing a WorkClaimed its model refuses" in caplog.text


def test_internal_records_are_parsed_with_their_models_and_refused_with_the_reason(app):
    d = Driver(app)
    cid = ready_sms_campaign(d, n=1)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    request = ClaimRequest(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=5,
                           requested_at=utc_now())
    assert d.handler.handle(topics.CLAIM_REQUESTS, records.encode(request)) is None
    assert app.campaign_view(cid)["counts"]["sending"] == 1
    hold = SendingHold(hold_id=str(uuid.uuid4()), campaign_id=cid, provider="twilio", held=True, reason="outage",
                       occurred_at=utc_now())
    assert d.handler.handle(topics.SENDER_RESULTS, records.encode(hold)) is None  # same topic as the results
    results = SenderResults(result_id=str(uuid.uuid4()), campaign_id=cid,
                            results=[sender_result(ids.message_id(cid, 2), "accepted")])
    assert d.handler.handle(topics.SENDER_RESULTS, records.encode(results)) is None
    assert not app.campaign_view(cid)["holds_channel"]  # accepted: nothing queued or awaiting acceptance
    assert [r["value"]["type"] for r in d.new_records() if r["topic"] == topics.CAMPAIGN_EVENTS][-1:] == [
        "CampaignSendingHeld"]

    refused = {
        topics.CLAIM_REQUESTS: {"type": "ClaimRequest", "claim_id": "nope", "campaign_id": cid, "max_messages": 1},
        topics.SENDER_RESULTS: {"type": "Something", "campaign_id": cid},
        topics.EXPIRIES: {"type": "Expiry", "campaign_id": cid},
        topics.OPT_OUTS: b"not json",
    }
    for topic, value in refused.items():
        raw = value if isinstance(value, bytes) else jsoncodec.dumps(value)
        dead = d.handler.handle(topic, raw)
        assert isinstance(dead, DeadLetter) and dead.error.startswith(f"invalid record on {topic}: "), dead
    assert d.handler.handle("outreach.unknown", b"{}") == DeadLetter("unexpected topic outreach.unknown")


def test_big_events_are_stored_compressed_and_events_stored_plain_still_read(app):
    """A block's run event is stored zlib-compressed (LargeEventCompressor); a store written before the
    compressor (every event plain JSON) still reads, and the wire records are the same either way."""
    d = Driver(app)
    plain_cid = str(uuid.uuid4())
    compressor, app.mapper.compressor = app.mapper.compressor, None  # as the handler stored before
    try:
        d.send("CreateCampaign", plain_cid, name="before", channel="sms", template={"body": "Hi {{name}}"})
        d.send("AddContacts", plain_cid, chunk_no=0, contacts=sms_contacts(300), last_chunk=True)
        plain_run = d.send("RunCampaign", plain_cid, disclaimer=ALL_TRUE)
    finally:
        app.mapper.compressor = compressor
    d.send("StopCampaign", plain_cid, confirmed=True)  # frees the SMS channel for the next run
    cid = ready_sms_campaign(d, n=300)
    run = d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    assert [e["type"] for e in run] == [e["type"] for e in plain_run] == ["CampaignRunStarted", "CampaignStatusChanged"]

    states = [n.state for n in app.recorder.select_notifications(start=1, limit=10_000)]
    assert any(s[:1] == b"\x78" for s in states), "no event was stored compressed"
    assert any(s[:1] == b"{" and len(s) >= 1024 for s in states), "the plain store had no big event"
    fresh = OutreachApp(get_settings())  # nothing cached: every aggregate read back from the store
    try:
        assert fresh.campaign_view(plain_cid)["counts"]["cancelled"] == 300
        assert fresh.campaign_view(cid)["counts"]["queued"] == 300
        records = [r.as_dict() for n in fresh.recorder.select_notifications(start=1, limit=10_000)
                   for r in wire.to_records(fresh.mapper.to_domain_event(n))]
        for campaign_id in (plain_cid, cid):
            statuses = [r["value"]["status"] for r in records
                        if r["topic"] == topics.MESSAGE_STATUS and r["value"]["campaign_id"] == campaign_id]
            assert statuses.count("queued") == 300
    finally:
        fresh.close()
