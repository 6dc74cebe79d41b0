"""The read model's queries, audit history, as-of views and canonical dumps, on SQLite and on PostgreSQL."""
from __future__ import annotations

import random
import tracemalloc
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from schemas.events import MESSAGE_STATUSES
from schemas.times import rfc3339
from services.common import ids
from services.projections import views
from services.projections.projector import ReadModel
from tests.conftest import fresh_postgres_database

START = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> str:
    return rfc3339(START + timedelta(seconds=seconds))


@pytest.fixture
def model(read_model):
    """A fresh read model of each kind (conftest's `read_model`)."""
    return read_model


def event(cid, sequence, type_, seconds, **body):
    return {"type": type_, "event_id": ids.record_event_id(cid, sequence, 0), "campaign_id": cid,
            "sequence": sequence, "occurred_at": at(seconds), "causation_id": str(uuid.uuid5(uuid.NAMESPACE_OID,
                                                                                                f"{cid}{sequence}")),
            **body}


def status(cid, row, sequence, status_, previous, seconds, *, reason=None, code=None, attempt=None, run_no=1,
           **extra):
    return {"type": "MessageStatusChanged", "event_id": ids.record_event_id(cid, sequence, row),
            "message_id": ids.message_id(cid, row), "campaign_id": cid, "channel": "sms", "row": row,
            "run_no": run_no, "status": status_, "previous_status": previous, "reason": reason,
            "provider_code": code, "attempt": attempt, "occurred_at": at(seconds),
            "causation_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{cid}{row}{sequence}")), "sequence": sequence,
            **extra}


def waiting(cid, row, seconds, destination, variables):
    return status(cid, row, 100, "waiting", None, seconds, run_no=None, destination=destination,
                  variables=variables)


CONTACTS = {  # row: (destination, variables)
    2: ("+12025550100", {"first_name": "Ann", "city": "Zürich"}),
    3: ("+12025550101", {"first_name": "Bob", "city": "Oslo"}),
    4: ("+15005550001", {"first_name": "Cléa", "city": "Paris"}),
    5: ("+12025550103", {"first_name": "Dan_%", "city": "Rome"}),
}


def campaign_records(cid):
    """A small run: created at 0 s, ready at 1 s, run at 10 s; messages move between 10 and 13 s; row 4 is
    refused; final at 13 s."""
    events = [
        event(cid, 10, "CampaignCreated", 0, name="Spring", description=None, channel="sms",
              template={"body": "Hi {{first_name}}"}, created_by="alice"),
        event(cid, 20, "ContactsAdded", 1, chunk_no=0, valid=4, invalid=0, invalid_rows=[]),
        event(cid, 21, "CampaignReady", 1, message_count=4),
        event(cid, 22, "CampaignStatusChanged", 1, status="ready", previous_status="created", stopped=False,
              counts={"total": 4, "waiting": 4}),
        event(cid, 30, "CampaignRunStarted", 10, run_no=1, accepted_by="bob",
              disclaimer={"consent": True, "content_compliance": True, "opt_out": True,
                          "data_responsibility": True}, message_count=4, suppressed_count=0),
        event(cid, 31, "CampaignStatusChanged", 10, status="in_progress", previous_status="ready", stopped=False,
              counts={"total": 4, "queued": 4}),
        event(cid, 40, "CampaignStatusChanged", 13, status="complete_with_errors", previous_status="in_progress",
              stopped=False, counts={"total": 4, "delivered": 3, "failed": 1}),
    ]
    statuses = [waiting(cid, row, 1, *contact) for row, contact in CONTACTS.items()]
    statuses += [status(cid, row, 200, "queued", "waiting", 10) for row in CONTACTS]
    statuses += [status(cid, row, 300, "sending", "queued", 11) for row in CONTACTS]
    for row in (2, 3, 5):
        statuses += [status(cid, row, 400, "sent", "sending", 12, attempt=1),
                     status(cid, row, 500, "delivered", "sent", 13, attempt=1)]
    statuses.append(status(cid, 4, 400, "failed", "sending", 12, reason="invalid_destination", code="21211",
                           attempt=1))
    return events, statuses


