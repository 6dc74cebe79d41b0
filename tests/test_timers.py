"""The sweeper's durable timers (no broker): started at the contract's transitions, lapsing when the
message moves on, surviving a restart, applied once per record."""
from __future__ import annotations

import sqlite3
import threading
import uuid
from datetime import datetime, timezone

import pytest

from services.common import jsoncodec
from services.timeout_sweeper.app import expiry_record, parse_status
from services.timeout_sweeper.timers import StatusRecord, TimeoutSettings, TimerStore
from tests.conftest import fresh_postgres_database

T = TimeoutSettings(sending_s=10, sent_s=20, retry_window_s=30)
# Wire ids where a test builds Expiry records (validated): the other tests use readable names.
CAMPAIGN, M1, M2, MAIL, SMS = (str(uuid.uuid5(uuid.NAMESPACE_OID, name)) for name in ("c1", "m1", "m2", "mail", "sms"))


def rec(seq: int, status: str, previous: str | None, mid: str = "m1", channel: str = "sms") -> StatusRecord:
    """A parsed status record (readable ids: the store takes records already validated by parse_status)."""
    return StatusRecord(message_id=mid, campaign_id=CAMPAIGN, channel=channel, sequence=seq, status=status,
                        previous_status=previous,
                        occurred_at=datetime.fromtimestamp(1000.0 + seq / 100, timezone.utc))


def test_timers_follow_the_lifecycle(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(200, "sending", "queued")], T)
    assert (store.get("m1").kind, store.get("m1").due) == ("sending", 1002.0 + 10)
    store.apply([rec(300, "sending", "sending")], T)  # a failed pre-send attempt: the limit runs from the claim
    assert (store.get("m1").since_sequence, store.get("m1").due) == (300, 1012.0)
    store.apply([rec(400, "sent", "sending")], T)
    assert (store.get("m1").kind, store.get("m1").due) == ("sent", 1004.0 + 20)
    store.apply([rec(500, "delivered", "sent")], T)
    assert store.get("m1") is None and store.pending() == 0


def test_retry_window_runs_from_the_first_deferral(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(200, "sending", "queued"), rec(300, "retrying", "sending"), rec(400, "retrying", "retrying")], T)
    assert (store.get("m1").kind, store.get("m1").due, store.get("m1").since_sequence) == ("retry_window", 1033.0, 400)


def test_records_apply_once_in_sequence_order_and_survive_a_restart(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(400, "sent", "sending"), rec(200, "sending", "queued")], T)  # out of order in one batch
    assert store.get("m1").kind == "sent"
    store.apply([rec(200, "sending", "queued")], T)  # redelivered: changes nothing
    assert store.get("m1").kind == "sent"
    store.close()
    reopened = TimerStore(tmp_path / "t.db")
    assert reopened.get("m1").kind == "sent" and reopened.due(10_000)[0].message_id == "m1"
    assert reopened.due(1000.0) == []  # not early


def test_a_fired_timer_is_forgotten_only_if_unchanged(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(200, "sending", "queued", mid=M1), rec(200, "sending", "queued", mid=M2)], T)
    due = store.due(10_000)
    store.apply([rec(400, "sent", "sending", mid=M2)], T)  # m2 moved on after the timer was read
    store.fired(due, T)
    assert store.get(M1) is None and store.get(M2).kind == "sent"
    expiry = expiry_record(due[0])
    assert expiry == expiry_record(due[0]) and expiry.kind == "sending"  # a re-fire has the same expiry_id


def test_many_pending_timers_are_rows_not_tasks(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(200, "sent", "sending", mid=f"m{i}") for i in range(20_000)], T)
    assert store.pending() == 20_000 and len(store.due(10_000, limit=1000)) == 1000


