"""The New campaign screen's pure parts: a CSV's first records and columns, the column mapping form (Destination,
a named variable, or not imported), and the check of the whole file before anything is published: the
handler's own rules on every row (services/common/import_check.py), the invalid rows with their reasons and
cells, and a `VariableProfile` of the valid rows that the template editor flags missing variables with.

The CSV rules are the kernel's (services/common/contacts_csv.py): the mapping ends as the API's create form
fields (`destination_column`, `variables`), so the console imports a file exactly as `POST /campaigns` does.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from services.api.contacts_upload import MAX_CONTACTS
from services.api.export import neutralise
from services.common.contacts_csv import CsvError, CsvLayout, Record, detect_layout, file_records
from services.common.import_check import ImportCheck
from services.common.templating import placeholders

SAMPLE_RECORDS = 50  # records read to show the columns (a wider row later only brings cells not imported)
PREVIEW_ROWS = 5  # data rows shown under the mapping
ROWS_SHOWN = 5  # rows named per missing variable (as the handler's report: MISSING_VARIABLE_ROWS_LIMIT)

DESTINATION, VARIABLE, SKIP = "destination", "variable", "skip"
ROLES = {DESTINATION: "Destination", VARIABLE: "Template variable", SKIP: "Not imported"}
# What a `{{name}}` placeholder can name (services/common/templating.py): no braces or line breaks.
_UNUSABLE_NAME = re.compile(r"[{}\r\n]")


class MappingProblems(ValueError):
    """The mapping form cannot be used: each problem in plain words."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Column:
    index: int  # 0-based
    name: str  # the kernel's name: the header's cell, or column_N without a header
    label: str  # what the page calls it: the header's cell, or "Column N"
    role: str  # the proposed role
    variable: str  # the proposed variable name


@dataclass(frozen=True)
class CsvSample:
    """The first records of a CSV, the layout they suggest (the CLI's and the API's detection), its columns."""
    first: list[str]
    records: list[Record]
    layout: CsvLayout
    width: int

    @property
    def data_rows(self) -> list[Record]:
        return self.records[1:] if self.layout.has_header else self.records

    def columns(self) -> list[Column]:
        columns = []
        for index in range(self.width):
            if index == self.layout.destination_index:
                role = DESTINATION
            elif self.layout.exported and self.layout.column_name(index) not in self.layout.variable_columns(self.width):
                role = SKIP  # an export's fixed columns (status, reason, ...) are no variables
            else:
                role = VARIABLE
            label = self.layout.column_name(index) if self.layout.has_header else f"Column {index + 1}"
            columns.append(Column(index, self.layout.column_name(index), label, role,
                                  self.layout.variable_name(index)))
        return columns

    def preview(self, rows: int = PREVIEW_ROWS) -> list[Record]:
        return [(row, cells + [""] * (self.width - len(cells))) for row, cells in self.data_rows[:rows]]


def sample_csv(file: IO[bytes], records: int = SAMPLE_RECORDS) -> CsvSample:
    """The first `records` records of a CSV file (CsvError when it has none or cannot be read)."""
    sample: list[Record] = []
    for record in file_records(file):
        sample.append(record)
        if len(sample) >= records:
            break
    if not sample:
        raise CsvError("the file has no line with a value")
    first = sample[0][1]
    layout = detect_layout(first)
    return CsvSample(first, sample, layout, max(max(len(cells) for _, cells in sample), len(layout.header)))


@dataclass(frozen=True)
class ColumnMapping:
    """The form's choice: the destination column and {column index: variable name} (others not imported)."""
    destination_index: int
    variables: dict[int, str]

    def to_json(self) -> dict[str, Any]:
        return {"destination_index": self.destination_index, "variables": {str(i): v for i, v in self.variables.items()}}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ColumnMapping:
        return cls(int(value["destination_index"]), {int(i): str(v) for i, v in value["variables"].items()})


