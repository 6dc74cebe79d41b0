"""A CSV upload -> contacts, with the column mapping of the create form.

The CSV rules are the CLI's (outreach/importer.py: optional header, row = physical line number). On top
of them the form may say which column is the destination and which columns become which variables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from outreach.importer import CsvContacts, CsvError, parse_contacts_csv

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # product limit: 50 MB
MAX_CONTACTS = 300_000  # product limit (the handler would refuse the chunk that crosses it: too late)


class MappingError(ValueError):
    """The column mapping names a column the CSV does not have, or maps two columns to one variable."""


@dataclass
class MappedContacts:
    contacts: list[dict[str, Any]]
    has_header: bool
    destination_column: str
    variables: dict[str, str]  # CSV column -> variable name


def parse_variable_mapping(value: Any) -> dict[str, str] | None:
    """`{column: variable}` or `[column, ...]` (names kept) or None (every other column, names kept)."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return {c: c for c in value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise MappingError("variables must be a JSON object {column: variable name} or a list of column names")


def map_contacts(text: str, destination_column: str | None, variables: dict[str, str] | None) -> MappedContacts:
    """Parse the CSV text and keep (and rename) only the mapped variable columns; CsvError / MappingError."""
    parsed: CsvContacts = parse_contacts_csv(text, destination_column)
    if len(parsed.contacts) > MAX_CONTACTS:
        raise MappingError(f"{len(parsed.contacts)} contacts: at most {MAX_CONTACTS:,} per campaign")
    other_columns = [c for i, c in enumerate(parsed.columns) if i != parsed.destination_index]
    if variables is None:
        mapping = {c: c for c in other_columns}
        return MappedContacts(parsed.contacts, parsed.has_header, parsed.destination_column, mapping)
    unknown = [c for c in variables if c not in other_columns]
    if unknown:
        raise MappingError(f"variables name columns the CSV does not have (besides the destination "
                           f"{parsed.destination_column!r}): {unknown}; its columns: {other_columns}")
    targets = [v.strip() for v in variables.values()]
    if any(not t for t in targets) or len(set(targets)) != len(targets):
        raise MappingError("variable names must be non-empty and distinct")
    mapping = {c: v.strip() for c, v in variables.items()}
    contacts = [
        {"row": c["row"], "destination": c["destination"],
         "variables": {mapping[k]: v for k, v in c["variables"].items() if k in mapping}}
        for c in parsed.contacts
    ]
    return MappedContacts(contacts, parsed.has_header, parsed.destination_column, mapping)


def decode_upload(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvError(f"not UTF-8 ({exc})") from None