def apply_shuffled(model, events, statuses, seed):
    """Every record at least once, in a random order, split into random batches, some twice."""
    rng = random.Random(seed)
    records = [("e", r) for r in events] + [("s", r) for r in statuses]
    records += rng.sample(records, len(records) // 3)
    rng.shuffle(records)
    while records:
        n = rng.randint(1, 6)
        batch, records = records[:n], records[n:]
        model.apply_batch([r for k, r in batch if k == "e"], [r for k, r in batch if k == "s"])


def test_messages_carry_contact_and_times_whatever_the_order(model):
    cid = str(uuid.uuid4())
    events, statuses = campaign_records(cid)
    # The later records first, then the waiting records (out of order): the contact still fills in.
    model.apply_batch(events, [s for s in statuses if s["status"] != "waiting"])
    assert model.messages(cid)[0]["destination"] is None
    model.apply_batch([], [s for s in statuses if s["status"] == "waiting"])
    messages = model.messages(cid)
    assert [m["row"] for m in messages] == [2, 3, 4, 5]
    first = messages[0]
    assert set(first) == {"message_id", "campaign_id", "row", "channel", "destination", "variables", "status",
                          "previous_status", "reason", "provider_code", "attempt", "run_no", "created_at",
                          "updated_at", "last_sequence"}
    assert (first["destination"], first["variables"]) == CONTACTS[2]
    assert (first["status"], first["previous_status"], first["attempt"], first["run_no"]) == \
        ("delivered", "sent", 1, 1)
    assert (first["created_at"], first["updated_at"], first["last_sequence"]) == (at(1), at(13), 500)
    failed = model.message(ids.message_id(cid, 4))
    assert (failed["status"], failed["reason"], failed["provider_code"]) == ("failed", "invalid_destination", "21211")


def test_message_queries_filter_search_page_and_stream(model):
    cid, other = str(uuid.uuid4()), str(uuid.uuid4())
    for c in (cid, other):
        events, statuses = campaign_records(c)
        model.apply_batch(events, statuses)

    def rows(**kw):
        return [m["row"] for m in model.messages(cid, **kw)]

    assert rows(status="delivered") == [2, 3, 5] and rows(reason="invalid_destination") == [4]
    assert rows(status="failed", reason="invalid_destination") == [4] and rows(status="queued") == []
    assert rows(search="ANN") == [2]  # a variable value, case-insensitive
    assert rows(search="zürich") == [2] and rows(search="ZÜRICH") == [2] and rows(search="cLÉA") == [4]
    assert rows(search="5550101") == [3]  # a substring of the destination
    assert rows(search="4") == [4]  # the row number (no destination or value contains "4")
    assert rows(search=ids.message_id(cid, 5)) == [5]
    assert rows(search="_%") == [5]  # LIKE wildcards are taken literally
    assert rows(search="first_name") == []  # variable names are not values
    # Unicode digits are not row numbers ('²'.isdigit() is True, int('²') raises); too long a number is no row.
    assert rows(search="²") == [] and rows(search="٣") == [] and model.count_messages(cid, search="²") == 0
    assert rows(search="3" * 18) == []
    assert rows(limit=2) == [2, 3] and rows(limit=2, offset=2) == [4, 5] and rows(offset=3) == [5]
    assert model.count_messages(cid) == 4 and model.count_messages(cid, status="delivered") == 3
    assert model.count_messages(cid, search="oslo") == 1
    assert [m["row"] for m in model.iter_messages(cid, batch_size=1)] == [2, 3, 4, 5]
    assert [m["row"] for m in model.iter_messages(cid, status="delivered", batch_size=2)] == [2, 3, 5]
    assert model.counts(cid) == {**{s: 0 for s in MESSAGE_STATUSES}, "total": 4, "delivered": 3, "failed": 1}


def test_campaign_listing_filters_and_pages(model):
    cids = []
    for n in range(3):
        cid = str(uuid.uuid4())
        events = [event(cid, 10, "CampaignCreated", n, name=f"c{n}", channel="sms", template={"body": "x"},
                        created_by="alice"),
                  event(cid, 11, "CampaignStatusChanged", n, status="ready" if n < 2 else "created",
                        previous_status=None, stopped=False, counts={"total": 0})]
        model.apply_batch(events, [])
        cids.append(cid)
    newest_first = cids[::-1]
    assert [c["campaign_id"] for c in model.campaigns()] == newest_first
    assert [c["campaign_id"] for c in model.campaigns(limit=2, offset=1)] == newest_first[1:]
    assert [c["campaign_id"] for c in model.campaigns(status="ready")] == [cids[1], cids[0]]
    assert model.count_campaigns() == 3 and model.count_campaigns(status="ready") == 2
    assert all(c["counts"]["total"] == 0 for c in model.campaigns(limit=1))


def test_history_merges_campaign_events_and_transitions_in_time_order(model):
    cid = str(uuid.uuid4())
    events, statuses = campaign_records(cid)
    apply_shuffled(model, events, statuses, seed=1)
    history = model.history(cid)
    assert len(history) == len(events) + len(statuses)
    keys = [(h["occurred_at"], 0 if h["type"] != "MessageStatusChanged" else 1, h.get("row", 0), h["sequence"])
            for h in history]
    assert keys == sorted(keys)
    # At 10 s: the run and the status change (sequence order), then every queued record (row order).
    at_ten = [(h["type"], h.get("row")) for h in history if h["occurred_at"] == at(10)]
    assert at_ten == [("CampaignRunStarted", None), ("CampaignStatusChanged", None)] + \
        [("MessageStatusChanged", row) for row in CONTACTS]
    # Each item is the record as published, the contact of `waiting` records included.
    by_id = {r["event_id"]: r for r in events + statuses}
    assert all(h == by_id[h["event_id"]] for h in history)
    run = next(h for h in history if h["type"] == "CampaignRunStarted")
    assert run["accepted_by"] == "bob" and run["disclaimer"]["consent"] is True
    assert model.history(cid, include_messages=False) == events
    message_id = ids.message_id(cid, 4)
    assert [(r["status"], r["reason"], r["attempt"]) for r in model.message_history(message_id)] == [
        ("waiting", None, None), ("queued", None, None), ("sending", None, None),
        ("failed", "invalid_destination", 1)]


def test_history_pages_return_every_record_once_even_with_equal_keys_and_missing_fields(model, monkeypatch):
    monkeypatch.setattr(views, "PAGE_ROWS", 3)  # many page boundaries
    cid = str(uuid.uuid4())
    events, statuses = campaign_records(cid)
    # Records the contract would not publish, still kept and shown as published: no time, no row, and
    # several with the same (time, row, sequence), which only their event ids tell apart.
    odd = [{**status(cid, 9, 100, "waiting", None, 0), "event_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{cid}{n}")),
            "message_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{cid}m{n}")), "occurred_at": None, "row": None}
           for n in range(5)]
    apply_shuffled(model, events, statuses + odd, seed=4)
    history = model.history(cid)
    assert sorted(h["event_id"] for h in history) == sorted(r["event_id"] for r in events + statuses + odd)
    by_id = {r["event_id"]: r for r in events + statuses + odd}
    assert all(h == by_id[h["event_id"]] for h in history)  # None stays None
    assert [h["event_id"] for h in history[:5]] == sorted(r["event_id"] for r in odd)  # no time: first
    bounded = list(model.iter_history(cid, until=at(10)))
    assert bounded == [h for h in history if (h["occurred_at"] or "") <= at(10)]