def read_mapping(form: Mapping[str, Any], columns: list[Column]) -> ColumnMapping:
    """The mapping of the form fields `role_N` (destination, variable, skip) and `variable_N` (a name), N the
    0-based column index. MappingProblems: not exactly one destination, a blank or unusable name, one name
    twice, or a column mapped whose header name another column has too (the API maps columns by name)."""
    problems: list[str] = []
    destinations: list[Column] = []
    variables: dict[int, str] = {}
    owners: dict[str, Column] = {}
    for column in columns:
        role = str(form.get(f"role_{column.index}") or column.role)
        if role not in ROLES:
            problems.append(f"{column.label}: unknown choice {role!r}")
        elif role == DESTINATION:
            destinations.append(column)
        elif role == VARIABLE:
            name = str(form.get(f"variable_{column.index}", column.variable)).strip()
            if not name:
                problems.append(f"{column.label}: a template variable needs a name")
            elif _UNUSABLE_NAME.search(name):
                problems.append(f"{column.label}: the variable name {name!r} has a brace or a line break, so no "
                                "{{placeholder}} could name it")
            elif name in owners:
                problems.append(f"{owners[name].label} and {column.label} are both named {name!r}: give each "
                                "variable its own name")
            else:
                owners[name] = column
                variables[column.index] = name
    if len(destinations) != 1:
        chosen = ", ".join(c.label for c in destinations) or "none"
        problems.append(f"choose exactly one Destination column (chosen: {chosen})")
    names = [c.name for c in columns]
    mapped = [c for c in columns if c.index in variables or c in destinations]
    for column in mapped:
        if names.count(column.name) > 1:
            problems.append(f"more than one column is named {column.name!r}: rename them in the file to import "
                            "this one")
            break
    if problems:
        raise MappingProblems(problems)
    return ColumnMapping(destinations[0].index, variables)


@dataclass(frozen=True)
class ResolvedMapping:
    """A mapping as the API's create form takes it, with the layout the kernel will read the file with."""
    destination_column: str  # the header's name, or the 1-based column number without a header
    variables: dict[str, str]  # {column name: variable name}
    layout: CsvLayout

    def to_json(self) -> dict[str, Any]:
        return {"destination_column": self.destination_column, "variables": self.variables}


def resolve(sample: CsvSample, mapping: ColumnMapping) -> ResolvedMapping:
    """The form fields for the chosen columns. Without a header a column goes by number, and the kernel decides
    again whether the first line is a header (its destination cell holds no + or @): the column names follow
    that decision, so the API finds the very columns chosen here."""
    if sample.layout.has_header:
        spec = sample.layout.column_name(mapping.destination_index)
    else:
        spec = str(mapping.destination_index + 1)
    layout = detect_layout(sample.first, spec)
    variables = {layout.column_name(index): name for index, name in sorted(mapping.variables.items())}
    return ResolvedMapping(spec, variables, layout)


# ------------------------------------------------------------------ the valid rows' variables

