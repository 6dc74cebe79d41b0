"""The contacts CSV import rules, once for every door: the CLI's `campaign create` and the API's upload read a
file into the same contacts, and cut them into the same AddContacts chunks.

CSV rules (also in `outreach campaign create --help` and the API's create form):
- UTF-8 (a BOM is ignored), comma-separated, quoted fields as in RFC 4180; blank lines are skipped.
- The header is optional: the first line is taken as a header when its destination cell is not a plausible
  destination, i.e. contains neither '+' (E.164) nor '@' (email).
- The destination column: `destination_column` (a header name, or a 1-based column number); else the first
  header named like a destination (destination, phone, phone_number, mobile, msisdn, email, email_address,
  to); else the first column whose first-line cell contains '+' or '@'; else column 1.
- The other columns become template variables, named by the header (or `column_N`, 1-based, without one).
  Empty cells are left out (a variable with no value leaves its placeholder literal anyway).
- A cell (header or data) that begins with an apostrophe followed by = + - @ loses the apostrophe: the API's
  export adds it so a spreadsheet does not read the cell as a formula (services/api/export.py), so `'+1415...`
  imports as `+1415...`. Any other apostrophe stays (`'tis` is kept, and so is `'` before a tab or a
  carriage return, which the export also neutralises).
- A CSV exported by the API (`GET /campaigns/ID/messages.csv`: a header beginning with EXPORT_COLUMNS) imports
  again unchanged: its `destination` column is the destination, its other fixed columns (row, message_id,
  status, ...) are not variables, and a variable it had to rename (`variable_row`) gets its name back (`row`).
- `row` is the physical line number where the record starts (the header, when present, is line 1).
- Chunks: at most 1,000 contacts per AddContacts, and at most 900 KiB per encoded command (the contract).

Whether a destination is *valid* is not decided here: the command handler judges every row
(schemas/destinations.py) and reports the invalid ones.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from schemas.commands import MAX_CHUNK_BYTES, MAX_CONTACTS_PER_CHUNK, make_command
from services.common import jsoncodec

DESTINATION_NAMES = ("destination", "phone", "phone_number", "mobile", "msisdn", "email", "email_address", "to")
# The fixed columns of the API's CSV export, in order (services/api/export.py writes them, then the variables); a
# variable named like one of them is exported as `variable_<name>`.
EXPORT_COLUMNS = ("row", "message_id", "destination", "status", "reason", "provider_code", "attempt", "run_no",
                  "updated_at")
EXPORT_RENAMED_PREFIX = "variable_"
FORMULA_FIRST = ("=", "+", "-", "@")  # what the export's apostrophe protects and the import takes it off

Record = tuple[int, list[str]]  # (the physical line it starts on, its cells)


class CsvError(ValueError):
    """The CSV cannot be imported (unknown destination column, undecodable bytes, a row too large, ...)."""


def plausible_destination(cell: str) -> bool:
    return "+" in cell or "@" in cell


def unneutralise(cell: str) -> str:
    """`cell` without the apostrophe a formula-neutralising export put before = + - @ (any other kept)."""
    if len(cell) > 1 and cell[0] == "'" and cell[1] in FORMULA_FIRST:
        return cell[1:]
    return cell


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def destination_index(first: list[str], destination_column: str | None = None) -> tuple[int, bool | None]:
    """The destination column of a CSV whose first record is `first`: (its 0-based index, whether the first
    record is a header when the choice says so (a column named) or None when plausibility must decide)."""
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


@dataclass(frozen=True)
class CsvLayout:
    """What the first record decides: whether it is a header, where the destination is, the column names."""
    has_header: bool
    destination_index: int  # 0-based
    header: list[str] = field(default_factory=list)  # the header's column names ([] without a header)
    exported: bool = False  # the header is the API export's (EXPORT_COLUMNS first): those are no variables

    def column_name(self, index: int) -> str:
        if index < len(self.header):
            return self.header[index]
        return f"column_{index + 1}"

    @property
    def destination_column(self) -> str:
        return self.column_name(self.destination_index)

    def columns(self, width: int) -> list[str]:
        """The name of every column (the destination's included) of a CSV whose widest record is `width`."""
        return [self.column_name(i) for i in range(max(width, len(self.header)))]

    def _fixed(self, index: int) -> bool:
        return self.exported and index < len(EXPORT_COLUMNS)

    def variable_name(self, index: int) -> str:
        """The variable a column becomes by default: its name (an export's `variable_row` is `row` again)."""
        column = self.column_name(index)
        if self.exported and column.startswith(EXPORT_RENAMED_PREFIX) \
                and column[len(EXPORT_RENAMED_PREFIX):] in EXPORT_COLUMNS:
            return column[len(EXPORT_RENAMED_PREFIX):]
        return column

    def variable_columns(self, width: int) -> dict[str, str]:
        """{column: its variable's name} of every column that can be a variable (neither the destination nor an
        export's fixed column) in a CSV whose widest record is `width`."""
        return {self.column_name(i): self.variable_name(i) for i in range(max(width, len(self.header)))
                if i != self.destination_index and not self._fixed(i)}

    def contact(self, row: int, cells: list[str], variables: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The contact of one data record. `variables` ({column: variable name}) keeps only the columns it
        names, renamed; None keeps every other column under its own name."""
        index = self.destination_index
        named: dict[str, str] = {}
        for i, value in enumerate(cells):
            if i == index or value == "" or self._fixed(i):
                continue
            name = self.variable_name(i) if variables is None else variables.get(self.column_name(i))
            if name is not None:
                named[name] = unneutralise(value)
        destination = unneutralise(cells[index]) if index < len(cells) else ""
        return {"row": row, "destination": destination, "variables": named}


EMPTY_LAYOUT = CsvLayout(has_header=False, destination_index=0)  # a CSV without a record


def detect_layout(first: list[str], destination_column: str | None = None) -> CsvLayout:
    """The layout a CSV's first record decides (CsvError for a destination column it does not have)."""
    first = [unneutralise(cell) for cell in first]
    index, by_name = destination_index(first, destination_column)
    destination_cell = first[index] if index < len(first) else ""
    has_header = by_name if by_name is not None else not plausible_destination(destination_cell)
    header = [cell.strip() or f"column_{i + 1}" for i, cell in enumerate(first)] if has_header else []
    exported = has_header and tuple(header[:len(EXPORT_COLUMNS)]) == EXPORT_COLUMNS
    return CsvLayout(has_header=has_header, destination_index=index, header=header, exported=exported)


def csv_records(text: IO[str]) -> Iterator[Record]:
    """(first physical line, cells) of every non-blank record of a text stream opened with newline=""."""
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


def file_records(file: IO[bytes]) -> Iterator[Record]:
    """The records of a binary file object, read as a stream from its start (it must be seekable)."""
    file.seek(0)
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    try:
        yield from csv_records(text)
    except UnicodeDecodeError as exc:
        raise CsvError(f"not UTF-8 ({exc})") from None
    finally:
        try:
            text.detach()  # a collected wrapper would close the file with it
        except ValueError:
            pass  # the file is closed already


def contacts_of(layout: CsvLayout, records: Iterable[Record],
                variables: Mapping[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The contacts of the data records (the header, if any, already left out)."""
    for row, cells in records:
        yield layout.contact(row, cells, variables)


@dataclass(frozen=True)
class CsvContacts(CsvLayout):
    """A whole CSV's contacts `{row, destination, variables}`, with the layout that read them."""
    contacts: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # every column's name (the destination's included)


def parse_contacts_csv(text: str, destination_column: str | None = None) -> CsvContacts:
    """The contacts of a CSV text (see the module docstring for the rules)."""
    records = list(csv_records(io.StringIO(text, newline="")))
    if not records:
        return CsvContacts(EMPTY_LAYOUT.has_header, EMPTY_LAYOUT.destination_index)
    layout = detect_layout(records[0][1], destination_column)
    data = records[1:] if layout.has_header else records
    width = max(len(cells) for _, cells in records)
    return CsvContacts(layout.has_header, layout.destination_index, layout.header, layout.exported,
                       contacts=list(contacts_of(layout, data)), columns=layout.columns(width))


def read_contacts_csv(path: Path | str, destination_column: str | None = None) -> CsvContacts:
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvError(f"{path}: not UTF-8 ({exc})") from exc
    return parse_contacts_csv(text, destination_column)


# ------------------------------------------------------------------ chunks

def add_contacts_envelope_bytes(campaign_id: str, issued_by: str, default_region: str | None = None,
                                issued_via: str | None = None) -> int:
    """The encoded size of the largest AddContacts envelope without contacts (a long chunk_no, `false`, the
    import's default region and `issued_via` if it has them): what each chunk's contacts must fit beside."""
    extra = {} if default_region is None else {"default_region": default_region}
    if issued_via is not None:
        extra["issued_via"] = issued_via
    probe = make_command("AddContacts", campaign_id, issued_by, chunk_no=10**9, contacts=[], last_chunk=False,
                         **extra)
    return len(jsoncodec.dumps(probe))


def chunk_contacts(
    contacts: Iterable[dict[str, Any]],
    envelope_bytes: int,
    max_contacts: int = MAX_CONTACTS_PER_CHUNK,
    max_bytes: int = MAX_CHUNK_BYTES,
) -> Iterator[list[dict[str, Any]]]:
    """Split contacts into chunks of at most `max_contacts` whose command (an envelope of `envelope_bytes`
    with an empty contact list, plus the contacts and their commas) is at most `max_bytes` once encoded.
    Always yields at least one (possibly empty) chunk: an empty import still closes the contacts."""
    chunk: list[dict[str, Any]] = []
    size = envelope_bytes
    yielded = False
    for contact in contacts:
        encoded = len(jsoncodec.dumps(contact))
        if envelope_bytes + encoded > max_bytes:
            raise CsvError(f"row {contact.get('row')}: too large for one command ({max_bytes} bytes at most)")
        cost = encoded + (1 if chunk else 0)
        if chunk and (len(chunk) >= max_contacts or size + cost > max_bytes):
            yield chunk
            yielded = True
            chunk, size = [], envelope_bytes
            cost = encoded
        chunk.append(contact)
        size += cost
    if chunk or not yielded:
        yield chunk