def test_history_pages_are_index_range_scans_on_sqlite(tmp_path):
    # A page ordered on expressions (COALESCE) re-sorted all of the campaign's records for each page.
    with ReadModel(tmp_path / "read-model.db") as model:
        for until in (None, at(10)):
            for after in (None, (at(1), 2, 100, str(uuid.uuid4()))):
                sql, params = model._status_page(str(uuid.uuid4()), until, after)
                plan = model.explain(sql, params)
                assert any("USING INDEX message_events_by_time" in line for line in plan), plan
                assert not any("TEMP B-TREE" in line for line in plan), plan


def test_as_of_shows_the_campaign_and_messages_as_they_stood(model):
    cid = str(uuid.uuid4())
    events, statuses = campaign_records(cid)
    apply_shuffled(model, events, statuses, seed=2)
    assert model.as_of(cid, START - timedelta(seconds=1)) is None  # nothing had happened yet
    # Years before 1000 too: the time text is zero-padded ("0999-..."), so it sorts before "2024-...".
    ancient = datetime(999, 12, 31, 23, 59, tzinfo=timezone.utc)
    assert rfc3339(ancient) == "0999-12-31T23:59:00.000000Z" and rfc3339(datetime(1, 1, 1)) == \
        "0001-01-01T00:00:00.000000Z"
    assert model.as_of(cid, ancient) is None and list(model.iter_history(cid, until=ancient)) == []

    ready = model.as_of(cid, START + timedelta(seconds=5))
    assert ready["campaign"]["status"] == "ready" and ready["campaign"]["run_no"] is None
    assert ready["campaign"]["counts"]["waiting"] == 4 and ready["campaign"]["counts"]["total"] == 4
    assert [(m["row"], m["status"], m["destination"]) for m in ready["messages"]] == \
        [(row, "waiting", contact[0]) for row, contact in CONTACTS.items()]

    mid_run = model.as_of(cid, START + timedelta(seconds=12, microseconds=1))  # a string moment works too
    assert mid_run == model.as_of(cid, at(12.000001))
    assert mid_run["campaign"]["status"] == "in_progress" and mid_run["campaign"]["run_no"] == 1
    assert {m["row"]: m["status"] for m in mid_run["messages"]} == {2: "sent", 3: "sent", 4: "failed", 5: "sent"}
    assert mid_run["campaign"]["counts"]["sent"] == 3 and mid_run["campaign"]["counts"]["failed"] == 1
    sent = mid_run["messages"][0]
    assert (sent["updated_at"], sent["last_sequence"], sent["variables"]) == (at(12), 400, CONTACTS[2][1])

    after = model.as_of(cid, START + timedelta(hours=1))
    assert after["campaign"]["status"] == "complete_with_errors" and after["campaign"]["final"]
    live = model.campaign(cid)
    assert after["campaign"] == live and after["messages"] == model.messages(cid)
    assert model.as_of(str(uuid.uuid4()), START + timedelta(hours=1)) is None