@dataclass
class VariableProfile:
    """Which variables the valid contacts (the future messages) have values for: enough to tell, for any
    template, which placeholders stay literal in how many messages and in which first rows, without reading
    the contacts again. Its report is the handler's (`templating.MissingVariables`), the tests check it."""
    contacts: int = 0
    present: dict[str, int] = field(default_factory=dict)  # variable -> contacts with a value
    missing_rows: dict[str, list[int]] = field(default_factory=dict)  # variable -> first rows without one
    first_rows: list[int] = field(default_factory=list)  # the first valid rows (an unmapped placeholder's)
    sample: dict[str, Any] | None = None  # the first valid contact {row, destination, variables}

    @classmethod
    def of(cls, variables: Iterable[str]) -> VariableProfile:
        names = list(variables)
        return cls(present=dict.fromkeys(names, 0), missing_rows={name: [] for name in names})

    def add(self, contact: Mapping[str, Any]) -> None:
        """One valid contact."""
        row, values = contact.get("row"), contact.get("variables") or {}
        self.contacts += 1
        if self.sample is None:
            self.sample = {"row": row, "destination": contact.get("destination"),
                           "variables": dict(values)}
        if len(self.first_rows) < ROWS_SHOWN:
            self.first_rows.append(row)
        for name, rows in self.missing_rows.items():
            if values.get(name):
                self.present[name] += 1
            elif len(rows) < ROWS_SHOWN:
                rows.append(row)

    def missing(self, text: str) -> list[dict[str, Any]]:
        """[{variable, count, first_rows, mapped}] for each placeholder of `text` that some contact has no value
        for, in the template's order: a variable no column was mapped to is missing in every contact."""
        report = []
        for name in placeholders(text):
            if name in self.present:
                count, rows, mapped = self.contacts - self.present[name], self.missing_rows[name], True
            else:
                count, rows, mapped = self.contacts, self.first_rows, False
            if count:
                report.append({"variable": name, "count": count, "first_rows": list(rows), "mapped": mapped})
        return report

    def to_json(self) -> dict[str, Any]:
        return {"contacts": self.contacts, "present": self.present, "missing_rows": self.missing_rows,
                "first_rows": self.first_rows, "sample": self.sample}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> VariableProfile:
        return cls(int(value["contacts"]), dict(value["present"]), {k: list(v) for k, v in value["missing_rows"].items()},
                   list(value["first_rows"]), value.get("sample"))


@dataclass
class ImportPreview:
    """What the handler will make of the file: its counts and reasons (the `ImportCheck`'s), and the profile."""
    contacts: int
    valid: int
    invalid: int
    invalid_reasons: dict[str, dict[str, Any]]
    profile: VariableProfile
    has_header: bool
    destination_column: str
    default_region: str | None

    def to_json(self) -> dict[str, Any]:
        return {"contacts": self.contacts, "valid": self.valid, "invalid": self.invalid,
                "invalid_reasons": self.invalid_reasons, "profile": self.profile.to_json(),
                "has_header": self.has_header, "destination_column": self.destination_column,
                "default_region": self.default_region}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ImportPreview:
        return cls(value["contacts"], value["valid"], value["invalid"], dict(value["invalid_reasons"]),
                   VariableProfile.from_json(value["profile"]), value["has_header"], value["destination_column"],
                   value.get("default_region"))


def invalid_rows_header(layout: CsvLayout, width: int) -> list[str]:
    """The invalid rows file's columns: the row (its line in the file), the reason, then the file's own."""
    return ["row", "reason", *layout.columns(width)]


def check_import(file: IO[bytes], mapping: ResolvedMapping, channel: str, default_region: str | None,
                 invalid_rows: IO[str] | None = None, width: int = 0) -> ImportPreview:
    """Every contact of the file judged with the handler's rules (`ImportCheck`), as the API will publish them;
    each invalid row written to `invalid_rows` (row, reason, its cells; a cell a spreadsheet would read as a
    formula gets the export's apostrophe, which the importers take off again). CsvError: the file cannot be
    read, or has more contacts than a campaign may."""
    records = file_records(file)
    first = next(records, None)
    if first is None:
        raise CsvError("the file has no line with a value")
    layout = detect_layout(first[1], mapping.destination_column)
    writer = csv.writer(invalid_rows, lineterminator="\r\n") if invalid_rows is not None else None
    if writer is not None:
        writer.writerow([neutralise(c) for c in invalid_rows_header(layout, width or len(first[1]))])
    check = ImportCheck(channel, None, default_region)
    profile = VariableProfile.of(mapping.variables.values())
    counted: dict[str, int] = {}

    data = records if layout.has_header else _prepend(first, records)
    for row, cells in data:
        if check.contacts >= MAX_CONTACTS:
            raise CsvError(f"more than {MAX_CONTACTS:,} contacts: at most {MAX_CONTACTS:,} per campaign")
        contact = layout.contact(row, cells, mapping.variables)  # as contacts_csv.contacts_of makes them
        valid_before = check.valid
        check.add(contact)
        if check.valid > valid_before:
            profile.add(contact)
            continue
        # The check counts each reason; the one that grew is this row's.
        reason = next(r for r, entry in check.invalid_reasons.items() if entry["count"] > counted.get(r, 0))
        counted[reason] = counted.get(reason, 0) + 1
        if writer is not None:
            writer.writerow([row, reason, *(neutralise(c) for c in cells)])
    return ImportPreview(check.contacts, check.valid, check.invalid, check.invalid_reasons, profile,
                         layout.has_header, layout.destination_column, default_region)