def test_an_accepted_email_gets_the_retry_window_when_its_sending_timer_fires(tmp_path):
    """Acceptance makes no status record: the fired Sending timer of an email is re-armed as its
    accepted-without-outcome window (same since_sequence, from the Sending deadline); an SMS's is forgotten."""
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(200, "sending", "queued", mid=MAIL, channel="email"),
                 rec(200, "sending", "queued", mid=SMS, channel="sms")], T)
    due = store.due(1012.0)
    assert {t.message_id for t in due} == {MAIL, SMS}
    store.fired(due, T)
    window = store.get(MAIL)
    assert (window.kind, window.since_sequence, window.due) == ("retry_window", 200, 1002.0 + 10 + 30)
    assert store.get(SMS) is None
    assert store.due(1041.9) == [] and [t.kind for t in store.due(1042.0)] == ["retry_window"]
    expiry = expiry_record(window)
    assert (expiry.kind, expiry.since_sequence) == ("retry_window", 200)
    assert expiry.expiry_id != expiry_record(due[0] if due[0].message_id == MAIL else due[1]).expiry_id
    store.fired([window], T)  # the window's own expiry: forgotten, not re-armed again
    assert store.pending() == 0


def test_the_re_armed_window_lapses_when_the_email_moves_on(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    for mid in ("delivered", "deferred", "timed_out"):
        store.apply([rec(200, "sending", "queued", mid=mid, channel="email")], T)
    store.fired(store.due(1012.0), T)
    store.apply([rec(300, "delivered", "sending", mid="delivered", channel="email"),
                 # the first deferral after acceptance: the retry window runs from it, not from the Sending deadline
                 rec(300, "retrying", "sending", mid="deferred", channel="email"),
                 rec(300, "failed", "sending", mid="timed_out", channel="email")], T)
    assert store.get("delivered") is None and store.get("timed_out") is None
    deferred = store.get("deferred")
    assert (deferred.kind, deferred.since_sequence, deferred.due) == ("retry_window", 300, 1003.0 + 30)


def test_a_timer_that_moved_on_before_it_was_marked_fired_is_not_re_armed(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(200, "sending", "queued", channel="email")], T)
    due = store.due(1012.0)
    store.apply([rec(300, "retrying", "sending", channel="email")], T)  # the deferral came while firing
    store.fired(due, T)
    current = store.get("m1")
    assert (current.kind, current.since_sequence, current.due) == ("retry_window", 300, 1003.0 + 30)


def test_a_data_dir_from_before_the_channel_column_still_opens(tmp_path):
    path = tmp_path / "t.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE timers (message_id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL, kind TEXT NOT NULL,"
                " since_sequence INTEGER NOT NULL, due REAL NOT NULL)")
    old.execute("INSERT INTO timers VALUES ('old', 'c1', 'sending', 100, 1010.0)")
    old.commit()
    old.close()
    store = TimerStore(path)
    [pending] = store.due(2000.0)
    assert (pending.message_id, pending.channel) == ("old", "")
    # Channel unknown: it may be an email the provider accepted, so its window is armed (the handler
    # ignores a window for an SMS, which its Sending expiry has failed already).
    store.fired([pending], T)
    rearmed = store.get("old")
    assert (rearmed.kind, rearmed.since_sequence, rearmed.due) == ("retry_window", 100, 1010.0 + 30)
    store.apply([rec(200, "sending", "queued", channel="email")], T)
    assert store.pending() == 2 and store.get("m1").channel == "email"


def test_unreadable_status_records_are_skipped():
    good = {"message_id": M1, "campaign_id": CAMPAIGN, "channel": "sms", "sequence": 20, "status": "sent",
            "previous_status": "sending", "occurred_at": "2024-01-01T00:00:00+00:00"}
    assert parse_status(jsoncodec.dumps(good))["occurred_at"].timestamp() == 1704067200.0
    assert parse_status(jsoncodec.dumps({**good, "event_id": M2, "row": 2})) is not None  # the rest is ignored
    for bad in (b"not json", None, b"[]", jsoncodec.dumps({**good, "sequence": "20"}),
                jsoncodec.dumps({**good, "occurred_at": "yesterday"}),
                jsoncodec.dumps({k: v for k, v in good.items() if k != "message_id"})):
        assert parse_status(bad) is None


