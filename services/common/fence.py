"""The hand-off fence: the shared, durable right to hand a message to a provider (contract v1.1, at most once).

One row per message, in the store every sender instance sees: a SQLite file beside the event store (one
machine) or a table in its PostgreSQL database (several). Each row names the claim the message is
`sending` under now, that claim's Sending deadline, and a state:

- `open`: the claim's sender may hand it off (the relay opens the row before it publishes the WorkClaimed);
- `handed_off`: a sender took it, in a committed transaction, right before its provider call (`take`);
  it stays so once the provider answered or if nobody knows (a crash mid-call: the report will be true,
  "handed off with no answer");
- `closed`: never again under this claim (a final pre-send error, the Sending deadline passed, a provider
  hold returned it to `queued`).

Every change is a compare-and-set on (message, claim, state), so two senders, a redelivered claim, a relay
rewind over old claims or an SMTP re-submission after a restart all ask the same row and only one wins:
- a definite pre-send error gives the message back (`handed_off` -> `open`, `give_back`): nothing reached
  the provider, so whoever works the claim next (this sender after its back-off, or another after a crash)
  may hand it off again;
- a newer claim of the message (a retry re-queued it) replaces the row; an older one (a rewind) does not
  (`claim_version`: the campaign's event version at the claim, increasing);
- `submissions` counts hand-offs across claims: `take` returns it, the exact `attempt` of that submission.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from services.common import sql_lists
from services.common.connections import ReconnectingConnection, created_meanwhile
from services.common.retry import retrying
from services.common.settings import Settings
from services.common.sqlite import open_sqlite

OPEN, HANDED_OFF, CLOSED = "open", "handed_off", "closed"


@dataclass(frozen=True)
class ClaimedMessage:
    """One message of a claim, as the fence opens it."""

    message_id: str
    submissions: int  # hand-offs known before this claim (the WorkClaimed item's `attempt`)


@dataclass(frozen=True)
class _Dialect:
    table: str
    placeholder: str
    real: str
    integer: str
    begin: str


SQLITE = _Dialect(table="handoff_fence", placeholder="?", real="REAL", integer="INTEGER", begin="BEGIN IMMEDIATE")
POSTGRES = _Dialect(table="outreach_handoff_fence", placeholder="%s", real="DOUBLE PRECISION", integer="BIGINT",
                    begin="BEGIN")


class HandoffFence:
    """The fence table on one autocommit DB-API connection (sqlite3 or psycopg), safe to share between
    threads (a lock keeps each transaction whole). Every method is one transaction.

    `connect` makes the connection, again after one failed for a transient reason (`ReconnectingConnection`:
    the failing call raises, for its caller to retry, and the next one connects anew)."""

    def __init__(self, connect: Callable[[], Any], dialect: _Dialect):
        self._connection = ReconnectingConnection(connect)
        self._dialect = dialect
        self._lock = threading.Lock()
        # A local file answers in microseconds; a server in a round trip and a commit (worth gathering).
        self.is_local = dialect is SQLITE
        t, p = dialect.table, dialect.placeholder
        ddl = [f"CREATE TABLE IF NOT EXISTS {t} (message_id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL, "
               f"claim_id TEXT NOT NULL, claim_version {dialect.integer} NOT NULL, deadline {dialect.real} NOT NULL, "
               f"state TEXT NOT NULL, submissions {dialect.integer} NOT NULL, closed_by TEXT)",
               f"CREATE INDEX IF NOT EXISTS {t}_by_campaign ON {t} (campaign_id, state)"]
        # PostgreSQL's IF NOT EXISTS races between processes creating the same table (a unique violation on
        # its catalog): the loser tries again and finds it made.
        for attempt in retrying(on=created_meanwhile, timeout_s=None, attempts=5):
            with attempt, self._lock, self._connection.reconnecting():
                for statement in ddl:
                    self._connection.db.execute(statement)
        self._open = (
            f"INSERT INTO {t} (message_id, campaign_id, claim_id, claim_version, deadline, state, submissions) "
            f"VALUES ({p}, {p}, {p}, {p}, {p}, '{OPEN}', {p}) ON CONFLICT (message_id) DO UPDATE SET "
            "campaign_id = excluded.campaign_id, claim_id = excluded.claim_id, claim_version = excluded.claim_version, "
            "deadline = excluded.deadline, state = excluded.state, submissions = excluded.submissions, closed_by = NULL "
            f"WHERE {t}.claim_version < excluded.claim_version")

    # ------------------------------------------------------------------ the relay

    def open_claim(self, *, campaign_id: str, claim_id: str, claim_version: int, deadline: float,
                   messages: Iterable[ClaimedMessage]) -> None:
        """Open the claim's messages (idempotent: the same or an older claim again changes nothing)."""
        rows = [(m.message_id, campaign_id, claim_id, claim_version, deadline, m.submissions) for m in messages]
        if rows:
            self._transaction(lambda cur: cur.executemany(self._open, rows))

    # ------------------------------------------------------------------ senders

    def take(self, claim_id: str, message_ids: Sequence[str], now: float) -> dict[str, int]:
        """Hand-off rights for those of `message_ids` still open under `claim_id` before its deadline:
        message id -> this submission's number (`attempt`). The others must not be submitted."""
        return self.take_many([(claim_id, message_ids)], now)

    def take_many(self, requests: Sequence[tuple[str, Sequence[str]]], now: float) -> dict[str, int]:
        """`take` for several (claim, messages) requests in one statement and one commit (senders gather the
        takes of their concurrent provider calls: on PostgreSQL a commit per call would cap the throughput)."""
        t, p = self._dialect.table, self._dialect.placeholder
        pairs = [(claim_id, mid) for claim_id, mids in requests for mid in mids]
        if not pairs:
            return {}
        postgres = self._dialect is POSTGRES
        rows = self._transaction(lambda cur: cur.execute(
            f"UPDATE {t} SET state = '{HANDED_OFF}', submissions = submissions + 1 "
            f"WHERE state = '{OPEN}' AND deadline > {p} AND {sql_lists.pair_in_list('claim_id', 'message_id', postgres)} "
            "RETURNING message_id, submissions", (now, *sql_lists.pair_list_params(pairs, postgres))).fetchall())
        return dict(rows)

    def give_back(self, claim_id: str, message_ids: Sequence[str], *, uncount: bool = False) -> None:
        """A definite pre-send error: nothing reached the provider, the claim may hand them off again.
        `uncount`: the try is not a submission either (an SMTP re-submission that reached nobody)."""
        less = ", submissions = submissions - 1" if uncount else ""
        self._update_claim(claim_id, message_ids, f"state = '{OPEN}'{less}", (), only_from=HANDED_OFF)

    def defer(self, claim_id: str, message_ids: Sequence[str], until: float) -> None:
        """The provider deferred them (SMTP 4xx at RCPT or DATA: nothing taken): open again under the claim
        until the retry window closes, for the re-submissions to take one at a time."""
        p = self._dialect.placeholder
        self._update_claim(claim_id, message_ids, f"state = '{OPEN}', deadline = {p}", (until,),
                           only_from=HANDED_OFF)

    def close(self, claim_id: str, message_ids: Sequence[str]) -> None:
        """Never again under this claim (a final pre-send error reported)."""
        self._update_claim(claim_id, message_ids, f"state = '{CLOSED}'", ())

    # ------------------------------------------------------------------ the command handler

    def close_if_open(self, message_id: str, closed_by: str) -> tuple[bool, int | None]:
        """Close the message's row if nobody took it. Returns (whether it was open: it never reached a
        provider under its claim, or was closed by this same `closed_by` before, as a use case decided
        again; its hand-offs so far, None without a row)."""
        t, p = self._dialect.table, self._dialect.placeholder

        def close(cur: Any) -> tuple[bool, int | None]:
            closed = cur.execute(
                f"UPDATE {t} SET state = '{CLOSED}', closed_by = {p} WHERE message_id = {p} "
                f"AND (state = '{OPEN}' OR (state = '{CLOSED}' AND closed_by = {p})) RETURNING submissions",
                (closed_by, message_id, closed_by)).fetchone()
            if closed is not None:
                return True, closed[0]
            row = cur.execute(f"SELECT submissions FROM {t} WHERE message_id = {p}", (message_id,)).fetchone()
            return False, row[0] if row else None

        return self._transaction(close)

    def close_open_of_campaign(self, campaign_id: str, closed_by: str) -> set[str]:
        """Close every row of the campaign nobody took (a provider hold); the ids of those closed now or by
        this same `closed_by` before."""
        t, p = self._dialect.table, self._dialect.placeholder
        rows = self._transaction(lambda cur: cur.execute(
            f"UPDATE {t} SET state = '{CLOSED}', closed_by = {p} WHERE campaign_id = {p} "
            f"AND (state = '{OPEN}' OR (state = '{CLOSED}' AND closed_by = {p})) RETURNING message_id",
            (closed_by, campaign_id, closed_by)).fetchall())
        return {row[0] for row in rows}

    def submissions(self, message_ids: Sequence[str]) -> dict[str, int]:
        """Hand-offs so far of each message that has a row: the number of its latest submission."""
        t, p = self._dialect.table, self._dialect.placeholder
        postgres = self._dialect is POSTGRES
        with self._lock, self._connection.reconnecting():
            return dict(self._connection.db.execute(
                f"SELECT message_id, submissions FROM {t} WHERE {sql_lists.in_list('message_id', postgres)}",
                (sql_lists.list_param(message_ids, postgres),)).fetchall())

    # ------------------------------------------------------------------ reading (tests, tools)

    def row(self, message_id: str) -> dict[str, Any] | None:
        t, p = self._dialect.table, self._dialect.placeholder
        with self._lock, self._connection.reconnecting():
            found = self._connection.db.execute(f"SELECT claim_id, claim_version, deadline, state, submissions FROM {t} "
                                     f"WHERE message_id = {p}", (message_id,)).fetchone()
        if found is None:
            return None
        return dict(zip(("claim_id", "claim_version", "deadline", "state", "submissions"), found))

    def close_connection(self) -> None:
        self._connection.close()

    # ------------------------------------------------------------------ internals

    def _update_claim(self, claim_id: str, message_ids: Sequence[str], assignments: str, params: tuple,
                      only_from: str | None = None) -> None:
        """`UPDATE ... SET {assignments}` (its placeholders filled by `params`) on the claim's rows of
        `message_ids`, only those in state `only_from` when given."""
        t, p = self._dialect.table, self._dialect.placeholder
        if not message_ids:
            return
        postgres = self._dialect is POSTGRES
        condition = f" AND state = '{only_from}'" if only_from else ""
        self._transaction(lambda cur: cur.execute(
            f"UPDATE {t} SET {assignments} WHERE claim_id = {p} AND {sql_lists.in_list('message_id', postgres)}"
            f"{condition}", (*params, claim_id, sql_lists.list_param(message_ids, postgres))))

    def _transaction(self, work: Any) -> Any:
        with self._lock:
            return self._connection.transaction(self._dialect.begin, work)


def fence_path(settings: Settings):
    return settings.event_store_sqlite_path.with_suffix(".fence.db")


def open_fence(settings: Settings) -> HandoffFence:
    """The fence of these settings' event store: beside the SQLite file, or in the PostgreSQL database."""
    if settings.event_store == "postgres":
        import psycopg

        return HandoffFence(lambda: psycopg.connect(settings.postgres_dsn, autocommit=True, connect_timeout=5),
                            POSTGRES)
    return HandoffFence(lambda: open_sqlite(fence_path(settings)), SQLITE)


__all__ = ["CLOSED", "HANDED_OFF", "OPEN", "ClaimedMessage", "HandoffFence", "fence_path", "open_fence"]
