"""The read side of the read model: campaigns, their event history, their messages, as of a time, and dumps.

The one module of the projections that the HTTP API may import: `ReadViews.open(settings)` opens the read
model for queries (creating its tables if nobody has yet), and `settled` tells whether a campaign has finished
and its counts have caught up.

Counts are computed from `messages` (GROUP BY over the (campaign_id, status) index), so they always add up.
As of a time, the database picks each message's latest record then (an index probe per message) and filters,
counts and pages those: no request holds a campaign's messages in memory.
"""
from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import orjson

from schemas.events import FINAL_MESSAGE_STATUSES, MESSAGE_STATUSES
from schemas.times import rfc3339
from services.common import jsoncodec
from services.common.settings import Settings, get_settings
from services.projections import storage
from services.projections.fold import fold_campaign
from services.projections.schema import (
    CAMPAIGN_COLUMNS,
    JSON_CAMPAIGN_COLUMNS,
    JSON_COLUMNS,
    MESSAGE_COLUMNS,
    STATUS_COLUMNS,
    TABLE_COLUMNS,
    TABLE_KEYS,
    TABLES,
    ensure_schema,
)

FINAL_CAMPAIGN_STATUSES = frozenset({"complete", "complete_with_errors", "failed", "deleted"})
UNSETTLED_MESSAGE_STATUSES = tuple(s for s in MESSAGE_STATUSES if s not in FINAL_MESSAGE_STATUSES)
PAGE_ROWS = 5000  # keyset page of the big scans (canonical dump, history)
# Of a message as of a time, these come from its latest record then; the others (contact, row) from `messages`.
_AS_OF_RECORD_COLUMNS = frozenset({"channel", "status", "previous_status", "reason", "provider_code", "attempt",
                                   "run_no", "updated_at", "last_sequence"})


def settled(campaign: dict[str, Any]) -> bool:
    """The campaign (a `ReadViews.campaign()` dict) is final and its counts have caught up with that.

    Campaign events and message statuses come from two topics, so a final status can be read before its
    last messages change: a complete (or failed) campaign has every message final, and at least as many
    as its last status change counted. A deleted campaign's messages may stay waiting for ever."""
    if campaign["status"] not in FINAL_CAMPAIGN_STATUSES:
        return False
    if campaign["status"] == "deleted":
        return True
    counts = campaign["counts"]
    reported = campaign.get("reported_counts") or {}
    return (not any(counts.get(s) for s in UNSETTLED_MESSAGE_STATUSES)
            and counts.get("total", 0) >= reported.get("total", 0))


def empty_counts() -> dict[str, int]:
    return {"total": 0, **{status: 0 for status in MESSAGE_STATUSES}}


