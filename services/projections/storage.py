"""Where the read model is stored: SQLite or PostgreSQL connections behind one small interface.

A location is a SQLite file (a path or `sqlite:///path`; by default `data_dir/read-model.db`) or a PostgreSQL
DSN (`OUTREACH_READ_MODEL_URL=postgresql://...`). Each backend hands out sessions (one pooled connection,
rows as dicts) and write transactions (one writer at a time, as SQLite has it), and a tiny dialect covers
what differs in the SQL (placeholders, column types, a few functions).
A SQLite file is opened in WAL mode through the kernel's opener: the projections process writes while CLI
and API processes read.
"""
from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.settings import Settings
from services.common.sqlite import open_sqlite

FILE_NAME = "read-model.db"
POOL_SIZE = 4
# SQLite page cache per connection. 64 MiB kept a 300k-message read model in memory, but filling it was most
# of why projections grew 1.4x from a 30k to a 300k campaign; pages it misses come from the OS page cache.
CACHE_MIB = 16
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite:///"
_WRITE_LOCK_KEY = 7_402_113_911  # PostgreSQL advisory lock id: one writer at a time


class ReadModelUnavailable(RuntimeError):
    """The database cannot be written now (locked, disk full, connection lost): retry the whole batch."""


@dataclass(frozen=True)
class Dialect:
    name: str
    key_text: str  # ids and times: byte order in both databases, so keyset pages and dumps agree
    integer: str
    lower: str  # a Unicode-aware lower()
    variable_values: str  # the text values of a message's variables (a subquery over JSON)
    offset_without_limit: str
    # Joins `messages m` to `e`, the message's record with the highest sequence among those that occurred at or
    # before a time (the one parameter): an index probe per message, no sort of the campaign's records.
    latest_record_as_of: str

    def sql(self, statement: str) -> str:
        return statement if self.name == "sqlite" else statement.replace("?", "%s")


SQLITE = Dialect("sqlite", "TEXT", "INTEGER", "py_lower", "SELECT value FROM json_each(messages.variables)",
                 " LIMIT -1 OFFSET ?",
                 "JOIN message_events e ON e.rowid = (SELECT x.rowid FROM message_events x"
                 " WHERE x.message_id = m.message_id AND x.occurred_at <= ? ORDER BY x.sequence DESC LIMIT 1)")
POSTGRES = Dialect("postgres", 'TEXT COLLATE "C"', "BIGINT", "lower",
                   "SELECT value FROM json_each_text(messages.variables::json)", " OFFSET ?",
                   # A correlated subquery in the join condition made PostgreSQL hash the whole table: LATERAL
                   # keeps it a nested loop of index probes.
                   "CROSS JOIN LATERAL (SELECT * FROM message_events x"
                   " WHERE x.message_id = m.message_id AND x.occurred_at <= ? ORDER BY x.sequence DESC LIMIT 1) e")


class Session:
    """One connection, whatever the database: rows come back as dicts."""

    def __init__(self, conn: Any, dialect: Dialect):
        self.conn = conn
        self.dialect = dialect

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return self.conn.execute(self.dialect.sql(sql), tuple(params)).fetchall()

    def one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Iterable[Any] = ()) -> None:
        self.conn.execute(self.dialect.sql(sql), tuple(params))

    def many(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        if self.dialect.name == "sqlite":
            self.conn.executemany(sql, rows)
        else:
            with self.conn.cursor() as cursor:
                cursor.executemany(self.dialect.sql(sql), rows)


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row)}


