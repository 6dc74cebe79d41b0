"""The one retry policy for infrastructure (the broker, the event store, a database, a provider's network):
exponential back-off with jitter, from stamina (a well-kept wrapper of tenacity).

A transient fault is waited out, never dead-lettered: `timeout_s=None` retries until it passes (a
service's loop, which a stop interrupts), a number bounds it (start-up, a CLI call) and re-raises the last
error. Each retry is logged by stamina (logger "stamina", with the error and the wait).

    async for attempt in retrying(on=is_transient, timeout_s=30):
        with attempt:
            await connect()

    for attempt in retrying(on=sqlite3.OperationalError, timeout_s=None):
        with attempt:
            store.save(batch)
"""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import stamina

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

