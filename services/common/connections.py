"""A DB-API connection made again after it failed for a transient reason.

A PostgreSQL restart kills a connection for good: every later call on it fails. Wrapped here, the call in
flight still raises (its caller waits and tries again, by the retry policy), and the next one connects anew.
Used by the stores that keep one connection of their own (the hand-off fence, the relay's checkpoint).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from services.common.retry import is_transient


def created_meanwhile(exc: Exception) -> bool:
    """PostgreSQL's CREATE ... IF NOT EXISTS racing another process's: the loser finds the table made (retry)."""
    import psycopg

    return isinstance(exc, (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable,
                            psycopg.errors.DuplicateObject))


class ReconnectingConnection:
    """The connection `connect` makes (at once, so a wrong address fails at start), made again on the first
    use after a transient failure inside `reconnecting()`."""

    def __init__(self, connect: Callable[[], Any]):
        self._connect = connect
        self._connection: Any = connect()

    @property
    def db(self) -> Any:
        if self._connection is None:
            self._connection = self._connect()
        return self._connection

    @contextlib.contextmanager
    def reconnecting(self) -> Iterator[None]:
        """Around a use of `db`: a transient failure drops the connection (the error still propagates)."""
        try:
            yield
        except Exception as exc:
            if is_transient(exc) and self._connection is not None:
                with contextlib.suppress(Exception):  # it is dead already
                    self._connection.close()
                self._connection = None
            raise

    def transaction(self, begin: str, work: Callable[[Any], Any]) -> Any:
        """`work(cursor)` between `begin` ("BEGIN", "BEGIN IMMEDIATE") and COMMIT on the autocommit connection,
        rolled back if it raises; both drivers' cursors have execute and executemany. Callers sharing the
        connection between threads hold their lock around it."""
        with self.reconnecting():
            cursor = self.db.cursor()
            cursor.execute(begin)
            try:
                result = work(cursor)
            except BaseException:
                with contextlib.suppress(Exception):  # a dead connection cannot roll back: it is dropped
                    cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
            return result

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