def test_applying_and_firing_from_two_threads_keeps_every_transaction_whole(tmp_path):
    """The sweeper folds records in a worker thread while its event loop fires timers on the same connection."""
    store = TimerStore(tmp_path / "t.db")
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            for n in range(200):
                store.apply([rec(200 + n, "sending", "queued", mid=f"m{n}-{i}", channel="email")
                             for i in range(50)], T)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=follow)
    thread.start()
    fired = 0
    while thread.is_alive():
        due = store.due(1020.0, limit=100)  # Sending deadlines (<= 1014), not the re-armed windows (>= 1042)
        store.fired(due, T)
        fired += len(due)
    thread.join()
    assert errors == [] and fired > 0
    kinds = [t.kind for t in store.due(10_000, limit=20_000)]
    assert len(kinds) == 200 * 50  # every email's timer is there: none lost
    assert kinds.count("retry_window") == fired and kinds.count("sending") == 200 * 50 - fired


# ---------------------------------------------------------------- shared by several sweepers (issue 11)

@pytest.fixture(params=["sqlite", "postgres"])
def shared(request, tmp_path):
    """Two TimerStore connections on one shared store, as two sweeper instances have: (first, second)."""
    if request.param == "sqlite":
        stores = [TimerStore(tmp_path / "shared.timers.db") for _ in range(2)]
    else:
        request.getfixturevalue("postgres_dsn")
        from services.common.settings import Settings
        settings = Settings(event_store="postgres", postgres_dsn=fresh_postgres_database())
        stores = [TimerStore.open(settings) for _ in range(2)]
    yield stores
    for store in stores:
        store.close()


def test_two_sweepers_never_take_the_same_due_timer_until_its_lease_ends(shared):
    first, second = shared
    first.apply([rec(200, "sent", "sending", mid=f"m{n}") for n in range(10)], T)
    taken = first.take_due(5000.0, lease_s=10, limit=6)
    rest = second.take_due(5000.0, lease_s=10)
    assert len(taken) == 6 and len(rest) == 4
    assert {t.message_id for t in taken}.isdisjoint(t.message_id for t in rest)
    assert second.take_due(5005.0, lease_s=10) == []  # all leased
    second.fired(rest, T)  # published: forgotten
    # The first sweeper died before `fired`: once its lease ends, the second fires them.
    assert {t.message_id for t in second.take_due(5010.5, lease_s=10)} == {t.message_id for t in taken}
    assert second.pending() == 6


def test_a_batch_applied_late_by_a_partitions_previous_owner_changes_nothing(shared):
    """A partition moved: the new owner applied newer records; the old one's batch lands after it."""
    old_owner, new_owner = shared
    new_owner.apply([rec(200, "sending", "queued"), rec(400, "sent", "sending")], T)
    old_owner.apply([rec(200, "sending", "queued")], T)
    assert (new_owner.get("m1").kind, new_owner.get("m1").since_sequence) == ("sent", 400)
    new_owner.apply([rec(500, "delivered", "sent")], T)
    old_owner.apply([rec(400, "sent", "sending")], T)  # redelivered to the old owner: the timer stays gone
    assert new_owner.get("m1") is None and new_owner.pending() == 0


def test_a_sweepers_own_timers_file_is_imported_into_the_shared_store(shared, tmp_path):
    own = TimerStore(tmp_path / "timers.db")
    own.apply([rec(200, "sent", "sending", mid="pending"), rec(200, "sent", "sending", mid="m1")], T)
    own.close()
    first, _ = shared
    first.apply([rec(300, "delivered", "sent")], T)  # the shared store saw m1 move on
    assert first.import_local(tmp_path / "timers.db") == 1
    assert [t.message_id for t in first.due(10_000)] == ["pending"]  # m1 moved on since: no stale timer
