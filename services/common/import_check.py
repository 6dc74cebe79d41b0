"""The importers' check of a contacts file before anything is published (contract v1.1), once for every door:
the CLI's `campaign create` and the API's CSV upload both feed their contacts, as they will publish them, to an
`ImportCheck`.

- Every row is judged with the command handler's own rules: `schemas.destinations.validate_destination` with the
  import's default region, and a destination met earlier in the file is `duplicate_destination` (the campaign is
  new, so the file is all it holds). The handler still judges every row when the chunks arrive (its
  ContactsAdded are the answer); this check predicts them, it does not replace them.
- An import with no valid row (an empty file, or every row invalid) is refused before anything is published:
  `refusal()` says why (the CLI exits 2, the API answers 422). A campaign without a valid contact could never run.
- The template's placeholders that have no value in some valid row are reported (which variable, its count and
  first rows: `templating.MissingVariables`, the very report the handler's run summary makes), so they are known
  at create, not when recipients get the literal `{{placeholder}}`.

The default region of an import: its own option (the CLI's --default-region, the API's `default_region` field),
else the importer's OUTREACH_DEFAULT_REGION. It goes into every AddContacts (`default_region`), so the handler
normalises with exactly the region this check used.

Memory: the valid destinations are kept to find duplicates as 16-byte digests (the handler's DestinationSet:
about 5 MB for the 300,000 contacts a campaign may have; strings took 25 MB), nothing else grows with the file.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from schemas.destinations import DUPLICATE_DESTINATION, INVALID_E164, DestinationSet, validate_destination
from schemas.phone import check_region
from services.common import templating

ROWS_SHOWN = 5  # rows named per invalid reason (the count has them all)
RECENT_CHUNK = 1000  # destinations kept as strings before they join the digest runs

__all__ = ["ImportCheck", "import_region", "ROWS_SHOWN"]


def _rows(entry: Mapping[str, Any]) -> str:
    """`row 2`, `rows 2, 3, 4, 5, 6, ...`: an entry's first rows, with an ellipsis when there are more."""
    rows = ", ".join(map(str, entry["first_rows"]))
    more = ", ..." if entry["count"] > len(entry["first_rows"]) else ""
    return f"row{'s' if entry['count'] > 1 else ''} {rows}{more}"


def import_region(option: str | None, setting: str | None) -> str | None:
    """The default region of an import: its own `option` (any case; ValueError if phonenumbers does not know
    it), else the importer's `setting` (OUTREACH_DEFAULT_REGION, already checked), else None (the strict rule)."""
    if option is not None and option.strip():
        return check_region(option.strip().upper())
    return setting


class ImportCheck:
    """Judges an import's contacts `{row, destination, variables}` one by one (`add`, or `feed` as they stream)."""

    def __init__(self, channel: str, template: Any = None, default_region: str | None = None):
        self.channel = channel
        self.default_region = default_region
        self.contacts = 0
        self.valid = 0
        self._reasons: dict[str, dict[str, Any]] = {}
        # Duplicates are found in 16 bytes a destination (schemas.destinations.DestinationSet), the last chunk's
        # strings aside: a 300,000-row upload stays a stream.
        self._seen = DestinationSet()
        self._recent: set[str] = set()
        text = templating.template_texts(channel, template)
        self._missing = templating.MissingVariables(text) if text is not None else None

    def add(self, contact: Mapping[str, Any]) -> None:
        self.contacts += 1
        row = contact.get("row")
        destination, reason = validate_destination(self.channel, contact.get("destination"), self.default_region)
        if destination is not None and (destination in self._recent or destination in self._seen):
            reason = DUPLICATE_DESTINATION
        if reason is not None:
            entry = self._reasons.setdefault(reason, {"count": 0, "first_rows": []})
            entry["count"] += 1
            if len(entry["first_rows"]) < ROWS_SHOWN:
                entry["first_rows"].append(row)
            return
        self._recent.add(destination)  # type: ignore[arg-type]
        if len(self._recent) >= RECENT_CHUNK:
            self._seen.update(self._recent)
            self._recent.clear()
        self.valid += 1
        if self._missing is not None:
            self._missing.add(row, contact.get("variables"))

    def add_all(self, contacts: Iterable[Mapping[str, Any]]) -> ImportCheck:
        for contact in contacts:
            self.add(contact)
        return self

    def feed(self, contacts: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        """`contacts` unchanged, each judged on its way through."""
        for contact in contacts:
            self.add(contact)
            yield contact

    @property
    def invalid(self) -> int:
        return self.contacts - self.valid

    @property
    def invalid_reasons(self) -> dict[str, dict[str, Any]]:
        """{reason: {count, first_rows}}, the most frequent first."""
        return dict(sorted(self._reasons.items(), key=lambda item: -item[1]["count"]))

    @property
    def missing_variables(self) -> list[dict[str, Any]]:
        """[{variable, count, first_rows}] of the valid rows (those that become messages), in template order."""
        return self._missing.report() if self._missing is not None else []

    def refusal(self, region_option: str = "a default region") -> str | None:
        """Why the import must not be published (no valid row), or None. `region_option` names how this door
        takes a default region, for the hint when national numbers were refused."""
        if self.contacts == 0:
            return "the CSV has no contact: a campaign needs at least one valid contact; nothing was published"
        if self.valid:
            return None
        reasons = "; ".join(f"{reason}: {entry['count']} ({_rows(entry)})"
                            for reason, entry in self.invalid_reasons.items())
        message = f"no valid contact among the CSV's {self.contacts} contacts: {reasons}; nothing was published"
        if self.channel == "sms" and INVALID_E164 in self._reasons:
            if self.default_region is None:
                message += (f". SMS destinations must be E.164 (+14155550142); to read national or formatted "
                            f"numbers give {region_option} (or set OUTREACH_DEFAULT_REGION)")
            else:
                message += f" (numbers read with the default region {self.default_region})"
        return message

    def as_dict(self) -> dict[str, Any]:
        return {"contacts": self.contacts, "valid": self.valid, "invalid": self.invalid,
                "invalid_reasons": self.invalid_reasons, "missing_variables": self.missing_variables,
                "default_region": self.default_region}
