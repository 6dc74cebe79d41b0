"""The one retry policy for infrastructure (the broker, the event store, a database, a provider's network):
exponential back-off with jitter, from stamina (a well-kept wrapper of tenacity).

A transient fault is waited out, never dead-lettered: `timeout_s=None` retries until it passes (a
service's loop, which a stop interrupts), a number bounds it (start-up, a CLI call) and re-raises the last
error. Each retry is logged by stamina (logger "stamina", with the error and the wait).

    async for attempt in retrying(on=is_transient, timeout_s=30):  # is_transient: below
        with attempt:
            await connect()

    for attempt in retrying(on=sqlite3.OperationalError, timeout_s=None):
        with attempt:
            store.save(batch)
"""
from __future__ import annotations

import errno
import random
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import stamina
from aiokafka.errors import KafkaError
from eventsourcing.persistence import ConnectionUnavailableError

FIRST_WAIT_S = 0.05
LONGEST_WAIT_S = 2.0

Retryable = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


def retrying(
    on: Retryable,
    *,
    timeout_s: float | None,
    attempts: int | None = None,
    first_wait_s: float = FIRST_WAIT_S,
    longest_wait_s: float = LONGEST_WAIT_S,
) -> Any:
    """An iterator (sync and async) of attempts: retry while the error matches `on` (an exception type, a
    tuple of them, or a predicate), until `timeout_s` (None: no limit) or `attempts` (None: no limit).
    The wait doubles from `first_wait_s` up to `longest_wait_s`, each plus up to `first_wait_s` of jitter."""
    return stamina.retry_context(
        on=on,
        attempts=attempts,
        timeout=timeout_s,
        wait_initial=first_wait_s,
        wait_max=longest_wait_s,
        wait_jitter=first_wait_s,
    )


def backoff_s(failures: int, *, first_wait_s: float = FIRST_WAIT_S, longest_wait_s: float = LONGEST_WAIT_S) -> float:
    """The policy's wait after `failures` failures in a row (1, 2, ...), for a retry that is not a loop here
    (a batch rewound and delivered again): the wait doubles from `first_wait_s`, plus up to `first_wait_s` of
    jitter, at most `longest_wait_s` (what `retrying` waits, by tenacity's exponential-with-jitter rule)."""
    return min(first_wait_s * 2 ** (failures - 1) + random.uniform(0, first_wait_s), longest_wait_s)



# What a store or the network says while it is down or busy; anything else from them is not waited out.
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
                                 errno.ENETUNREACH, errno.ETIMEDOUT, errno.EPIPE, errno.ENOSPC, errno.EAGAIN})
_SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy", "unable to open database",
                "disk i/o error")


def is_transient(exc: BaseException) -> bool:
    """A fault that passes by itself, the store or the broker unavailable or busy: a consumer waits it out
    without limit (consumption paused) and never parks the record. It is judged on the error and on what
    caused it (the event store wraps its driver's errors)."""
    for error in _causes(exc):
        if isinstance(error, (ConnectionError, TimeoutError, ConnectionUnavailableError)):
            return True
        if isinstance(error, OSError) and error.errno in _UNREACHABLE_ERRNOS:
            return True
        if isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
            return True  # connection lost, server shutting down, pool exhausted, serialization or deadlock
        if isinstance(error, sqlite3.OperationalError) and any(m in str(error).lower() for m in _SQLITE_BUSY):
            return True
        if isinstance(error, KafkaError) and error.retriable:
            return True
    return False


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