class ReadViews:
    """The read model opened for queries. One instance per process; thread-safe (a small pool of connections)."""

    def __init__(self, location: Path | str, pool_size: int = storage.POOL_SIZE):
        self._backend = storage.connect(location, pool_size)
        self.path: Path | None = self._backend.path
        self.location: str = self._backend.location  # fit for logs: a DSN's password is masked
        self.dialect = self._backend.dialect
        try:
            ensure_schema(self._backend)
        except BaseException:
            self._backend.close()
            raise

    @classmethod
    def open(cls, settings: Settings | None = None) -> Self:
        """The read model of `settings.read_model_url`, by default the SQLite file `data_dir / "read-model.db"`."""
        return cls(storage.location_of(settings or get_settings()))

    @classmethod
    def open_existing(cls, settings: Settings | None = None) -> Self | None:
        """The read model, or None when it is a SQLite file nobody has written yet (never creates one)."""
        location = storage.location_of(settings or get_settings())
        return cls(location) if storage.exists(location) else None

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_unavailable(self, exc: BaseException) -> bool:
        """True for errors worth retrying for (the database, not the request or the records)."""
        return storage.is_unavailable(self._backend, exc)

    # ------------------------------------------------------------------ campaigns

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._backend.session() as s:
            return s.rows(sql, params)

    def counts(self, campaign_id: str) -> dict[str, int]:
        """Messages per status (every status, zeros included) and `total`."""
        return self._counts_of([campaign_id]).get(campaign_id, empty_counts())

    def _counts_of(self, campaign_ids: list[str] | None) -> dict[str, dict[str, int]]:
        sql = "SELECT campaign_id, status, COUNT(*) AS n FROM messages"
        params: list[Any] = []
        if campaign_ids is not None:
            if not campaign_ids:
                return {}
            sql += f" WHERE campaign_id IN ({', '.join('?' * len(campaign_ids))})"
            params = list(campaign_ids)
        result: dict[str, dict[str, int]] = {}
        for row in self._rows(sql + " GROUP BY campaign_id, status", params):
            counts = result.setdefault(row["campaign_id"], empty_counts())
            counts[row["status"]] = counts.get(row["status"], 0) + row["n"]
            counts["total"] += row["n"]
        return result

    def campaign(self, campaign_id: str, *, with_counts: bool = True) -> dict[str, Any] | None:
        """The campaign with its `counts` (unless `with_counts` is False: they count every message of the
        campaign), or None if no event of it has been applied."""
        rows = self._rows("SELECT * FROM campaigns WHERE campaign_id = ?", (campaign_id,))
        if not rows:
            return None
        result = _campaign_dict(rows[0])
        if with_counts:
            result["counts"] = self.counts(campaign_id)
        return result

    def campaigns(self, *, status: str | None = None, limit: int | None = None,
                  offset: int = 0) -> list[dict[str, Any]]:
        """Campaigns (newest first), optionally of one status, each with its `counts`."""
        sql, params = "SELECT * FROM campaigns", []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        sql += " ORDER BY created_at DESC NULLS LAST, campaign_id" + self._page(params, limit, offset)
        result = [_campaign_dict(row) for row in self._rows(sql, params)]
        counts = self._counts_of([c["campaign_id"] for c in result] if limit is not None else None)
        for campaign in result:
            campaign["counts"] = counts.get(campaign["campaign_id"], empty_counts())
        return result

    def count_campaigns(self, *, status: str | None = None) -> int:
        if status is None:
            return self._rows("SELECT COUNT(*) AS n FROM campaigns")[0]["n"]
        return self._rows("SELECT COUNT(*) AS n FROM campaigns WHERE status = ?", (status,))[0]["n"]

    def is_final(self, campaign_id: str) -> bool:
        """True when the campaign's status is complete, complete_with_errors, failed or deleted."""
        rows = self._rows("SELECT status FROM campaigns WHERE campaign_id = ?", (campaign_id,))
        return bool(rows) and rows[0]["status"] in FINAL_CAMPAIGN_STATUSES

    def events(self, campaign_id: str) -> list[dict[str, Any]]:
        """The campaign's events (rejections of it as an unknown campaign included), in sequence order."""
        return [
            jsoncodec.loads(row["body"])
            for row in self._rows(
                "SELECT body FROM campaign_events WHERE campaign_id = ? ORDER BY sequence, occurred_at, event_id",
                (campaign_id,),
            )
        ]

    def answers(self, command_id: str) -> list[dict[str, Any]]:
        """The events answering one command (matched by causation_id), in sequence order."""
        return [
            jsoncodec.loads(row["body"])
            for row in self._rows(
                "SELECT body FROM campaign_events WHERE causation_id = ? ORDER BY sequence, event_id", (command_id,)
            )
        ]

    # ------------------------------------------------------------------ messages

    def _page(self, params: list[Any], limit: int | None, offset: int) -> str:
        if limit is not None:
            params.extend((limit, offset))
            return " LIMIT ? OFFSET ?"
        if offset:
            params.append(offset)
            return self.dialect.offset_without_limit
        return ""

    def _message_filter(self, campaign_id: str, status: str | None, reason: str | None,
                        search: str | None, recipient: str | None = None) -> tuple[str, list[Any]]:
        where, params = ["campaign_id = ?"], [campaign_id]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if reason is not None:
            where.append("reason = ?")
            params.append(reason)
        if search is not None and search.strip():
            term = search.strip()
            pattern = _contains_pattern(term)
            lower = self.dialect.lower
            where.append(
                f"({lower}(destination) LIKE ? ESCAPE '\\' "
                f"OR EXISTS ({self.dialect.variable_values.replace('SELECT value', 'SELECT 1')} "
                f"WHERE {lower}(value) LIKE ? ESCAPE '\\') "
                "OR row = ? OR message_id = ?)")
            params.extend((pattern, pattern, _row_number(term), term.lower()))
        if recipient is not None and recipient.strip():
            # The destination only (the console's "Search recipient"): no JSON of variables to read per row.
            where.append(f"{self.dialect.lower}(destination) LIKE ? ESCAPE '\\'")
            params.append(_contains_pattern(recipient.strip()))
        return " AND ".join(where), params

    def messages(self, campaign_id: str, *, status: str | None = None, reason: str | None = None,
                 search: str | None = None, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """The campaign's messages in row order, optionally filtered (see `_message_filter`)."""
        where, params = self._message_filter(campaign_id, status, reason, search)
        sql = f"SELECT * FROM messages WHERE {where} ORDER BY row, message_id" + self._page(params, limit, offset)
        return [_message_dict(row) for row in self._rows(sql, params)]

    def count_messages(self, campaign_id: str, *, status: str | None = None, reason: str | None = None,
                       search: str | None = None) -> int:
        where, params = self._message_filter(campaign_id, status, reason, search)
        return self._rows(f"SELECT COUNT(*) AS n FROM messages WHERE {where}", params)[0]["n"]

    def iter_messages(self, campaign_id: str, *, status: str | None = None, reason: str | None = None,
                      search: str | None = None, recipient: str | None = None,
                      batch_size: int = 2000) -> Iterator[dict[str, Any]]:
        """Every matching message in row order, fetched in keyset pages (bounded memory). `recipient`: a
        case-insensitive part of the destination (as `message_page`)."""
        where, params = self._message_filter(campaign_id, status, reason, search, recipient)
        return self._keyset_messages("messages", where, params, batch_size)

    def message_page(self, campaign_id: str, *, status: str | None = None, reason: str | None = None,
                     search: str | None = None, recipient: str | None = None, after: int | None = None,
                     before: int | None = None, limit: int = 50,
                     as_of: datetime | str | None = None) -> dict[str, Any]:
        """One keyset page of the campaign's messages in row order, with the filters of `messages()`: the first
        page, the one after row `after`, or the one before row `before` (never an OFFSET, so page 5,000 costs
        what page 1 does). A row is unique in its campaign (a message's id is derived from its campaign and
        row, ids.message_id), so it is the whole key. `recipient`: a case-insensitive part of the destination
        (a scan of the campaign's rows, as `search`, without reading any JSON). With `as_of`, the messages as
        they stood then.

        {"items": [...], "previous": ROW or None, "next": ROW or None}: `next` is the last item's row when a
        matching message follows it (the cursor of the next page, `after`), `previous` the first item's when
        one precedes it (`before`); None when there is none. The page's own direction is known exactly (one row
        more is read); the other is taken from the cursor: a page after a row has that row's page before it, so
        no second scan is made (a search matching one message would scan the campaign twice). Should the
        messages before it no longer match (their status moved on), that previous page is empty and points
        back again."""
        if after is not None and before is not None:
            raise ValueError("a page is after a row or before one, not both")
        if as_of is None:
            source, params = "messages", []
        else:
            source, params = self._as_of_source(campaign_id, _moment(as_of))
        where, filter_params = self._message_filter(campaign_id, status, reason, search, recipient)
        params += filter_params
        # Raw `row` in WHERE and ORDER BY: a range scan of (campaign_id, row), (campaign_id, status, row) or
        # (campaign_id, reason, row) that stops after limit + 1 rows (the extra one says whether more follow).
        if before is None:
            bound = "" if after is None else " AND row > ?"
            sql = f"SELECT * FROM {source} WHERE {where}{bound} ORDER BY row LIMIT ?"
            rows = self._rows(sql, [*params, *([] if after is None else [after]), limit + 1])
            more, rows = len(rows) > limit, rows[:limit]
            next_row = rows[-1]["row"] if more else None
            # the first page has nothing before it; an empty one after `after` goes back to what precedes it
            previous_row = None if after is None else rows[0]["row"] if rows else after + 1
        else:
            sql = f"SELECT * FROM {source} WHERE {where} AND row < ? ORDER BY row DESC LIMIT ?"
            rows = self._rows(sql, [*params, before, limit + 1])
            more, rows = len(rows) > limit, rows[:limit][::-1]
            previous_row = rows[0]["row"] if more else None
            next_row = rows[-1]["row"] if rows else before - 1
        return {"items": [_message_dict(row) for row in rows], "previous": previous_row, "next": next_row}

    def failure_reasons(self, campaign_id: str) -> dict[str, int]:
        """Failed messages per failure reason (only the reasons that occur). The contract sets a reason exactly
        when a message is failed, so this counts the (campaign_id, reason, row) index alone."""
        return {row["reason"]: row["n"] for row in self._rows(
            "SELECT reason, COUNT(*) AS n FROM messages WHERE campaign_id = ? AND reason IS NOT NULL "
            "GROUP BY reason ORDER BY reason", (campaign_id,))}

    def _keyset_messages(self, source: str, where: str, params: list[Any],
                         batch_size: int) -> Iterator[dict[str, Any]]:
        last_row = -1
        while True:
            page = self._rows(f"SELECT * FROM {source} WHERE {where} AND row > ? ORDER BY row LIMIT ?",
                              [*params, last_row, batch_size])
            for row in page:
                yield _message_dict(row)
            if len(page) < batch_size:
                return
            last_row = page[-1]["row"]

    def message(self, message_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM messages WHERE message_id = ?", (message_id,))
        return _message_dict(rows[0]) if rows else None

    # ------------------------------------------------------------------ audit

    def message_history(self, message_id: str) -> list[dict[str, Any]]:
        """The message's status records as published, in sequence order."""
        return [_status_record(row) for row in self._rows(
            "SELECT * FROM message_events WHERE message_id = ? ORDER BY sequence, event_id", (message_id,))]

    def history(self, campaign_id: str, *, include_messages: bool = True) -> list[dict[str, Any]]:
        """The full ordered audit history (see `iter_history`)."""
        return list(self.iter_history(campaign_id, include_messages=include_messages))

    def iter_history(self, campaign_id: str, *, include_messages: bool = True,
                     until: datetime | str | None = None) -> Iterator[dict[str, Any]]:
        """Campaign events and message-status records merged in occurred_at order (ties: campaign events by
        sequence first, then status records by (row, sequence)), each as published; optionally only those that
        occurred at or before `until`. Status records stream in keyset pages."""
        limit = _moment(until)
        events = [e for e in self.events(campaign_id) if limit is None or (e.get("occurred_at") or "") <= limit]
        events.sort(key=lambda e: (e.get("occurred_at") or "", e.get("sequence", 0)))
        keyed_events = (((e.get("occurred_at") or "", 0, e.get("sequence", 0), 0), e) for e in events)
        if not include_messages:
            yield from (e for _, e in keyed_events)
            return
        statuses = (((r["occurred_at"] or "", 1, r["row"] or 0, r["sequence"]), r)
                    for r in self._iter_statuses(campaign_id, limit))
        for _, item in heapq.merge(keyed_events, statuses, key=lambda pair: pair[0]):
            yield item

    def _iter_statuses(self, campaign_id: str, until: str | None) -> Iterator[dict[str, Any]]:
        after: tuple[str, int, int, str] | None = None
        while True:
            page = self._rows(*self._status_page(campaign_id, until, after))
            for row in page:
                yield _status_record(row)
            if len(page) < PAGE_ROWS:
                return
            last = page[-1]
            after = (last["occurred_at"], last["row"], last["sequence"], last["event_id"])

    def _status_page(self, campaign_id: str, until: str | None,
                     after: tuple[str, int, int, str] | None) -> tuple[str, list[Any]]:
        """The query of one page of the campaign's status records after the key `after`: a range scan of the
        (campaign_id, occurred_at, row, sequence, event_id) index, raw columns only (an ORDER BY on expressions
        sorted all of the campaign's records again for each page). event_id makes the key unique, so a page
        boundary between equal (time, row, sequence) keys loses nothing."""
        sql, params = "SELECT * FROM message_events WHERE campaign_id = ?", [campaign_id]
        if until is not None:
            sql += " AND occurred_at <= ?"
            params.append(until)
        if after is not None:
            sql += " AND (occurred_at, row, sequence, event_id) > (?, ?, ?, ?)"
            params.extend(after)
        sql += " ORDER BY occurred_at, row, sequence, event_id LIMIT ?"
        params.append(PAGE_ROWS)
        return sql, params

    def explain(self, sql: str, params: Iterable[Any] = ()) -> list[str]:
        """The database's plan for a query, one line a step (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on
        PostgreSQL): to check that a query uses the index it was written for."""
        if self.dialect.name == "sqlite":
            return [row["detail"] for row in self._rows("EXPLAIN QUERY PLAN " + sql, params)]
        return [row["QUERY PLAN"] for row in self._rows("EXPLAIN " + sql, params)]

    # ------------------------------------------------------------------ as of a time
    #
    # Built only from records that occurred at or before the time (a record without a time counts as the
    # earliest). The database folds the messages: a campaign of 300,000 messages is never in memory.

    def as_of_campaign(self, campaign_id: str, moment: datetime | str, *,
                       with_counts: bool = True) -> dict[str, Any] | None:
        """The campaign as it stood at `moment`, with its `counts` then (unless `with_counts` is False); None if
        the campaign is unknown or had no event by then."""
        limit = _moment(moment)
        events = [jsoncodec.loads(row["body"]) for row in self._rows(
            "SELECT body FROM campaign_events WHERE campaign_id = ? AND sequence > 0"
            " AND (occurred_at IS NULL OR occurred_at <= ?) ORDER BY sequence, event_id", (campaign_id, limit))]
        if not events:
            return None
        campaign = _campaign_dict(fold_campaign(campaign_id, events))
        if with_counts:
            counts = empty_counts()
            source, params = self._as_of_source(campaign_id, limit)
            for row in self._rows(f"SELECT status, COUNT(*) AS n FROM {source} GROUP BY status", params):
                counts[row["status"]] = counts.get(row["status"], 0) + row["n"]
                counts["total"] += row["n"]
            campaign["counts"] = counts
        return campaign

    def as_of_messages(self, campaign_id: str, moment: datetime | str, *, status: str | None = None,
                       reason: str | None = None, search: str | None = None, limit: int | None = None,
                       offset: int = 0) -> list[dict[str, Any]]:
        """The campaign's messages as they stood at `moment`, in row order, with the filters and pages of
        `messages()` (status and reason of that time; the contact as imported)."""
        source, params = self._as_of_source(campaign_id, _moment(moment))
        where, filter_params = self._message_filter(campaign_id, status, reason, search)
        params += filter_params
        sql = f"SELECT * FROM {source} WHERE {where} ORDER BY row, message_id" + self._page(params, limit, offset)
        return [_message_dict(row) for row in self._rows(sql, params)]

    def iter_as_of_messages(self, campaign_id: str, moment: datetime | str, *,
                            batch_size: int = 2000) -> Iterator[dict[str, Any]]:
        """Every message as it stood at `moment`, in row order, fetched in keyset pages (bounded memory)."""
        source, params = self._as_of_source(campaign_id, _moment(moment))
        where, filter_params = self._message_filter(campaign_id, None, None, None)
        return self._keyset_messages(source, where, params + filter_params, batch_size)

    def count_as_of_messages(self, campaign_id: str, moment: datetime | str, *, status: str | None = None,
                             reason: str | None = None, search: str | None = None) -> int:
        source, params = self._as_of_source(campaign_id, _moment(moment))
        where, filter_params = self._message_filter(campaign_id, status, reason, search)
        return self._rows(f"SELECT COUNT(*) AS n FROM {source} WHERE {where}", params + filter_params)[0]["n"]

    def as_of(self, campaign_id: str, moment: datetime | str) -> dict[str, Any] | None:
        """{as_of, campaign, messages}: the campaign and all its messages as they stood at `moment` (for the CLI's
        whole view; pages: `as_of_messages`); None if the campaign is unknown or had no event by then."""
        limit = _moment(moment)
        campaign = self.as_of_campaign(campaign_id, limit)
        if campaign is None:
            return None
        return {"as_of": limit, "campaign": campaign, "messages": self.as_of_messages(campaign_id, limit)}

    def _as_of_source(self, campaign_id: str, moment: str) -> tuple[str, list[Any]]:
        """A FROM item named `messages`, with the messages table's columns, of the campaign's messages as they
        stood at `moment`, and its parameters: `_message_filter` applies to it unchanged."""
        state = ", ".join(
            "NULLIF(e.occurred_at, '') AS updated_at" if c == "updated_at"
            else "e.sequence AS last_sequence" if c == "last_sequence"
            else f"e.{c}" if c in _AS_OF_RECORD_COLUMNS else f"m.{c}"
            for c in MESSAGE_COLUMNS)
        return (f"(SELECT {state} FROM messages m {self.dialect.latest_record_as_of} WHERE m.campaign_id = ?) messages",
                [moment, campaign_id])

    # ------------------------------------------------------------------ opt-out lists

    def opt_out(self, channel: str, destination: str) -> dict[str, Any] | None:
        """A destination's latest change on the channel's opt-out list (`opted_out` False once it left it), or
        None if it never was on it."""
        rows = self._rows("SELECT * FROM opt_outs WHERE channel = ? AND destination = ?", (channel, destination))
        return _opt_out_dict(rows[0]) if rows else None

    def count_opt_outs(self, channel: str) -> int:
        """How many destinations are on the channel's opt-out list now."""
        return self._rows("SELECT COUNT(*) AS n FROM opt_outs WHERE channel = ? AND opted_out = 1", (channel,))[0]["n"]

    def opt_out_page(self, channel: str, *, search: str | None = None, after: tuple[str, str] | None = None,
                     before: tuple[str, str] | None = None, limit: int = 50) -> dict[str, Any]:
        """One keyset page of the destinations on the channel's opt-out list now, newest change first: the first
        page, the one after (older than) the key `after`, or the one before (newer than) `before`, a key being an
        item's (changed_at, destination). `search`: a case-insensitive part of the destination. A range scan of
        (channel, opted_out, changed_at, destination) that stops after limit + 1 matches, never an OFFSET.

        {"items": [...], "newer": KEY or None, "older": KEY or None}: `older` is the last item's key when a
        matching destination follows it, `newer` the first item's when one precedes it (as message_page: known
        exactly in the page's own direction, taken from the cursor in the other)."""
        if after is not None and before is not None:
            raise ValueError("a page is after a key or before one, not both")
        where, params = ["channel = ?", "opted_out = 1"], [channel]
        if search is not None and search.strip():
            where.append(f"{self.dialect.lower}(destination) LIKE ? ESCAPE '\\'")
            params.append(_contains_pattern(search.strip()))
        if before is None:
            bound = "" if after is None else " AND (changed_at, destination) < (?, ?)"
            rows = self._rows(f"SELECT * FROM opt_outs WHERE {' AND '.join(where)}{bound} "
                              "ORDER BY changed_at DESC, destination DESC LIMIT ?",
                              [*params, *(after or ()), limit + 1])
            more, rows = len(rows) > limit, rows[:limit]
            older = _opt_out_key(rows[-1]) if more else None
            newer = None if after is None else _opt_out_key(rows[0]) if rows else None
        else:
            rows = self._rows(f"SELECT * FROM opt_outs WHERE {' AND '.join(where)} AND (changed_at, destination) > "
                              "(?, ?) ORDER BY changed_at, destination LIMIT ?", [*params, *before, limit + 1])
            more, rows = len(rows) > limit, rows[:limit][::-1]
            newer = _opt_out_key(rows[0]) if more else None
            older = _opt_out_key(rows[-1]) if rows else None
        return {"items": [_opt_out_dict(row) for row in rows], "newer": newer, "older": older}

    # ------------------------------------------------------------------ replay support

    def canonical_dump(self) -> Iterator[tuple[str, tuple]]:
        """(table, row) for every row of every table, tables in a fixed order and rows by primary key (byte
        order in both databases), JSON re-encoded with sorted keys: equal events give equal dumps on SQLite
        and PostgreSQL."""
        for table in TABLES:
            columns, key = TABLE_COLUMNS[table], TABLE_KEYS[table]
            json_at = [i for i, c in enumerate(columns) if c in JSON_COLUMNS[table]]
            after = ""
            while True:
                page = self._rows(f"SELECT {', '.join(columns)} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?",
                                  (after, PAGE_ROWS))
                for row in page:
                    values = [row[c] for c in columns]
                    for i in json_at:
                        values[i] = _canonical_json(values[i])
                    yield table, tuple(values)
                if len(page) < PAGE_ROWS:
                    break
                after = page[-1][key]

    def row_counts(self) -> dict[str, int]:
        """Rows per table."""
        return {table: self._rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] for table in TABLES}


def _contains_pattern(term: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for a case-insensitive substring: the lowered term, its wildcards escaped."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", term.lower()) + "%"


def _row_number(term: str) -> int:
    """The row a search term names, or -1: ASCII digits only ('²'.isdigit() is True but int('²') raises, and
    int('٣') is 3), at most 17 of them so the number fits a 64-bit column."""
    return int(term) if re.fullmatch(r"[0-9]{1,17}", term, re.ASCII) else -1


def _moment(moment: datetime | str | None) -> str | None:
    if moment is None or isinstance(moment, str):
        return moment
    return rfc3339(moment)


def _canonical_json(text: str | None) -> str | None:
    return None if text is None else orjson.dumps(orjson.loads(text), option=orjson.OPT_SORT_KEYS).decode()


def _campaign_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    result = {c: row[c] for c in CAMPAIGN_COLUMNS}
    for c in JSON_CAMPAIGN_COLUMNS:
        if isinstance(result[c], str):
            result[c] = jsoncodec.loads(result[c])
    result["stopped"] = bool(result["stopped"])
    result["final"] = result["status"] in FINAL_CAMPAIGN_STATUSES
    return result


def _message_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    result = {c: row[c] for c in MESSAGE_COLUMNS}
    result["variables"] = jsoncodec.loads(result["variables"]) if result["variables"] else {}
    return result


def _opt_out_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"channel": row["channel"], "destination": row["destination"], "opted_out": bool(row["opted_out"]),
            "source": row["source"], "issued_by": row["issued_by"], "reason": row["reason"],
            "changed_at": row["changed_at"]}


def _opt_out_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return row["changed_at"], row["destination"]


def _status_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored status record as it was published."""
    record: dict[str, Any] = {"type": "MessageStatusChanged"}
    record.update((c, row[c]) for c in STATUS_COLUMNS if c != "extra")
    if row["extra"]:
        record.update(jsoncodec.loads(row["extra"]))
    return record


__all__ = ["FINAL_CAMPAIGN_STATUSES", "PAGE_ROWS", "ReadViews", "UNSETTLED_MESSAGE_STATUSES", "empty_counts",
           "settled"]
