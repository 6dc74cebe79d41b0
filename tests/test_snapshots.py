"""Snapshots and the command handler's bounded memory (issue 12, "Memory under load"), on both event stores.

- Every aggregate that grows (Campaign, MessageBlock, OptOutList, ChannelLock) is snapshotted: loaded from
  its latest snapshot plus the later events it equals the aggregate replayed from its first event, and every
  snapshot equals the replay up to its version.
- Events stored before snapshots existed still load, and get snapshots from then on.
- The aggregate cache and the message indexes stay within their bounds however many campaigns and blocks
  pass through, and the use cases still decide right when what they need was dropped.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from eventsourcing.application import project_aggregate

from schemas import topics
from services.common import ids
from services.common.settings import get_settings
from services.command_handler import application
from services.command_handler.application import BoundedAggregateCache, MessageIndex, OutreachApp
from services.command_handler.domain.model import Campaign, ChannelLock, DestinationSet, MessageBlock, OptOutList
from tests.handler_driver import Driver, sender_result

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}
# Small intervals, so a short story takes several snapshots of every aggregate.
INTERVALS = {Campaign: 4, MessageBlock: 3, OptOutList: 2, ChannelLock: 2}


def open_app(event_store_env: dict[str, str], monkeypatch, **env: str) -> OutreachApp:
    for key, value in event_store_env.items():
        monkeypatch.setenv(key, value)
    return OutreachApp(get_settings(), env=env or None)


@pytest.fixture
def small_intervals(monkeypatch) -> None:
    monkeypatch.setattr(OutreachApp, "snapshotting_intervals", INTERVALS)


def contacts(start: int, n: int, row0: int = 2) -> list[dict]:
    return [{"row": row0 + i, "destination": f"+1{200 + i % 700}{600 + i // 700:03d}{i % 10000:04d}",
             "variables": {"name": f"P{i}"}} for i in range(start, start + n)]


def create_campaign(d: Driver, total: int, *, chunk: int = 1000, odd_rows: bool = False) -> str:
    """A ready SMS campaign of `total` contacts in chunks; `odd_rows`: the second chunk also brings an
    invalid destination and a duplicate (so the chunk answers keep invalid rows)."""
    cid = str(uuid.uuid4())
    d.send("CreateCampaign", cid, name="snap", channel="sms", template={"body": "Hi {{name}}"})
    starts = list(range(0, total, chunk))
    for n, start in enumerate(starts):
        rows = contacts(start, min(chunk, total - start))
        if odd_rows and n == 1:
            rows[-2:] = [{"row": rows[-2]["row"], "destination": "not a number", "variables": {}},
                         {"row": rows[-1]["row"], "destination": rows[0]["destination"], "variables": {}}]
        [answer, *_] = d.send("AddContacts", cid, chunk_no=n, contacts=rows, last_chunk=n == len(starts) - 1)
        assert answer["type"] == "ContactsAdded", answer
    return cid


def claimed_items(d: Driver) -> list[dict]:
    return [i for r in d.new_records() if r["topic"] == topics.SENDER_WORK for i in r["value"]["items"]]


def claim_all(app: OutreachApp, d: Driver, cid: str, size: int = 700) -> list[dict]:
    d.new_records()
    items: list[dict] = []
    while app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=size):
        items += claimed_items(d)
    return items


def deliver(app: OutreachApp, items: list[dict], cid: str, batch: int = 1000) -> None:
    for start in range(0, len(items), batch):
        app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=[
            sender_result(i["message_id"], outcome) for i in items[start:start + batch]
            for outcome in ("accepted", "sent", "delivered")])


def first_part(app: OutreachApp) -> tuple[Driver, str, list[dict]]:
    """Opt-outs, a campaign of three blocks (with invalid rows), a template change, the run, two claims,
    results of every kind, an expiry and a provider hold."""
    d = Driver(app)
    for n, (destination, opted_out) in enumerate([("+12006000000", True), ("+12016000001", True),
                                                   ("+12016000001", False), ("+12026000002", True)]):
        app.apply_opt_out(opt_out_id=f"opt-{n}", channel="sms", destination=destination, opted_out=opted_out,
                          source="sms_stop" if opted_out else "sms_start")
    cid = create_campaign(d, 2300, odd_rows=True)
    [updated, *_] = d.send("UpdateTemplate", cid, template={"body": "Hello {{name}}!"})
    assert updated["type"] == "TemplateUpdated", updated
    [started, *_] = d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    assert started["type"] == "CampaignRunStarted" and started["suppressed_count"] == 2, started
    d.new_records()
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=700)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=700)
    items = claimed_items(d)
    assert len(items) == 1400
    deliver(app, items[:600], cid, batch=250)
    app.apply_results(result_id="refusals", campaign_id=cid, results=[
        sender_result(items[600]["message_id"], "refused", provider_code="30003"),
        sender_result(items[601]["message_id"], "refused", provider_code="21610")])
    app.apply_results(result_id="accepted", campaign_id=cid, results=[
        sender_result(i["message_id"], "accepted") for i in items[602:1300]])
    late = items[1350]["message_id"]  # still `sending`: its timer at the Sending limit fires
    position, index = app._refs(app.repository.get(uuid.UUID(cid)))[late]
    app.apply_expiry(expiry_id="expiry-1", campaign_id=cid, message_id=late, kind="sending",
                     since_sequence=app.repository.get(ids.block_id(cid, position)).changed_at[index])
    for held in (True, False):
        app.apply_hold(hold_id=str(uuid.uuid4()), campaign_id=cid, provider="twilio", held=held, reason="outage")
    return d, cid, items


def second_part(app: OutreachApp, d: Driver, cid: str, items: list[dict]) -> str:
    """Stop, a retry of the cancelled and failed, every message delivered, a second campaign: its id."""
    [stopped, *_] = d.send("StopCampaign", cid, confirmed=True)
    assert stopped["type"] == "CampaignStopped" and stopped["cancelled_count"] > 0, stopped
    [retried, *_] = d.send("RetryFailedMessages", cid, include_cancelled=True)
    assert retried["type"] == "RetryStarted", retried
    deliver(app, claim_all(app, d, cid), cid)
    deliver(app, items[602:], cid)  # the first run's claims still out
    assert not app.campaign_view(cid)["holds_channel"], app.campaign_view(cid)
    other = create_campaign(d, 1200, chunk=200)  # six chunks: no snapshot while its contacts are open
    assert d.send("RunCampaign", other, disclaimer=ALL_TRUE)[0]["type"] == "CampaignRunStarted"
    deliver(app, claim_all(app, d, other), other)
    assert app.campaign_view(other)["status"] == "complete"
    return other


def state(aggregate) -> dict:
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


def replayed(app: OutreachApp, aggregate_id: uuid.UUID, lte: int | None = None):
    """The aggregate from its first stored event, no snapshot."""
    return project_aggregate(None, app.events.get(aggregate_id, lte=lte))


def aggregate_ids(app: OutreachApp, campaign_ids: list[str]) -> Iterator[uuid.UUID]:
    yield ids.opt_out_list_id("sms")
    yield ids.channel_lock_id("sms")
    for cid in campaign_ids:
        yield uuid.UUID(cid)
        for block_no in replayed(app, uuid.UUID(cid)).block_nos:
            yield ids.block_id(cid, block_no)


def check_snapshots(app: OutreachApp, event_store_env, monkeypatch, campaign_ids: list[str],
                    stored_before: dict[uuid.UUID, int] | None = None) -> dict[type, int]:
    """Every aggregate: it has a snapshot if a save reached a multiple of its interval (after `stored_before`,
    its version when snapshots began), each snapshot equals the replay to its version; loaded by a new
    application (latest snapshot + later events) it equals the full replay and the live application's.
    Returns, per type, how many aggregates were loaded from a snapshot *and* later events."""
    fresh = open_app(event_store_env, monkeypatch)
    with_later_events: dict[type, int] = {}
    try:
        for aggregate_id in aggregate_ids(app, campaign_ids):
            full = replayed(app, aggregate_id)
            snapshots = list(app.snapshots.get(aggregate_id))
            since = (stored_before or {}).get(aggregate_id, 0)
            if any(v % INTERVALS[type(full)] == 0 for v in range(since + 1, full.version + 1)):
                assert snapshots, f"no snapshot of {type(full).__name__} {aggregate_id} at version {full.version}"
            for snapshot in snapshots:
                restored = snapshot.mutate(None)
                assert state(restored) == state(replayed(app, aggregate_id, snapshot.originator_version))
                assert not isinstance(restored, Campaign) or restored.contacts_closed  # none while loading
            loaded = fresh.repository.get(aggregate_id)
            assert state(loaded) == state(full), type(full).__name__
            assert state(app.repository.get(aggregate_id)) == state(full)
            if snapshots and snapshots[-1].originator_version < full.version:
                with_later_events[type(full)] = with_later_events.get(type(full), 0) + 1
    finally:
        fresh.close()
    return with_later_events


def test_every_growing_aggregate_loads_from_its_snapshot_and_later_events_as_replayed(
        event_store_env, monkeypatch, small_intervals):
    app = open_app(event_store_env, monkeypatch)
    try:
        d, cid, items = first_part(app)
        other = second_part(app, d, cid, items)
        campaign = app.repository.get(uuid.UUID(cid))
        while campaign.version % INTERVALS[Campaign] == 0:  # some events after the campaign's last snapshot
            d.send("RunCampaign", cid, disclaimer=ALL_TRUE)  # refused: one more stored event
            campaign = app.repository.get(uuid.UUID(cid))
        later = check_snapshots(app, event_store_env, monkeypatch, [cid, other])
        assert later.get(Campaign) and later.get(MessageBlock), later
        restored = app.snapshots.get(uuid.UUID(cid), desc=True, limit=1)
        campaign = next(iter(restored)).mutate(None)
        assert all(isinstance(k, int) for k in campaign.chunk_answers)  # JSON keys restored
        assert len(campaign.destinations) == 0  # not kept once the contacts closed
    finally:
        app.close()


def test_events_stored_without_snapshots_still_load_and_get_snapshots_from_then_on(
        event_store_env, monkeypatch, small_intervals):
    before = open_app(event_store_env, monkeypatch, IS_SNAPSHOTTING_ENABLED="n")  # as stored before snapshots
    assert before.snapshots is None
    try:
        d, cid, items = first_part(before)
        stored = {aggregate_id: state(replayed(before, aggregate_id)) for aggregate_id in aggregate_ids(before, [cid])}
    finally:
        before.close()
    app = open_app(event_store_env, monkeypatch)
    try:
        for aggregate_id, expected in stored.items():
            assert not list(app.snapshots.get(aggregate_id))
            assert state(app.repository.get(aggregate_id)) == expected
        d = Driver(app)
        d.position = app.recorder.max_notification_id() or 0
        other = second_part(app, d, cid, items)
        later = check_snapshots(app, event_store_env, monkeypatch, [cid, other],
                                stored_before={i: s["_version"] for i, s in stored.items()})
        assert later.get(Campaign) and later.get(MessageBlock), later
    finally:
        app.close()


def test_the_handler_caches_stay_within_their_bounds(event_store_env, monkeypatch):
    """Campaigns of several blocks each, run to the end one after another: the aggregate cache never holds
    more than its aggregates and messages, the message indexes more than their messages (the last one always
    kept), and every message still ends delivered."""
    monkeypatch.setattr(application, "CACHED_AGGREGATES", 12)
    monkeypatch.setattr(application, "CACHED_MESSAGES", 2500)
    monkeypatch.setattr(application, "INDEXED_MESSAGES", 5000)
    app = open_app(event_store_env, monkeypatch)
    cache = app.repository.cache
    assert isinstance(cache, BoundedAggregateCache)
    peak = {"entries": 0, "messages": 0, "indexed": 0, "indexes": 0}

    def note() -> None:
        peak["entries"] = max(peak["entries"], len(cache))
        peak["messages"] = max(peak["messages"], cache.messages)
        peak["indexed"] = max(peak["indexed"], sum(map(len, app._indexes.values())))
        peak["indexes"] = max(peak["indexes"], len(app._indexes))
        assert cache.messages == sum(getattr(v, "cache_weight", 0) for v, _ in cache.cache.values())

    try:
        d = Driver(app)
        for _ in range(4):
            cid = create_campaign(d, 2600)
            note()
            assert d.send("RunCampaign", cid, disclaimer=ALL_TRUE)[0]["type"] == "CampaignRunStarted"
            note()
            items = claim_all(app, d, cid, size=900)
            note()
            for start in range(0, len(items), 400):
                deliver(app, items[start:start + 400], cid)
                note()
            view = app.campaign_view(cid)
            assert view["status"] == "complete" and view["counts"]["delivered"] == 2600, view
        assert peak["entries"] <= 12 and peak["messages"] <= 2500, peak
        assert peak["indexed"] <= 5000 and peak["indexes"] >= 1, peak
        assert len(app._indexes) == 1  # two 2,600-message indexes would be over 5,000
    finally:
        app.close()


class Weighted:
    def __init__(self, weight: int):
        self.cache_weight = weight


def test_bounded_cache_drops_least_recently_used_first_within_both_bounds():
    cache = BoundedAggregateCache(max_entries=5, max_messages=2500)
    assert cache and len(cache) == 0  # an empty cache is still used by the repository
    blocks = {n: Weighted(1000) for n in range(4)}
    small = {n: object() for n in range(10, 14)}
    for n, block in blocks.items():
        cache.put(n, block)
        assert cache.messages <= 2500
    assert [k for k in cache.cache] == [2, 3] and cache.messages == 2000
    cache.get(2)  # used: now the most recent
    for n, aggregate in small.items():
        cache.put(n, aggregate)
    assert len(cache) == 5 and list(cache.cache) == [2, 10, 11, 12, 13]  # 3 was the least recently used
    assert cache.get(2, evict=True) is blocks[2] and cache.messages == 0
    with pytest.raises(KeyError):
        cache.get(2)
    cache.put(99, Weighted(4000))  # heavier than the bound alone: kept, the others make room
    assert 99 in cache.cache and cache.messages == 4000


def test_message_index_answers_exactly_what_a_dict_of_the_ids_would(monkeypatch):
    cid = str(uuid.uuid4())
    blocks = [list(range(2, 1002)), list(range(1002, 1500, 2)), [5000]]
    expected = {ids.message_id(cid, row): (p, i) for p, rows in enumerate(blocks) for i, row in enumerate(rows)}
    for prefix in (None, lambda message_id: 7):  # then every id shares its prefix: found by its row alone
        if prefix is not None:
            monkeypatch.setattr(MessageIndex, "_prefix", staticmethod(prefix))
        index = MessageIndex(cid, blocks)
        assert len(index) == len(expected)
        for message_id, ref in list(expected.items())[::7] + list(expected.items())[-3:]:
            assert index.get(message_id) == ref and index[message_id] == ref and message_id in index
        for unknown in (ids.message_id(cid, 1003), ids.message_id(str(uuid.uuid4()), 2), "x" * 36, "", None,
                        ids.message_id(cid, 2).upper()):
            assert unknown not in expected
            assert index.get(unknown) is None and unknown not in index
        with pytest.raises(KeyError):
            index[str(uuid.uuid4())]


def test_destination_set_finds_exactly_what_was_added_and_survives_its_snapshot_form():
    added = DestinationSet()
    chunks = [[f"+1202555{n:04d}" for n in range(start, start + 300)] for start in range(0, 2100, 300)]
    for chunk in chunks:
        added.update(chunk)
    assert len(added) == 2100 and len(added.runs) <= 3  # merged as they came (7 chunks: 4 + 2 + 1)
    assert all(d in added for chunk in chunks for d in chunk[::37])
    assert "+12025559999" not in added and None not in added and "" not in added
    restored = DestinationSet.from_json(added.to_json())
    assert restored == added and "+12025550042" in restored
    replayed_again = DestinationSet()
    for chunk in chunks:
        replayed_again.update(chunk)
    assert replayed_again == added  # deterministic: a replay makes the same runs


def test_a_relay_page_holds_a_bounded_number_of_records(event_store_env, monkeypatch, tmp_path):
    """The run of a campaign stores one event per block of 1,000 status changes: a relay page stops once it
    holds PAGE_RECORDS records (one event at least), and the pages together publish every record once."""
    from services.command_handler import relay as relay_module
    from services.command_handler.checkpoint import Checkpoint
    from services.command_handler.relay import Relay

    monkeypatch.setattr(relay_module, "PAGE_RECORDS", 1500)  # and pages read fewer events once cut short
    for key, value in event_store_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OUTREACH_DATA_DIR", str(tmp_path))
    relay = Relay(get_settings())
    try:
        d = Driver(relay.app)
        cid = create_campaign(d, 4000)
        d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
        end = relay.app.recorder.max_notification_id()
        pages, statuses, limits = [], [], []
        while relay.checkpoint.position < end:
            position, records = relay._read_page()
            pages.append(len(records))
            limits.append(relay._page_size)
            statuses += [r.value["event_id"] for r in records if r.topic == topics.MESSAGE_STATUS]
            relay.checkpoint = Checkpoint(position=position)
        assert max(pages) < 1500 + 1000 + 10, pages  # stops after the event that passes the bound
        assert len(pages) >= 3 and len(statuses) == len(set(statuses)) >= 4000, pages
        assert min(limits) < relay_module.PAGE_SIZE, limits  # a page cut short: the next reads fewer events
    finally:
        relay.checkpoints.close()
        relay.app.close()


def test_a_save_of_many_megabytes_completes_on_postgres_and_conflicts_as_before(postgres_dsn, monkeypatch):
    """The run of a big campaign is one save of many MB: the library's one statement in psycopg's pipeline
    mode never completed it (the events table stayed locked); such a save goes row by row in one transaction,
    its notification ids in order, its conflicts still IntegrityErrors."""
    import threading

    from eventsourcing.persistence import IntegrityError, StoredEvent

    from services.command_handler.application import PostgresRecorder
    from tests.conftest import fresh_postgres_database

    app = open_app({"OUTREACH_EVENT_STORE": "postgres", "OUTREACH_POSTGRES_DSN": fresh_postgres_database()},
                   monkeypatch)
    try:
        assert isinstance(app.recorder, PostgresRecorder)
        state = b'{"changes":[' + b",".join(b'[%d,%d,"waiting","queued",null,null,0,1,false,true]' % (i, i + 2)
                                           for i in range(1000)) + b"]}"
        events = [StoredEvent(originator_id=uuid.uuid4(), originator_version=1, topic="tests:Big", state=state)
                  for _ in range(160)]  # about 8.6 MB (the pipeline hung from about 5)
        answer: list = []
        saving = threading.Thread(target=lambda: answer.append(app.recorder.insert_events(events)), daemon=True)
        saving.start()
        saving.join(120)
        assert answer and len(answer[0]) == 160 and answer[0] == list(range(answer[0][0], answer[0][0] + 160))
        with pytest.raises(IntegrityError):
            app.recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "tests:Big", state) for _ in range(30)]
                                       + events[:1])  # over 1 MB, the last one a conflict: nothing stored
        assert app.recorder.max_notification_id() == answer[0][-1]
        small = app.recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "tests:Big", b"{}")])  # the pipeline
        assert len(small) == 1 and small[0] > answer[0][-1]  # (a failed insert's ids are skipped, as ever)
    finally:
        app.close()