def test_as_of_pages_filters_and_counts_in_sql_as_the_live_queries_do(model):
    cid, other = str(uuid.uuid4()), str(uuid.uuid4())
    for c in (cid, other):
        events, statuses = campaign_records(c)
        apply_shuffled(model, events, statuses, seed=5)
    mid_run = at(12)  # rows 2, 3, 5 sent, row 4 failed

    def rows(moment=mid_run, **kw):
        return [m["row"] for m in model.as_of_messages(cid, moment, **kw)]

    assert rows(status="sent") == [2, 3, 5] and rows(reason="invalid_destination") == [4]
    assert rows(status="failed", reason="invalid_destination") == [4] and rows(status="delivered") == []
    assert rows(search="ANN") == [2] and rows(search="zürich") == [2] and rows(search="5550101") == [3]
    assert rows(search="4") == [4] and rows(search=ids.message_id(cid, 5)) == [5] and rows(search="_%") == [5]
    assert rows(search="²") == [] and rows(search="  ") == [2, 3, 4, 5]
    assert rows(limit=2) == [2, 3] and rows(limit=2, offset=2) == [4, 5] and rows(offset=3) == [5]
    assert rows(status="sent", limit=1, offset=1) == [3] and rows(at(10.5), status="queued") == [2, 3, 4, 5]
    assert model.count_as_of_messages(cid, mid_run) == 4
    assert model.count_as_of_messages(cid, mid_run, status="sent") == 3
    assert model.count_as_of_messages(cid, mid_run, search="oslo") == 1
    assert model.count_as_of_messages(cid, at(0.5)) == 0 and rows(at(0.5)) == []  # before the contacts
    for batch_size in (1, 3, 1000):  # streamed in keyset pages: the same messages, each once
        assert list(model.iter_as_of_messages(cid, mid_run, batch_size=batch_size)) == \
            model.as_of_messages(cid, mid_run)
    assert list(model.iter_as_of_messages(cid, at(0.5))) == []
    [sent] = model.as_of_messages(cid, START + timedelta(seconds=12), search="ann")  # a datetime works too
    assert (sent["status"], sent["updated_at"], sent["last_sequence"], sent["variables"]) == \
        ("sent", at(12), 400, CONTACTS[2][1])

    campaign = model.as_of_campaign(cid, mid_run)
    assert campaign["status"] == "in_progress" and campaign["run_no"] == 1
    assert campaign["counts"] == {**{s: 0 for s in MESSAGE_STATUSES}, "total": 4, "sent": 3, "failed": 1}
    assert model.as_of_campaign(cid, mid_run, with_counts=False) == \
        {k: v for k, v in campaign.items() if k != "counts"}
    assert model.as_of_campaign(cid, START - timedelta(seconds=1)) is None
    assert model.as_of_campaign(str(uuid.uuid4()), mid_run) is None

    # After everything, every filter gives what the live queries give.
    after = at(3600)
    assert model.as_of_campaign(cid, after) == model.campaign(cid)
    for filters in ({}, {"status": "delivered"}, {"reason": "invalid_destination"}, {"search": "o"},
                    {"search": "3"}, {"status": "delivered", "search": "+1202", "limit": 1, "offset": 1},
                    {"offset": 2}, {"limit": 3}):
        assert model.as_of_messages(cid, after, **filters) == model.messages(cid, **filters), filters
        counted = {k: v for k, v in filters.items() if k not in ("limit", "offset")}
        assert model.count_as_of_messages(cid, after, **counted) == model.count_messages(cid, **counted), filters


