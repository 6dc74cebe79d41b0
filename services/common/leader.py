"""One active instance at a time: a lock the active one holds for as long as its process (or its database
session) lives, so a standby takes over within a poll once the active one dies.

- PostgreSQL (several machines): a session advisory lock (`pg_try_advisory_lock`) on a connection of its
  own. A crash or a lost connection releases it at once; the holder notices a lost connection on its next
  `still_held()` and stands down.
- SQLite (one machine): an exclusive `flock` on a file beside the event store, released by the kernel when
  the process dies, however it dies.

Neither is a fence against a holder frozen mid-page (a stopped VM): what it publishes after losing the
lock is at least once, as every consumer already expects.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Protocol

from services.common.settings import Settings


class LeaderLock(Protocol):
    def try_acquire(self) -> bool:
        """True if this instance holds the lock now (it may have held it already)."""

    def still_held(self) -> bool:
        """False once the lock was lost (its connection died); the holder must stand down."""

    def release(self) -> None:
        ...


class FileLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for an operator
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class AdvisoryLock:
    def __init__(self, dsn: str, name: str):
        self.dsn = dsn
        # pg advisory locks take a bigint: the first 8 bytes of the name's hash, signed.
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._connection = None

    def try_acquire(self) -> bool:
        if self._connection is not None and self.still_held():
            return True
        import psycopg

        self.release()
        try:
            connection = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError:
            return False  # the database is down: nobody can take the lock meanwhile either
        if connection.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]:
            self._connection = connection
            return True
        connection.close()
        return False

    def still_held(self) -> bool:
        if self._connection is None:
            return False
        try:
            self._connection.execute("SELECT 1")  # a session that answers still holds its session locks
            return True
        except Exception:
            self.release()
            return False

    def release(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()  # ends the session: the lock goes with it
            self._connection = None


def leader_lock(settings: Settings, role: str) -> LeaderLock:
    """The lock of `role` (e.g. "relay") in this deployment's event store."""
    if settings.event_store == "postgres":
        return AdvisoryLock(settings.postgres_dsn, f"{settings.deployment}:{role}")
    return FileLock(settings.event_store_sqlite_path.with_suffix(f".{role}.lock"))
