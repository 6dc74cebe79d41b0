"""The read model without a broker: idempotent, order-tolerant application of consumed batches."""
import random
import uuid
from collections import namedtuple

import pytest

from schemas import topics
from schemas.events import MESSAGE_STATUSES
from services.common import ids, jsoncodec
from services.projections.projector import ReadModel, decode_batch
from services.projections.storage import masked_dsn
from services.projections.views import settled

T0 = "2024-05-01T12:00:00.000000Z"


@pytest.fixture
def model(tmp_path):
    with ReadModel(tmp_path / "read-model.db") as m:
        yield m


def campaign_event(campaign_id, sequence, type_, causation_id=None, **body):
    return {"type": type_, "event_id": ids.record_event_id(campaign_id, sequence, 0), "campaign_id": campaign_id,
            "sequence": sequence, "occurred_at": T0, "causation_id": causation_id or str(uuid.uuid4()), **body}


def status_record(campaign_id, row, sequence, status, previous=None, reason=None, **extra):
    return {"type": "MessageStatusChanged", "event_id": ids.record_event_id(campaign_id, sequence, row),
            "message_id": ids.message_id(campaign_id, row), "campaign_id": campaign_id, "channel": "sms", "row": row,
            "run_no": extra.get("run_no", 1 if status != "waiting" else None), "status": status,
            "previous_status": previous, "reason": reason, "provider_code": extra.get("provider_code"),
            "attempt": extra.get("attempt"), "occurred_at": T0, "causation_id": str(uuid.uuid4()), "sequence": sequence}


def lifecycle(campaign_id, row, final="delivered"):
    """A message's records in order, with increasing per-message sequences."""
    path = ["waiting", "queued", "sending", "sent", final]
    records, previous = [], None
    for n, status in enumerate(path):
        reason = "invalid_destination" if status == "failed" else None
        records.append(status_record(campaign_id, row, 100 * (n + 1), status, previous, reason,
                                     run_no=None if status == "waiting" else 1))
        previous = status
    return records


def created_events(campaign_id, n_messages):
    return [
        campaign_event(campaign_id, 10, "CampaignCreated", name="Spring", description=None, channel="sms",
                       template={"body": "Hi {{name}}"}, created_by="alice"),
        campaign_event(campaign_id, 20, "ContactsAdded", chunk_no=0, valid=n_messages, invalid=1,
                       invalid_rows=[{"row": 99, "reason": "invalid_e164"}]),
        campaign_event(campaign_id, 21, "CampaignReady", message_count=n_messages,
                       summary={"name": "Spring", "channel": "sms", "message_count": n_messages, "preview": "Hi Ann",
                                "encoding": "GSM-7", "segments": 1, "segments_total": n_messages,
                                "rows_missing_variables": [3], "missing_variables_count": 1}),
        campaign_event(campaign_id, 22, "CampaignStatusChanged", status="ready", previous_status="created",
                       stopped=False, counts={"total": n_messages, "waiting": n_messages}),
    ]


def test_campaign_lifecycle_and_counts(model):
    cid = str(uuid.uuid4())
    model.apply_batch(created_events(cid, 3), [r for row in (2, 3, 4) for r in lifecycle(cid, row)[:1]])
    c = model.campaign(cid)
    assert c["name"] == "Spring" and c["channel"] == "sms" and c["created_by"] == "alice"
    assert c["status"] == "ready" and c["stopped"] is False and c["message_count"] == 3
    assert c["template"] == {"body": "Hi {{name}}"} and c["summary"]["preview"] == "Hi Ann"
    assert c["counts"] == {"total": 3, **{s: 0 for s in MESSAGE_STATUSES}, "waiting": 3}
    assert c["last_sequence"] == 22
    assert not model.is_final(cid)

    statuses = [r for row in (2, 3) for r in lifecycle(cid, row)[1:]] + lifecycle(cid, 4, "failed")[1:]
    model.apply_batch([
        campaign_event(cid, 30, "CampaignRunStarted", run_no=1, accepted_by="alice",
                       disclaimer={"consent": True, "content_compliance": True, "opt_out": True,
                                   "data_responsibility": True}, message_count=3, suppressed_count=0),
        campaign_event(cid, 31, "CampaignStatusChanged", status="in_progress", previous_status="ready",
                       stopped=False, counts={"total": 3, "queued": 3}),
        campaign_event(cid, 40, "CampaignStatusChanged", status="complete_with_errors",
                       previous_status="in_progress", stopped=False, counts={"total": 3, "delivered": 2, "failed": 1}),
    ], statuses)
    c = model.campaign(cid)
    assert c["status"] == "complete_with_errors" and c["run_no"] == 1 and c["final"]
    assert c["counts"]["delivered"] == 2 and c["counts"]["failed"] == 1 and c["counts"]["total"] == 3
    assert sum(v for k, v in c["counts"].items() if k != "total") == c["counts"]["total"]
    assert model.is_final(cid)
    assert [e["sequence"] for e in model.events(cid)] == [10, 20, 21, 22, 30, 31, 40]
    failed = model.messages(cid, status="failed")
    assert [(m["row"], m["reason"]) for m in failed] == [(4, "invalid_destination")]
    assert [c["campaign_id"] for c in model.campaigns()] == [cid]
    assert model.campaigns()[0]["counts"] == c["counts"]