def test_as_of_on_a_large_campaign_keeps_memory_bounded(tmp_path):
    """50,000 messages: the counts, a page, its total and a search are computed by the database; one dict per
    message (what as_of used to build for every request) would take tens of MiB."""
    cid = str(uuid.uuid4())
    n = 50_000
    with ReadModel(tmp_path / "read-model.db") as model:
        events, _ = campaign_records(cid)
        model.apply_batch(events, [])
        for start in range(2, n + 2, 10_000):
            batch = []
            for row in range(start, min(start + 10_000, n + 2)):
                batch.append(waiting(cid, row, 1, f"+1202555{row:07d}", {"first_name": f"name{row}"}))
                if row % 2 == 0:
                    batch.append(status(cid, row, 200, "queued", "waiting", 10))
            model.apply_batch([], batch)

        tracemalloc.start()
        try:
            campaign = model.as_of_campaign(cid, at(11))
            page = model.as_of_messages(cid, at(11), status="queued", limit=100, offset=20_000)
            total = model.count_as_of_messages(cid, at(11), status="queued")
            found = model.as_of_messages(cid, at(11), search="NAME4999", limit=100)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert campaign["counts"]["total"] == n and campaign["counts"]["queued"] == n // 2
        assert [m["row"] for m in page] == list(range(40_002, 40_202, 2)) and total == n // 2
        assert [m["row"] for m in found] == [4999, *range(49_990, 49_999 + 1)]
        assert peak < 4 * 2**20, f"as_of peak {peak / 2**20:.1f} MiB"


def test_out_of_order_campaign_events_give_the_same_row(model):
    cid = str(uuid.uuid4())
    events, _ = campaign_records(cid)
    stop = event(cid, 35, "CampaignStopped", 11, stopped_by="carol", cancelled_count=0)
    model.apply_batch([events[-1]], [])  # the last status change first
    model.apply_batch(events[:-1][::-1] + [stop], [])  # the older ones, then a stop in between, late
    c = model.campaign(cid)
    assert (c["status"], c["stopped"], c["stopped_by"], c["run_no"], c["name"], c["last_sequence"]) == \
        ("complete_with_errors", True, "carol", 1, "Spring", 40)


def test_canonical_dump_is_the_same_for_any_delivery_order(model, tmp_path):
    cid = str(uuid.uuid4())
    events, statuses = campaign_records(cid)
    unknown = {**event(cid, 0, "CommandRejected", 0, command_id=str(uuid.uuid4()), command_type="RunCampaign",
                       reason="unknown_campaign", detail="")}
    apply_shuffled(model, events + [unknown], statuses, seed=3)
    with ReadModel(tmp_path / "in-order.db") as in_order:
        in_order.apply_batch(events + [unknown], statuses)
        dump = list(in_order.canonical_dump())
    assert list(model.canonical_dump()) == dump
    assert {table for table, _ in dump} == {"campaigns", "campaign_events", "messages", "message_events"}
    assert len(dump) == 1 + len(events) + 1 + len(CONTACTS) + len(statuses)
    assert model.row_counts() == {"campaigns": 1, "campaign_events": len(events) + 1, "messages": len(CONTACTS),
                                  "message_events": len(statuses)}


def test_a_postgresql_location_is_logged_without_its_password(postgres_dsn):
    # The password as a query parameter (the server trusts local connections, so it is ignored): the
    # projections log `location` at start, which used to show it.
    with ReadModel(fresh_postgres_database("outreach_rm") + "?password=hunter2&application_name=rm") as model:
        assert "hunter2" not in model.location and "password=***" in model.location
        assert model.count_campaigns() == 0  # and the model works