class SqliteBackend:
    dialect = SQLITE

    def __init__(self, path: str, pool_size: int = POOL_SIZE):
        self.path = Path(path)
        self.location = path
        self.memory = path == ":memory:"
        # An in-memory database is one connection (each connection would be a database of its own).
        self._slots = threading.BoundedSemaphore(1 if self.memory else pool_size)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = open_sqlite(self.location, cache_mib=CACHE_MIB)
        conn.row_factory = _dict_row
        conn.create_function("py_lower", 1, lambda s: s.lower() if isinstance(s, str) else s, deterministic=True)
        with self._all_lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield Session(conn, SQLITE)
            finally:
                self._idle.put(conn)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.session() as s:
            try:
                s.conn.execute("BEGIN IMMEDIATE")  # the write lock now: no other writer can interleave
            except sqlite3.OperationalError as exc:
                raise ReadModelUnavailable(str(exc)) from exc
            try:
                yield s
            except BaseException:
                s.conn.execute("ROLLBACK")
                raise
            try:
                s.conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                s.conn.execute("ROLLBACK")
                raise ReadModelUnavailable(str(exc)) from exc

    def table_exists(self, s: Session, table: str) -> bool:
        return s.one("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)) is not None

    def index_exists(self, s: Session, index: str) -> bool:
        return s.one("SELECT name FROM sqlite_master WHERE type = 'index' AND name = ?", (index,)) is not None

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class PostgresBackend:
    dialect = POSTGRES
    path = None

    def __init__(self, dsn: str, pool_size: int = POOL_SIZE):
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self.dsn = dsn
        self.location = masked_dsn(dsn)  # logged: never with a password
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, open=True, timeout=30,
                                   kwargs={"autocommit": True, "row_factory": dict_row},
                                   name="outreach-read-model")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.pool.connection() as conn:
            yield Session(conn, POSTGRES)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                s = Session(conn, POSTGRES)
                s.run("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_KEY,))  # one writer at a time, as SQLite
                yield s
        except self._psycopg.OperationalError as exc:
            raise ReadModelUnavailable(str(exc)) from exc

    def table_exists(self, s: Session, table: str) -> bool:
        return s.one("SELECT to_regclass(?) AS t", (table,))["t"] is not None

    def index_exists(self, s: Session, index: str) -> bool:
        return self.table_exists(s, index)  # to_regclass names any relation, an index too

    def transient(self, exc: BaseException) -> bool:
        from psycopg_pool import PoolTimeout

        return isinstance(exc, (self._psycopg.OperationalError, PoolTimeout))

    def close(self) -> None:
        self.pool.close()


Backend = SqliteBackend | PostgresBackend


def connect(location: Path | str, pool_size: int = POOL_SIZE) -> Backend:
    """The backend of a location (no connection is made to a SQLite file until a session asks for one)."""
    text = str(location)
    if is_postgres(text):
        return PostgresBackend(text, pool_size)
    return SqliteBackend(sqlite_path(text), pool_size)


def is_unavailable(backend: Backend, exc: BaseException) -> bool:
    """True for errors worth retrying the same batch for (the database, not the records)."""
    return isinstance(exc, ReadModelUnavailable) or backend.transient(exc)


def is_postgres(location: str) -> bool:
    return location.startswith(_POSTGRES_SCHEMES)


def sqlite_path(location: str) -> str:
    """The file of a SQLite location (a path or sqlite:///path)."""
    return location[len(_SQLITE_SCHEME):] if location.startswith(_SQLITE_SCHEME) else location


def location_of(settings: Settings) -> str:
    """Where the read model lives: `read_model_url`, or the SQLite file in data_dir."""
    return getattr(settings, "read_model_url", None) or str(settings.data_dir / FILE_NAME)


def exists(location: str) -> bool:
    """False for a SQLite file nobody has written yet (a PostgreSQL database is taken to exist)."""
    return is_postgres(location) or Path(sqlite_path(location)).exists()


_SECRET_DSN_KEYS = ("password", "sslpassword")


def masked_dsn(dsn: str) -> str:
    """A PostgreSQL DSN (URL or key=value) fit for logs: libpq's own parser finds the password wherever it is
    (user info, query parameter, keyword), and the result is key=value text with it masked. A DSN libpq cannot
    parse is shown as nothing but its scheme."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        return "postgresql://***"
    for key in _SECRET_DSN_KEYS:
        if params.get(key) is not None:
            params[key] = "***"
    return make_conninfo("", **params)