def test_duplicates_and_out_of_order_records_change_nothing(model):
    cid = str(uuid.uuid4())
    rows = range(1, 201)
    final = {row: random.choice(["delivered", "failed"]) for row in rows}
    records = [r for row in rows for r in lifecycle(cid, row, final[row])]
    events = created_events(cid, len(rows))
    rng = random.Random(7)

    # Every record twice, shuffled (out of order per message), split across batches at random points.
    shuffled = records + records
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(shuffled)), 9))
    batches = [shuffled[a:b] for a, b in zip([0] + cuts, cuts + [len(shuffled)])]
    model.apply_batch(events + events[::-1], [])
    for batch in batches:
        model.apply_batch([], batch)
    # A whole batch redelivered after a restart.
    model.apply_batch(events, batches[0])

    c = model.campaign(cid)
    expected = {s: 0 for s in MESSAGE_STATUSES}
    for status in final.values():
        expected[status] += 1
    assert c["counts"] == {"total": len(rows), **expected}
    assert len(model.events(cid)) == len(events)
    assert c["last_sequence"] == 22
    for message in model.messages(cid):
        assert message["status"] == final[message["row"]] and message["last_sequence"] == 500
        assert message["previous_status"] == "sent"


def test_older_message_record_never_overwrites_a_newer_one(model):
    cid = str(uuid.uuid4())
    waiting, queued, sending, sent, delivered = lifecycle(cid, 1)
    model.apply_batch([], [delivered])
    model.apply_batch([], [sending, queued])  # late arrivals of older positions
    model.apply_batch([], [delivered, waiting, sent])  # in one batch: the highest sequence wins
    [message] = model.messages(cid)
    assert message["status"] == "delivered" and message["last_sequence"] == delivered["sequence"]
    # A later change of the same message (a late receipt, a retry) still applies.
    model.apply_batch([], [status_record(cid, 1, 600, "queued", "delivered", run_no=2)])
    assert model.messages(cid)[0]["status"] == "queued"


def test_campaign_event_older_than_the_applied_position_is_kept_in_history_only(model):
    cid = str(uuid.uuid4())
    events = created_events(cid, 1)
    model.apply_batch(events, [])
    stale = campaign_event(cid, 15, "CampaignStatusChanged", status="failed", previous_status="created",
                           stopped=False, counts={"total": 0})
    model.apply_batch([stale], [])
    assert model.campaign(cid)["status"] == "ready"
    # Events of one batch are applied in sequence order, whatever their order in the batch.
    model.apply_batch([
        campaign_event(cid, 50, "CampaignStatusChanged", status="complete", previous_status="in_progress",
                       stopped=True, counts={"total": 1, "delivered": 1}),
        campaign_event(cid, 40, "CampaignStopped", stopped_by="bob", cancelled_count=0),
        campaign_event(cid, 30, "CampaignStatusChanged", status="in_progress", previous_status="ready",
                       stopped=False, counts={"total": 1, "queued": 1}),
    ], [])
    c = model.campaign(cid)
    assert (c["status"], c["stopped"], c["stopped_by"], c["last_sequence"]) == ("complete", True, "bob", 50)
    assert c["stopped_at"] == T0  # who stopped it and when (product: Stopping)


def test_rejection_of_an_unknown_campaign_is_stored(model):
    cid, command_id = str(uuid.uuid4()), str(uuid.uuid4())
    rejection = {"type": "CommandRejected", "event_id": ids.record_event_id(ids.command_log_id(command_id), 0, 0),
                 "campaign_id": cid, "sequence": 0, "occurred_at": T0, "causation_id": command_id,
                 "command_id": command_id, "command_type": "RunCampaign", "reason": "unknown_campaign", "detail": ""}
    model.apply_batch([rejection], [])
    model.apply_batch([rejection], [])  # republished: same event_id
    assert model.campaign(cid) is None
    assert model.events(cid) == [rejection]
    assert model.answers(command_id) == [rejection]
    assert not model.is_final(cid)


def test_deleted_campaign_is_final(model):
    cid = str(uuid.uuid4())
    model.apply_batch(created_events(cid, 0) + [
        campaign_event(cid, 30, "CampaignDeleted"),
        campaign_event(cid, 31, "CampaignStatusChanged", status="deleted", previous_status="ready", stopped=False,
                       counts={"total": 0}),
    ], [])
    assert model.campaign(cid)["status"] == "deleted" and model.is_final(cid)


