"""CSV contacts -> `AddContacts` chunks. Pure (no Kafka), shared by the CLI and the client.

CSV rules (also in `outreach campaign create --help`):
- UTF-8 (a BOM is ignored), comma-separated, quoted fields as in RFC 4180; blank lines are skipped.
- The header is optional: the first line is taken as a header when its destination cell is not a plausible
  destination, i.e. contains neither '+' (E.164) nor '@' (email).
- The destination column: `destination_column` (a header name, or a 1-based column number); else the first
  header named like a destination (destination, phone, phone_number, mobile, msisdn, email, email_address,
  to); else the first column whose first-line cell contains '+' or '@'; else column 1.
- The other columns become template variables, named by the header (or `column_N`, 1-based, without one).
  Empty cells are left out (a variable with no value leaves its placeholder literal anyway).
- `row` is the physical line number where the record starts (the header, when present, is line 1).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common import jsoncodec

MAX_CONTACTS_PER_CHUNK = 1000
MAX_CHUNK_BYTES = 900 * 1024
DESTINATION_NAMES = ("destination", "phone", "phone_number", "mobile", "msisdn", "email", "email_address", "to")


class CsvError(ValueError):
    """The CSV cannot be imported (unknown destination column, undecodable bytes, ...)."""


def plausible_destination(cell: str) -> bool:
    return "+" in cell or "@" in cell


@dataclass
class CsvContacts:
    contacts: list[dict[str, Any]]
    has_header: bool
    destination_index: int  # 0-based
    columns: list[str] = field(default_factory=list)  # variable name of each column (destination's included)

    @property
    def destination_column(self) -> str:
        return self.columns[self.destination_index] if self.columns else f"column_{self.destination_index + 1}"


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _destination_index(first: list[str], destination_column: str | None) -> tuple[int, bool | None]:
    """(0-based destination index, header decided by name or None)."""
    if destination_column is not None:
        wanted = destination_column.strip()
        names = [cell.strip() for cell in first]
        if wanted in names:
            return names.index(wanted), True
        lowered = [n.lower() for n in names]
        if wanted.lower() in lowered:
            return lowered.index(wanted.lower()), True
        if wanted.isdigit() and int(wanted) >= 1:
            return int(wanted) - 1, None
        raise CsvError(f"destination column {destination_column!r} is not in the header {names}")
    normalised = [_normalise_name(cell) for cell in first]
    for name in DESTINATION_NAMES:
        if name in normalised:
            return normalised.index(name), None
    for index, cell in enumerate(first):
        if plausible_destination(cell):
            return index, None
    return 0, None


def parse_contacts_csv(text: str, destination_column: str | None = None) -> CsvContacts:
    """Contacts `{row, destination, variables}` of a CSV text (see the module docstring for the rules)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[tuple[int, list[str]]] = []  # (first physical line, cells)
    previous_end = 0
    try:
        for cells in reader:
            start = previous_end + 1
            previous_end = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            records.append((start, cells))
    except csv.Error as exc:
        raise CsvError(f"line {reader.line_num}: {exc}") from exc
    if not records:
        return CsvContacts([], has_header=False, destination_index=0)
    first_line, first = records[0]
    index, by_name = _destination_index(first, destination_column)
    dest_cell = first[index] if index < len(first) else ""
    has_header = by_name if by_name is not None else not plausible_destination(dest_cell)
    width = max(len(cells) for _, cells in records)
    if has_header:
        columns = [cell.strip() or f"column_{i + 1}" for i, cell in enumerate(first)]
        columns += [f"column_{i + 1}" for i in range(len(columns), width)]
        data = records[1:]
    else:
        columns = [f"column_{i + 1}" for i in range(width)]
        data = records
    contacts = []
    for row, cells in data:
        destination = cells[index] if index < len(cells) else ""
        variables = {columns[i]: value for i, value in enumerate(cells) if i != index and value != ""}
        contacts.append({"row": row, "destination": destination, "variables": variables})
    return CsvContacts(contacts, has_header=has_header, destination_index=index, columns=columns)


def read_contacts_csv(path: Path | str, destination_column: str | None = None) -> CsvContacts:
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvError(f"{path}: not UTF-8 ({exc})") from exc
    return parse_contacts_csv(text, destination_column)


def chunk_contacts(
    contacts: Iterable[dict[str, Any]],
    envelope_bytes: int,
    max_contacts: int = MAX_CONTACTS_PER_CHUNK,
    max_bytes: int = MAX_CHUNK_BYTES,
) -> Iterator[list[dict[str, Any]]]:
    """Split contacts into chunks of at most `max_contacts` whose command (an envelope of `envelope_bytes`
    with an empty contact list, plus the contacts and their commas) is at most `max_bytes` once encoded.
    Always yields at least one (possibly empty) chunk."""
    chunk: list[dict[str, Any]] = []
    size = envelope_bytes
    yielded = False
    for contact in contacts:
        cost = len(jsoncodec.dumps(contact)) + (1 if chunk else 0)
        if envelope_bytes + len(jsoncodec.dumps(contact)) > max_bytes:
            raise CsvError(f"row {contact.get('row')}: too large for one command ({max_bytes} bytes at most)")
        if chunk and (len(chunk) >= max_contacts or size + cost > max_bytes):
            yield chunk
            yielded = True
            chunk, size = [], envelope_bytes
            cost = len(jsoncodec.dumps(contact))
        chunk.append(contact)
        size += cost
    if chunk or not yielded:
        yield chunk
