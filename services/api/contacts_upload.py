"""A CSV upload -> contacts, read as a stream, with the column mapping of the create form.

The CSV rules are the CLI's (outreach/importer.py: optional header decided on the first record, the
destination column chosen by the same function, row = physical line number, empty cells left out), so one
file gives the same contacts through either door (a test compares them). What differs is memory: the CLI
parses a file whole; here the upload (which Starlette spools to disk) is read twice as a stream:
1. `inspect()`: every record is parsed and discarded, to count the contacts, check the mapping, the limits
   and the chunk sizes, and find any malformed line, before anything is published;
2. `chunks()`: the contacts again, as AddContacts-sized chunks, published one by one.
So a 300,000-row upload holds one chunk of contacts at a time, never the file.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

# _destination_index is the importer's rule for choosing the destination column: reused, not copied.
from outreach.importer import CsvError, _destination_index, chunk_contacts, plausible_destination

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


@dataclass
class CsvLayout:
    """What the first record decides, and what the first pass found."""
    has_header: bool
    destination_index: int  # 0-based
    header: list[str]  # the header's column names ([] without a header)
    contacts: int = 0
    chunks: int = 0
    variables: dict[str, str] = field(default_factory=dict)  # CSV column -> variable name

    def column_name(self, index: int) -> str:
        if index < len(self.header):
            return self.header[index]
        return f"column_{index + 1}"

    @property
    def destination_column(self) -> str:
        return self.column_name(self.destination_index)


class StreamedCsv:
    """The contacts of a CSV file object (binary, seekable), read as a stream each time they are asked for."""

    def __init__(self, file: IO[bytes], destination_column: str | None = None,
                 variables: dict[str, str] | None = None):
        self.file = file
        self.destination_column = destination_column
        self.mapping = variables
        self.layout: CsvLayout | None = None

    # ------------------------------------------------------------------ records

    def _records(self) -> Iterator[tuple[int, list[str]]]:
        """(first physical line, cells) of every non-blank record, from the start of the file."""
        self.file.seek(0)
        # newline="": the importer's StringIO(newline="") line splitting, so line numbers agree.
        text = io.TextIOWrapper(self.file, encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        previous_end = 0
        try:
            for cells in reader:
                start = previous_end + 1
                previous_end = reader.line_num
                if cells and any(c.strip() for c in cells):
                    yield start, cells
        except csv.Error as exc:
            raise CsvError(f"line {reader.line_num}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise CsvError(f"not UTF-8 ({exc})") from None
        finally:
            try:
                text.detach()  # a collected wrapper would close the upload with it
            except ValueError:
                pass  # the upload is closed already (the request is over)

    def _contacts(self, layout: CsvLayout, records: Iterator[tuple[int, list[str]]]) -> Iterator[dict[str, Any]]:
        index = layout.destination_index
        mapping = layout.variables
        for row, cells in records:
            variables = {}
            for i, value in enumerate(cells):
                if i == index or value == "":
                    continue
                name = mapping.get(layout.column_name(i))
                if name is not None:
                    variables[name] = value
            yield {"row": row, "destination": cells[index] if index < len(cells) else "", "variables": variables}

    # ------------------------------------------------------------------ the two passes

    def inspect(self, envelope_bytes: int) -> CsvLayout:
        """Pass 1: decide the layout, count the contacts and chunks; CsvError / MappingError before publishing."""
        records = self._records()
        first = next(records, None)
        if first is None:
            layout = CsvLayout(has_header=False, destination_index=0, header=[])
            layout.variables = self._mapping(layout, width=0)
            layout.chunks = 1  # an empty import still closes the contacts
            self.layout = layout
            return layout
        _, cells = first
        index, by_name = _destination_index(cells, self.destination_column)
        destination_cell = cells[index] if index < len(cells) else ""
        has_header = by_name if by_name is not None else not plausible_destination(destination_cell)
        header = [cell.strip() or f"column_{i + 1}" for i, cell in enumerate(cells)] if has_header else []
        layout = CsvLayout(has_header=has_header, destination_index=index, header=header)
        data = records if has_header else _prepend(first, records)
        width = len(cells)
        counted: list[int] = [0]

        def counting() -> Iterator[tuple[int, list[str]]]:
            nonlocal width
            for record in data:
                counted[0] += 1
                if counted[0] > MAX_CONTACTS:
                    raise MappingError(f"more than {MAX_CONTACTS:,} contacts: at most {MAX_CONTACTS:,} per campaign")
                width = max(width, len(record[1]))
                yield record

        # The mapping is checked against the widest row, known only at the end; meanwhile it is applied as
        # given (an unknown column simply matches nothing), so both passes build the very same contacts.
        layout.variables = _AllColumns() if self.mapping is None else {c: v.strip() for c, v in self.mapping.items()}
        chunks = sum(1 for _ in chunk_contacts(self._contacts(layout, counting()), envelope_bytes))
        layout.contacts = counted[0]
        layout.chunks = chunks
        layout.variables = self._mapping(layout, width)
        self.layout = layout
        return layout

    def chunks(self, envelope_bytes: int) -> Iterator[list[dict[str, Any]]]:
        """Pass 2: the contacts in chunks (after `inspect`)."""
        layout = self.layout
        if layout is None:
            raise RuntimeError("inspect() first")
        records = self._records()
        if layout.has_header:
            next(records, None)
        return chunk_contacts(self._contacts(layout, records), envelope_bytes)

    def _mapping(self, layout: CsvLayout, width: int) -> dict[str, str]:
        others = [layout.column_name(i) for i in range(max(width, len(layout.header)))
                  if i != layout.destination_index]
        if self.mapping is None:
            return {c: c for c in others}
        unknown = [c for c in self.mapping if c not in others]
        if unknown:
            raise MappingError(f"variables name columns the CSV does not have (besides the destination "
                               f"{layout.destination_column!r}): {unknown}; its columns: {others}")
        targets = [v.strip() for v in self.mapping.values()]
        if any(not t for t in targets) or len(set(targets)) != len(targets):
            raise MappingError("variable names must be non-empty and distinct")
        return {c: v.strip() for c, v in self.mapping.items()}


class _AllColumns(dict):
    """Every column under its own name (the default mapping, before the columns are all known)."""

    def get(self, key: str, default: Any = None) -> str:
        return key


def _prepend(first: tuple[int, list[str]], rest: Iterator[tuple[int, list[str]]]):
    yield first
    yield from rest


def upload_size(file: IO[bytes]) -> int:
    file.seek(0, io.SEEK_END)
    size = file.tell()
    file.seek(0)
    return size