def test_failed_batch_is_rolled_back(model):
    cid = str(uuid.uuid4())
    bad = status_record(cid, 2, 100, "waiting")
    del bad["sequence"]  # the consumer checks records first; here apply_batch itself fails
    with pytest.raises(KeyError):
        model.apply_batch(created_events(cid, 1), [status_record(cid, 1, 100, "waiting"), bad])
    assert model.campaign(cid) is None and model.events(cid) == [] and model.messages(cid) == []


@pytest.mark.parametrize("dsn, secrets", [
    ("postgresql://outreach:s3cret@db.internal:5432/outreach", ["s3cret"]),
    ("postgresql://db.internal/outreach?password=hunter2", ["hunter2"]),  # in the query: was logged as is
    ("postgres://me:first@db/outreach?sslmode=require&password=second", ["first", "second"]),
    ("postgresql://me:p%40ss@db/outreach", ["p@ss", "p%40ss"]),
    ("postgresql://db/outreach?sslpassword=keypass", ["keypass"]),
    ("host=db dbname=outreach password=plain", ["plain"]),
    ("postgresql://bad host:x:y/db?password=broken", ["broken"]),  # unparsable: nothing of it is shown
])
def test_the_read_model_location_never_shows_a_password(dsn, secrets):
    shown = masked_dsn(dsn)
    assert not any(secret in shown for secret in secrets), shown
    assert "***" in shown


def test_the_masked_location_keeps_what_tells_the_database_apart():
    shown = masked_dsn("postgresql://outreach:s3cret@db.internal:6432/reads?sslmode=require&password=x")
    assert {"user=outreach", "host=db.internal", "port=6432", "dbname=reads", "sslmode=require"} <= \
        set(shown.split()), shown
    assert masked_dsn("postgresql://postgres@127.0.0.1:5432/x") == \
        "user=postgres dbname=x host=127.0.0.1 port=5432"  # no password: nothing masked


Record = namedtuple("Record", "topic partition offset value")


def test_poison_records_are_skipped():
    cid = str(uuid.uuid4())
    good_event = created_events(cid, 1)[0]
    good_status = status_record(cid, 1, 100, "waiting")
    records = [
        Record(topics.CAMPAIGN_EVENTS, 0, 0, b"{not json"),
        Record(topics.CAMPAIGN_EVENTS, 0, 1, jsoncodec.dumps(good_event)),
        Record(topics.CAMPAIGN_EVENTS, 0, 2, b"[1, 2]"),
        Record(topics.CAMPAIGN_EVENTS, 0, 3, jsoncodec.dumps({**good_event, "sequence": "3"})),
        Record(topics.MESSAGE_STATUS, 1, 0, None),
        Record(topics.MESSAGE_STATUS, 1, 1, jsoncodec.dumps({**good_status, "message_id": None})),
        Record(topics.MESSAGE_STATUS, 1, 2, jsoncodec.dumps(good_status)),
        Record(topics.MESSAGE_STATUS, 1, 3, b"\xff\xfe"),
    ]
    campaign_events, statuses, skipped = decode_batch(records)
    assert campaign_events == [good_event] and statuses == [good_status] and skipped == 6


def test_a_record_sqlite_cannot_store_is_skipped_alone(model):
    from services.projections.projector import apply_isolating_poison

    cid = str(uuid.uuid4())
    good = status_record(cid, 1, 100, "waiting")
    bad = {**status_record(cid, 2, 100, "waiting"), "row": {"not": "an int"}}
    assert apply_isolating_poison(model, created_events(cid, 2), [good, bad]) == 1
    assert model.campaign(cid)["counts"]["waiting"] == 1 and model.campaign(cid)["status"] == "ready"


def test_a_campaign_is_settled_only_once_its_counts_have_caught_up_with_its_final_status(model):
    # Campaign events and message statuses come from two topics: the final status may be read first.
    cid = str(uuid.uuid4())
    model.apply_batch(created_events(cid, 2), [r for row in (2, 3) for r in lifecycle(cid, row)[:3]])
    completed = campaign_event(cid, 40, "CampaignStatusChanged", status="complete", previous_status="in_progress",
                               stopped=False, counts={"total": 2, "delivered": 2})
    model.apply_batch([completed], [])
    campaign = model.campaign(cid)
    assert campaign["status"] == "complete" and campaign["final"] and not settled(campaign)
    model.apply_batch([], lifecycle(cid, 2)[3:])
    assert not settled(model.campaign(cid))  # one message still sending
    model.apply_batch([], lifecycle(cid, 3)[3:])
    assert settled(model.campaign(cid))


def test_an_unknown_total_is_not_settled_before_every_message_is_known(model):
    cid = str(uuid.uuid4())
    completed = campaign_event(cid, 40, "CampaignStatusChanged", status="complete", previous_status="in_progress",
                               stopped=False, counts={"total": 3, "delivered": 3})
    model.apply_batch(created_events(cid, 3) + [completed], [r for row in (2, 3) for r in lifecycle(cid, row)])
    assert not settled(model.campaign(cid))  # two of three messages seen, both final
    model.apply_batch([], lifecycle(cid, 4))
    assert settled(model.campaign(cid))

