"""A CSV upload -> contacts, read as a stream, with the column mapping of the create form.

The CSV rules are the kernel's (services/common/contacts_csv.py), the CLI's too, so one file gives the same
contacts through either door (a test compares them). What differs is memory: the CLI parses a file whole;
here the upload (which Starlette spools to disk) is read twice as a stream:
1. `inspect()`: every record is parsed and discarded, to count the contacts, check the mapping, the limits
   and the chunk sizes, find any malformed line, and judge every contact with the handler's rules (an
   `ImportCheck`: no valid contact, nothing is published), before anything is published;
2. `chunks()`: the contacts again, as AddContacts-sized chunks, published one by one.
So a 300,000-row upload holds one chunk of contacts at a time, never the file.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from services.common.contacts_csv import EMPTY_LAYOUT, CsvLayout, Record, chunk_contacts, contacts_of, \
    detect_layout, file_records
from services.common.import_check import ImportCheck

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # product limit: 50 MB
MAX_CONTACTS = 300_000  # product limit (the handler would refuse the chunk that crosses it: too late)


class MappingError(ValueError):
    """The column mapping names a column the CSV does not have, or maps two columns to one variable."""


def parse_variable_mapping(value: Any) -> dict[str, str] | None:
    """`{column: variable}` or `[column, ...]` (names kept) or None (every other column, names kept)."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return {c: c for c in value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise MappingError("variables must be a JSON object {column: variable name} or a list of column names")


@dataclass(frozen=True)
class UploadLayout(CsvLayout):
    """What the first record decides (the kernel's CsvLayout), and what the first pass found."""
    contacts: int = 0
    chunks: int = 0
    variables: dict[str, str] = field(default_factory=dict)  # CSV column -> variable name


class StreamedCsv:
    """The contacts of a CSV file object (binary, seekable), read as a stream each time they are asked for."""

    def __init__(self, file: IO[bytes], destination_column: str | None = None,
                 variables: dict[str, str] | None = None):
        self.file = file
        self.destination_column = destination_column
        self.mapping = variables
        self.layout: UploadLayout | None = None

    def inspect(self, envelope_bytes: int, check: ImportCheck | None = None) -> UploadLayout:
        """Pass 1: decide the layout, count the contacts and chunks, feed each contact to `check`; CsvError /
        MappingError before publishing."""
        records = file_records(self.file)
        first = next(records, None)
        if first is None:
            self.layout = UploadLayout(EMPTY_LAYOUT.has_header, EMPTY_LAYOUT.destination_index,
                                       chunks=1,  # an empty import still closes the contacts
                                       variables=self._mapping(EMPTY_LAYOUT, width=0))
            return self.layout
        csv_layout = detect_layout(first[1], self.destination_column)
        data = records if csv_layout.has_header else _prepend(first, records)
        width = len(first[1])
        counted = 0

        def counting() -> Iterator[Record]:
            nonlocal width, counted
            for record in data:
                counted += 1
                if counted > MAX_CONTACTS:
                    raise MappingError(f"more than {MAX_CONTACTS:,} contacts: at most {MAX_CONTACTS:,} per campaign")
                width = max(width, len(record[1]))
                yield record

        # The mapping is checked against the widest row, known only at the end; meanwhile it is applied as
        # given (an unknown column simply matches nothing), so both passes build the very same contacts.
        contacts = contacts_of(csv_layout, counting(), self._given_mapping())
        if check is not None:
            contacts = check.feed(contacts)
        chunks = sum(1 for _ in chunk_contacts(contacts, envelope_bytes))
        self.layout = UploadLayout(csv_layout.has_header, csv_layout.destination_index, csv_layout.header,
                                   csv_layout.exported, contacts=counted, chunks=chunks, variables=self._mapping(csv_layout, width))
        return self.layout

    def chunks(self, envelope_bytes: int) -> Iterator[list[dict[str, Any]]]:
        """Pass 2: the contacts in chunks (after `inspect`)."""
        if self.layout is None:
            raise RuntimeError("inspect() first")
        records = file_records(self.file)
        if self.layout.has_header:
            next(records, None)
        return chunk_contacts(contacts_of(self.layout, records, self._given_mapping()), envelope_bytes)

    def _given_mapping(self) -> dict[str, str] | None:
        return None if self.mapping is None else {c: v.strip() for c, v in self.mapping.items()}

    def _mapping(self, layout: CsvLayout, width: int) -> dict[str, str]:
        defaults = layout.variable_columns(width)
        others = list(defaults)
        if self.mapping is None:
            return defaults
        unknown = [c for c in self.mapping if c not in others]
        if unknown:
            besides = " and the export's fixed columns" if layout.exported else ""
            raise MappingError(f"variables name columns the CSV does not have (besides the destination "
                               f"{layout.destination_column!r}{besides}): {unknown}; its columns: {others}")
        targets = [v.strip() for v in self.mapping.values()]
        if any(not t for t in targets) or len(set(targets)) != len(targets):
            raise MappingError("variable names must be non-empty and distinct")
        return self._given_mapping()


def _prepend(first: Record, rest: Iterator[Record]) -> Iterator[Record]:
    yield first
    yield from rest


def upload_size(file: IO[bytes]) -> int:
    file.seek(0, io.SEEK_END)
    size = file.tell()
    file.seek(0)
    return size
