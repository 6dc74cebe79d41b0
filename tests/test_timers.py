"""The sweeper's durable timers (no broker): started at the contract's transitions, lapsing when the
message moves on, surviving a restart, applied once per record."""
from __future__ import annotations

from services.timeout_sweeper.app import expiry_record
from services.timeout_sweeper.timers import TimeoutSettings, TimerStore

T = TimeoutSettings(sending_s=10, sent_s=20, retry_window_s=30)


def rec(seq: int, status: str, previous: str | None, mid: str = "m1") -> tuple[dict, float]:
    return ({"message_id": mid, "campaign_id": "c1", "sequence": seq, "status": status,
             "previous_status": previous}, 1000.0 + seq / 100)


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
    store.apply([rec(200, "sending", "queued"), rec(200, "sending", "queued", mid="m2")], T)
    due = store.due(10_000)
    store.apply([rec(400, "sent", "sending", mid="m2")], T)  # m2 moved on after the timer was read
    store.fired(due)
    assert store.get("m1") is None and store.get("m2").kind == "sent"
    expiry = expiry_record(due[0])
    assert expiry == expiry_record(due[0]) and expiry["kind"] == "sending"  # a re-fire has the same expiry_id


def test_many_pending_timers_are_rows_not_tasks(tmp_path):
    store = TimerStore(tmp_path / "t.db")
    store.apply([rec(200, "sent", "sending", mid=f"m{i}") for i in range(20_000)], T)
    assert store.pending() == 20_000 and len(store.due(10_000, limit=1000)) == 1000
