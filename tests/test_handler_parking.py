"""Transient faults wait, poison is parked: the command handler's record loop (services/command_handler/app.py)
and the kernel's judgement of what is transient (services/common/retry.is_transient)."""
from __future__ import annotations

import errno
import sqlite3

import psycopg
import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from eventsourcing.persistence import ProgrammingError as StoreProgrammingError

from schemas import topics
from services.command_handler import app as handler_app
from services.command_handler.handlers import DeadLetter
from services.common.retry import is_transient


def wrapped(error: Exception, wrapper: type[Exception]) -> Exception:
    try:
        raise wrapper(str(error)) from error
    except Exception as exc:  # noqa: BLE001 - built for the test
        return exc


@pytest.mark.parametrize("error", [
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    TimeoutError(),
    OSError(errno.ENOSPC, "No space left on device"),
    psycopg.OperationalError("server closed the connection unexpectedly"),
    wrapped(psycopg.OperationalError("terminating connection due to administrator command"), StoreOperationalError),
    sqlite3.OperationalError("database is locked"),
    wrapped(sqlite3.OperationalError("database is locked"), StoreOperationalError),
    KafkaConnectionError(),
], ids=repr)
def test_a_store_or_broker_out_of_reach_is_transient(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    ValueError("a bug"),
    KeyError("message_id"),
    sqlite3.OperationalError("no such table: stored_events"),
    wrapped(sqlite3.OperationalError("no such table: x"), StoreOperationalError),
    wrapped(psycopg.ProgrammingError("syntax error"), StoreProgrammingError),
    FileNotFoundError(errno.ENOENT, "missing"),
    MessageSizeTooLargeError(),  # not retriable by the client library's own judgement
], ids=repr)
def test_a_bug_or_a_bad_record_is_not(error):
    assert not is_transient(error)


class FlakyHandler:
    """Raises the given errors in turn, then answers."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.calls = 0

    def handle(self, topic: str, raw: bytes | None) -> DeadLetter | None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return None


class Parked:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, dict]] = []

    async def publish(self, value: bytes, *, key: bytes | None, headers: dict) -> None:
        self.records.append((value, headers))


def record(topic: str = topics.SENDER_RESULTS) -> ConsumerRecord:
    return ConsumerRecord(topic=topic, partition=3, offset=42, timestamp=0, timestamp_type=0, key=b"k",
                          value=b'{"type": "SenderResults"}', checksum=None, serialized_key_size=1,
                          serialized_value_size=24, headers=())


async def test_a_store_outage_is_waited_out_without_limit_and_nothing_is_parked():
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    outage = [psycopg.OperationalError("connection refused")] * 25  # far more than TRIES_BEFORE_DLQ
    handler, parked = FlakyHandler(*outage), Parked()
    await handler_app._process(handler, parked, record(), sleep=sleep)
    assert handler.calls == 26 and parked.records == []
    assert max(waits) <= handler_app.TRANSIENT_LONGEST_WAIT_S and waits[-1] > waits[0]  # backing off


async def test_a_record_failing_for_another_reason_is_parked_with_its_source_after_a_few_tries():
    async def sleep(seconds: float) -> None:
        pass

    before = handler_app.PARKED[topics.SENDER_RESULTS]
    handler, parked = FlakyHandler(*[KeyError("message_id")] * 5), Parked()
    await handler_app._process(handler, parked, record(), sleep=sleep)
    assert handler.calls == handler_app.TRIES_BEFORE_DLQ
    [(value, headers)] = parked.records
    assert value == b'{"type": "SenderResults"}'
    assert headers["x-source-topic"] == topics.SENDER_RESULTS and headers["x-source-offset"] == "3:42"
    assert "KeyError" in headers["x-error"]
    assert handler_app.PARKED[topics.SENDER_RESULTS] == before + 1  # counted for the alarm


async def test_a_transient_fault_between_failures_does_not_use_up_the_tries():
    async def sleep(seconds: float) -> None:
        pass

    handler = FlakyHandler(KeyError("x"), psycopg.OperationalError("down"), psycopg.OperationalError("down"),
                           KeyError("x"))
    parked = Parked()
    await handler_app._process(handler, parked, record(), sleep=sleep)
    assert parked.records == [] and handler.calls == 5