def _prepend(first: Record, rest: Iterable[Record]) -> Iterable[Record]:
    yield first
    yield from rest


# ------------------------------------------------------------------ after the import: the handler's answer

@dataclass
class ImportReport:
    """A campaign's import as the command handler answered it (its ContactsAdded, one per chunk)."""
    valid: int = 0
    invalid: int = 0
    reasons: dict[str, dict[str, Any]] = field(default_factory=dict)  # reason -> {count, first_rows}
    invalid_rows: list[tuple[int, str]] = field(default_factory=list)  # (row, reason), in row order
    chunks: int = 0  # chunks answered
    ready: bool = False  # CampaignReady seen: the contacts are closed
    rejections: list[str] = field(default_factory=list)
    expected_chunks: int | None = None

    @property
    def rows(self) -> int:
        return self.valid + self.invalid

    @property
    def finished(self) -> bool:
        return self.ready or bool(self.rejections) or (self.expected_chunks is not None
                                                       and self.chunks >= self.expected_chunks)


def import_report(events: Iterable[Mapping[str, Any]], expected_chunks: int | None = None) -> ImportReport:
    """The report of a campaign's events: each chunk counted once (a chunk sent again is answered with a
    ContactsAdded repeating its counts), reasons most frequent first, rows named ROWS_SHOWN per reason."""
    report = ImportReport(expected_chunks=expected_chunks)
    seen: set[int] = set()
    for event in events:
        kind = event.get("type")
        if kind == "ContactsAdded" and event.get("chunk_no") not in seen:
            seen.add(event.get("chunk_no"))
            report.valid += int(event.get("valid", 0))
            report.invalid += int(event.get("invalid", 0))
            for invalid in event.get("invalid_rows") or []:
                row, reason = int(invalid["row"]), str(invalid["reason"])
                report.invalid_rows.append((row, reason))
                entry = report.reasons.setdefault(reason, {"count": 0, "first_rows": []})
                entry["count"] += 1
                if len(entry["first_rows"]) < ROWS_SHOWN:
                    entry["first_rows"].append(row)
        elif kind == "CampaignReady":
            report.ready = True
        elif kind == "CommandRejected" and event.get("command_type") in ("CreateCampaign", "AddContacts"):
            report.rejections.append(f"{event.get('command_type')}: {event.get('reason')} {event.get('detail', '')}"
                                     .strip())
    report.chunks = len(seen)
    report.invalid_rows.sort()
    report.reasons = dict(sorted(report.reasons.items(), key=lambda item: -item[1]["count"]))
    return report


def joined_invalid_rows(rows: Iterable[tuple[int, str]], stored: IO[str] | None) -> Iterable[list[str]]:
    """The header, then each (row, reason) the handler reported with the row's cells from the check's
    invalid-rows file (`check_import`; both in row order, read together once). A row the file lacks, or
    no file (a campaign made elsewhere), gives the row and its reason alone."""
    reader = csv.reader(stored) if stored is not None else iter(())
    header = next(reader, None) or ["row", "reason"]
    yield header
    pending = next(reader, None)
    for row, reason in rows:
        while pending is not None and _row_of(pending) < row:
            pending = next(reader, None)
        if pending is not None and _row_of(pending) == row:
            yield [str(row), reason, *pending[2:]]
        else:
            yield [str(row), reason]


def _row_of(stored_row: list[str]) -> int:
    try:
        return int(stored_row[0])
    except (IndexError, ValueError):
        return -1
