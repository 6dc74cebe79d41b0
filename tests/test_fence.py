"""The hand-off fence (services/common/fence.py) on both stores: every change is a compare-and-set, so only
one taker wins, a rewind never reopens a row, and a message closed under a claim is never taken under it."""
from __future__ import annotations

import threading
import uuid

import pytest

from services.common.fence import CLOSED, HANDED_OFF, OPEN, ClaimedMessage, HandoffFence, open_fence
from services.common.settings import Settings

NOW = 1_000.0
DEADLINE = NOW + 600


@pytest.fixture
def fence_settings(event_store_env, tmp_path) -> Settings:
    kind = event_store_env["OUTREACH_EVENT_STORE"]
    if kind == "postgres":
        return Settings(event_store="postgres", postgres_dsn=event_store_env["OUTREACH_POSTGRES_DSN"],
                        data_dir=tmp_path)
    return Settings(event_store="sqlite", sqlite_path=event_store_env["OUTREACH_SQLITE_PATH"], data_dir=tmp_path)


@pytest.fixture
def fence(fence_settings):
    opened = open_fence(fence_settings)
    yield opened
    opened.close_connection()


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def open_claim(fence: HandoffFence, messages: list[str], claim_id: str, version: int = 1,
               deadline: float = DEADLINE, campaign_id: str = "c1", submissions: int = 0) -> None:
    fence.open_claim(campaign_id=campaign_id, claim_id=claim_id, claim_version=version, deadline=deadline,
                     messages=[ClaimedMessage(m, submissions) for m in messages])


def test_a_claim_is_taken_once_and_counts_its_submissions(fence):
    messages = ids(3)
    open_claim(fence, messages, "claim-1", submissions=2)
    assert fence.take("claim-1", messages[:2], NOW) == {messages[0]: 3, messages[1]: 3}
    assert fence.take("claim-1", messages, NOW) == {messages[2]: 3}  # the first two are taken already
    assert fence.take("claim-1", messages, NOW) == {}
    assert fence.row(messages[0])["state"] == HANDED_OFF


def test_only_the_claim_the_message_is_sending_under_may_take_it_and_only_before_its_deadline(fence):
    [m] = ids(1)
    open_claim(fence, [m], "claim-1", deadline=NOW + 5)
    assert fence.take("another-claim", [m], NOW) == {}
    assert fence.take("claim-1", [m], NOW + 5) == {}  # at the deadline: too late
    assert fence.take("claim-1", [m], NOW + 4.9) == {m: 1}


def test_a_definite_presend_error_gives_the_message_back_and_a_final_one_closes_it(fence):
    [m] = ids(1)
    open_claim(fence, [m], "claim-1")
    assert fence.take("claim-1", [m], NOW) == {m: 1}
    fence.give_back("claim-1", [m])
    assert fence.row(m)["state"] == OPEN
    assert fence.take("claim-1", [m], NOW) == {m: 2}  # the retry is submission 2
    fence.close("claim-1", [m])
    fence.give_back("claim-1", [m])  # only a handed-off message can be given back
    assert fence.row(m)["state"] == CLOSED
    assert fence.take("claim-1", [m], NOW) == {}


def test_a_newer_claim_replaces_the_row_and_an_older_one_never_reopens_it(fence):
    [m] = ids(1)
    open_claim(fence, [m], "claim-1", version=10)
    assert fence.take("claim-1", [m], NOW) == {m: 1}
    open_claim(fence, [m], "claim-1", version=10)  # the relay publishes the same claim again
    open_claim(fence, [m], "claim-0", version=3)  # a rewind over an older claim
    assert fence.row(m)["state"] == HANDED_OFF and fence.row(m)["claim_id"] == "claim-1"
    assert fence.take("claim-1", [m], NOW) == {} and fence.take("claim-0", [m], NOW) == {}
    open_claim(fence, [m], "claim-2", version=20, submissions=1)  # a retry re-queued and claimed it again
    assert fence.take("claim-1", [m], NOW) == {}
    assert fence.take("claim-2", [m], NOW) == {m: 2}


def test_the_handler_closes_what_nobody_took_and_knows_it(fence):
    taken, waiting, other_campaign = ids(3)
    open_claim(fence, [taken, waiting], "claim-1")
    open_claim(fence, [other_campaign], "claim-9", campaign_id="c2")
    fence.take("claim-1", [taken], NOW)
    assert fence.close_open_of_campaign("c1", closed_by="hold-1") == {waiting}
    assert fence.close_open_of_campaign("c1", closed_by="hold-1") == {waiting}  # decided again: same answer
    assert fence.close_open_of_campaign("c1", closed_by="hold-2") == set()
    assert fence.take("claim-1", [waiting], NOW) == {}
    assert fence.row(other_campaign)["state"] == OPEN
    assert fence.close_if_open(other_campaign, closed_by="expiry-1") == (True, 0)
    assert fence.close_if_open(other_campaign, closed_by="expiry-1") == (True, 0)
    assert fence.close_if_open(taken, closed_by="expiry-2") == (False, 1)  # handed off: it may be at the provider
    assert fence.close_if_open("never-claimed", closed_by="expiry-3") == (False, None)


def test_two_senders_racing_for_the_same_claim_hand_each_message_off_once(fence_settings):
    """Two fences (two processes' connections) take the same 300 messages at once from 8 threads each."""
    messages = ids(300)
    first, second = open_fence(fence_settings), open_fence(fence_settings)
    try:
        open_claim(first, messages, "claim-1")
        won: list[dict[str, int]] = []
        lock = threading.Lock()

        def take_all(fence: HandoffFence, offset: int) -> None:
            for start in range(offset, len(messages), 10):
                got = fence.take("claim-1", messages[start:start + 10], NOW)
                with lock:
                    won.append(got)

        threads = [threading.Thread(target=take_all, args=(fence, n % 2)) for n in range(16)
                   for fence in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        taken = [m for got in won for m in got]
        assert sorted(taken) == sorted(messages)  # every message once, none twice
        assert all(n == 1 for got in won for n in got.values())
    finally:
        first.close_connection()
        second.close_connection()


def test_a_connection_lost_to_a_postgresql_restart_fails_one_call_and_the_next_connects_again(postgres_dsn, tmp_path):
    """A PostgreSQL restart kills the fence's connection for good: the call in flight raises a transient
    error (its caller waits and tries again) and the next call connects anew. (An SQLite file has no server
    to lose.)"""
    import psycopg

    from tests.conftest import fresh_postgres_database

    fence_settings = Settings(event_store="postgres", postgres_dsn=fresh_postgres_database(), data_dir=tmp_path)

    from services.common.retry import is_transient

    fence = open_fence(fence_settings)
    try:
        [m] = ids(1)
        open_claim(fence, [m], "claim-1")
        with psycopg.connect(fence_settings.postgres_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(psycopg.OperationalError) as lost:
            fence.take("claim-1", [m], NOW)
        assert is_transient(lost.value)
        assert fence.take("claim-1", [m], NOW) == {m: 1}  # nothing was taken by the failed call
    finally:
        fence.close_connection()
