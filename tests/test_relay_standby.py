"""The relay runs active and standby (issue 11): one holds the deployment's relay lock and publishes, the other
takes over from the saved checkpoint once the first one is gone. On both stores (a file lock beside SQLite, an
advisory lock in PostgreSQL), against the session's broker."""
from __future__ import annotations

import asyncio
import uuid

import psycopg

from schemas import topics
from services.common.leader import AdvisoryLock, FileLock
from services.common.settings import get_settings
from tests.conftest import async_wait_until
from tests.e2e_support import ALL_TRUE, Tail
from tests.handler_driver import Driver
from tests.test_handler_app import ready_sms_campaign


def test_a_file_lock_is_held_by_one_holder_until_released(tmp_path):
    first, second = FileLock(tmp_path / "relay.lock"), FileLock(tmp_path / "relay.lock")
    assert first.try_acquire() and first.try_acquire()  # held: asking again keeps it
    assert not second.try_acquire() and not second.still_held()
    first.release()
    assert second.try_acquire() and second.still_held()
    second.release()


def test_an_advisory_lock_is_lost_with_its_session(postgres_dsn):
    name = f"test:{uuid.uuid4()}"
    first, second = AdvisoryLock(postgres_dsn, name), AdvisoryLock(postgres_dsn, name)
    assert first.try_acquire() and first.still_held()
    assert not second.try_acquire()
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:  # the holder's connection dies
        holder = admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s "
            "AND objsubid = 1", ((first.key >> 32) & 0xFFFFFFFF, first.key & 0xFFFFFFFF)).fetchone()
        assert holder is not None  # the lock as PostgreSQL shows it (a bigint key: high and low 32 bits)
        admin.execute("SELECT pg_terminate_backend(%s)", holder)
    assert not first.still_held()  # it stands down
    assert second.try_acquire()
    second.release()


async def test_the_standby_relay_takes_over_from_the_checkpoint(event_store_env, monkeypatch, tmp_path,
                                                                 kafka_bootstrap):
    """Relays on the session's broker (their campaigns are their own: the store is fresh)."""
    from services.command_handler.relay import Relay

    for key, value in event_store_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OUTREACH_DATA_DIR", str(tmp_path))
    settings = get_settings()
    active, standby = Relay(settings), Relay(settings)
    tail = await Tail(settings, topics.CAMPAIGN_EVENTS).start()
    stop_active, stop_standby = asyncio.Event(), asyncio.Event()
    runs = [asyncio.create_task(active.run(stop_active))]
    try:
        d = Driver(active.app)
        first = ready_sms_campaign(d, n=2)
        await async_wait_until(lambda: tail.campaign_events(first), 30, message="the active relay published nothing")
        runs.append(asyncio.create_task(standby.run(stop_standby)))
        await asyncio.sleep(1.5)  # three of the standby's tries for the lock
        assert standby.checkpoint.position == 0  # it stood by, it did not publish

        stop_active.set()  # the active relay goes (its lock with it)
        await runs[0]
        second = ready_sms_campaign(d, n=2)
        d.send("RunCampaign", second, disclaimer=ALL_TRUE)
        await async_wait_until(lambda: any(e["type"] == "CampaignRunStarted" for e in tail.campaign_events(second)),
                               30, message="the standby did not take over")
        assert standby.checkpoint.position > active.checkpoint.position
        # It started where the first one stopped: nothing of the first campaign twice.
        ids = [e["event_id"] for e in tail.values(topics.CAMPAIGN_EVENTS)
               if isinstance(e, dict) and e.get("campaign_id") == first]
        assert len(ids) == len(set(ids))
    finally:
        stop_active.set()
        stop_standby.set()
        await asyncio.gather(*runs, return_exceptions=True)
        await tail.stop()
        await active.close()
        await standby.close()
