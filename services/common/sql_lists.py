"""A list of values as ONE statement parameter, in SQLite and PostgreSQL.

`WHERE id IN (?, ?, ...)` with one placeholder per value is a different statement for every list length, and
the DB-API drivers cache prepared statements per connection (Python's sqlite3: 128 of them): a service that
queries lists of many lengths keeps up to 128 large prepared statements, about 30 kB each for 500 values
(measured: the timeout sweeper's RSS grew about 20 MB more at 300,000 messages than at 30,000). One
parameter keeps one statement per query.

    SQLite:      message_id IN (SELECT value FROM json_each(?))        param: a JSON array
    PostgreSQL:  message_id = ANY(%s)                                   param: a list (a text[] array)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


def in_list(column: str, postgres: bool) -> str:
    """`column` is one of the values of a list parameter (`list_param`)."""
    return f"{column} = ANY(%s)" if postgres else f"{column} IN (SELECT value FROM json_each(?))"


def list_param(values: Sequence[str], postgres: bool) -> Any:
    return list(values) if postgres else orjson.dumps(list(values)).decode()


def pair_in_list(first: str, second: str, postgres: bool) -> str:
    """`(first, second)` is one of the pairs of a pair-list parameter (`pair_list_params`: two parameters in
    PostgreSQL, one in SQLite)."""
    if postgres:
        return f"({first}, {second}) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
    return (f"({first}, {second}) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') "
            "FROM json_each(?))")


def pair_list_params(pairs: Sequence[tuple[str, str]], postgres: bool) -> tuple[Any, ...]:
    if postgres:
        return [a for a, _ in pairs], [b for _, b in pairs]
    return (orjson.dumps([list(pair) for pair in pairs]).decode(),)
