"""CSV export of a campaign's messages, streamed: memory stays bounded whatever the number of rows.

Rows come from `ReadModel.iter_messages` (keyset pages) and leave as text blocks of EXPORT_BLOCK_ROWS rows.
The variable columns are the union of the messages' variable names, found by a first pass over the same
query (a set of names: bounded too), because a CSV header must come before the rows.

Formula injection (OWASP "CSV Injection"): a cell beginning with = + - @ (or tab / carriage return) is
prefixed with a single quote, so a spreadsheet shows it as text instead of evaluating it. SMS destinations
begin with + and so are exported as '+15551234567: that is the price of opening the file safely. The importers
(services/common/contacts_csv.py) take that apostrophe off again before = + - @, know the fixed columns, and so
import an export unchanged.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from services.common.contacts_csv import EXPORT_COLUMNS, EXPORT_RENAMED_PREFIX

EXPORT_BLOCK_ROWS = 1000
FIXED_COLUMNS = EXPORT_COLUMNS  # the kernel's: its importers know an export by them (and import it unchanged)
_DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: Any) -> str:
    """The cell as text, with a leading quote when a spreadsheet would read it as a formula."""
    text = "" if cell is None else str(cell)
    if text.startswith(_DANGEROUS_FIRST):
        return "'" + text
    return text


def variable_columns(messages: Iterable[dict[str, Any]]) -> list[str]:
    """Variable names in order of first appearance."""
    seen: dict[str, None] = {}
    for message in messages:
        for name in message.get("variables") or ():
            seen.setdefault(name, None)
    return list(seen)


def header(variables: list[str]) -> list[str]:
    # A variable named like a fixed column keeps its data under a prefixed name.
    return [*FIXED_COLUMNS, *(f"{EXPORT_RENAMED_PREFIX}{v}" if v in FIXED_COLUMNS else v for v in variables)]


def csv_blocks(messages: Callable[[], Iterator[dict[str, Any]]], block_rows: int = EXPORT_BLOCK_ROWS) -> Iterator[str]:
    """The CSV text in blocks; `messages()` gives a fresh iterator over the rows each time it is called."""
    variables = variable_columns(messages())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180
    writer.writerow([neutralise(c) for c in header(variables)])
    rows = 0
    for message in messages():
        values = message.get("variables") or {}
        writer.writerow([neutralise(message.get(c)) for c in FIXED_COLUMNS]
                        + [neutralise(values.get(v)) for v in variables])
        rows += 1
        if rows % block_rows == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    tail = buffer.getvalue()
    if tail:
        yield tail
